#![allow(clippy::unwrap_used)]
//! The registry against the test kit's Consul emulator: tokens are created, listed and redeemed
//! through Consul KV exactly as the controller and vmeshctl do, concurrent redemptions race on
//! check-and-set, and revocations reach the deny list.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vmesh_consul::{Client, ConsulConfig};
use vmesh_registry::{AgentRecord, Registry, RegistryError, TokenState};
use vmesh_testkit::ConsulEmulator;
use vmesh_tls::tokens::{Secret, TokenError, TokenId};
use vmesh_tls::SpiffeId;

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

fn registry(consul: &ConsulEmulator, prefix: &str) -> Registry {
    let client = Client::new(&ConsulConfig {
        address: consul.url(),
        ..ConsulConfig::default()
    })
    .unwrap();
    Registry::new(client, prefix)
}

/// Every value stored under `prefix`, as text.
fn all_values(consul: &ConsulEmulator, prefix: &str) -> String {
    consul
        .kv_list(prefix)
        .into_iter()
        .map(|e| format!("{}={}\n", e.key, String::from_utf8_lossy(&e.value)))
        .collect()
}

fn agent(node: &str) -> SpiffeId {
    SpiffeId::agent("vmesh", "dc1", node).unwrap()
}

fn agent_record(node: &str, token: &TokenId) -> AgentRecord {
    AgentRecord {
        spiffe_id: agent(node),
        token_id: token.clone(),
        address: "10.0.0.7".into(),
        serial: "3f:0a:01".into(),
        registered_unix: 1_800_000_000,
        not_after_unix: 1_800_086_400,
    }
}

fn assert_token_error(result: Result<impl std::fmt::Debug, RegistryError>, want: &TokenError) {
    match result {
        Err(RegistryError::Token(e)) => assert_eq!(&e, want),
        other => panic!("expected {want:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn create_then_list_shows_no_secret() {
    let consul = ConsulEmulator::start();
    let reg = registry(&consul, "vmesh/");
    let (id, secret) = reg
        .create_token(
            Some(Duration::from_secs(3600)),
            Some(2),
            Some("vm-1".into()),
            t(0),
        )
        .await
        .unwrap();
    assert!(secret.expose().starts_with("vmbt_"));

    let listed = reg.list_tokens().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);
    assert_eq!(listed[0].uses_left, Some(2));
    assert_eq!(listed[0].node.as_deref(), Some("vm-1"));
    assert_eq!(listed[0].expires, Some(t(3600)));
    assert_eq!(TokenState::of(&listed[0], t(1)), TokenState::Active);
    let json = serde_json::to_string(&listed).unwrap();
    assert!(!json.contains(secret.expose()), "{json}");
    assert!(!json.contains("sha256"), "{json}");

    // One key per token, holding the hash only.
    let key = format!("vmesh/tokens/{id}");
    let stored = String::from_utf8(consul.kv_get(&key).unwrap()).unwrap();
    assert!(stored.contains("secret_sha256"), "{stored}");
    let values = all_values(&consul, "");
    assert!(!values.contains(secret.expose()), "{values}");
    assert!(
        !values.contains(&secret.expose()["vmbt_".len()..]),
        "{values}"
    );

    // Refused before anything is written.
    assert_token_error(
        reg.create_token(None, Some(0), None, t(0)).await,
        &TokenError::ZeroUses,
    );
    assert_token_error(
        reg.create_token(Some(Duration::ZERO), None, None, t(0))
            .await,
        &TokenError::ZeroTtl,
    );
    assert_eq!(consul.kv_list("vmesh/tokens/").len(), 1);
}

#[tokio::test]
async fn redeem_counts_uses_down_and_refuses_with_the_reason() {
    let consul = ConsulEmulator::start();
    let reg = registry(&consul, "vmesh");

    let (single, single_secret) = reg.create_token(None, Some(1), None, t(0)).await.unwrap();
    let info = reg.redeem(&single_secret, "vm-1", t(1)).await.unwrap();
    assert_eq!(info.id, single);
    assert_eq!(info.uses_left, Some(0));
    assert_token_error(
        reg.redeem(&single_secret, "vm-2", t(2)).await,
        &TokenError::Exhausted { id: single.clone() },
    );

    let (unlimited, unlimited_secret) = reg.create_token(None, None, None, t(0)).await.unwrap();
    for node in ["a", "b", "c"] {
        let info = reg.redeem(&unlimited_secret, node, t(1)).await.unwrap();
        assert_eq!((info.id, info.uses_left), (unlimited.clone(), None));
    }

    let (expiring, expiring_secret) = reg
        .create_token(Some(Duration::from_secs(60)), Some(5), None, t(0))
        .await
        .unwrap();
    reg.redeem(&expiring_secret, "vm-1", t(59)).await.unwrap();
    match reg.redeem(&expiring_secret, "vm-1", t(60)).await {
        Err(RegistryError::Token(TokenError::Expired { id, expired_unix })) => {
            assert_eq!(id, expiring);
            assert_eq!(expired_unix, 1_800_000_060);
        }
        other => panic!("expected Expired, got {other:?}"),
    }

    let (bound, bound_secret) = reg
        .create_token(None, Some(1), Some("vm-1".into()), t(0))
        .await
        .unwrap();
    assert_token_error(
        reg.redeem(&bound_secret, "vm-2", t(1)).await,
        &TokenError::WrongNode {
            id: bound.clone(),
            bound: "vm-1".into(),
            node: "vm-2".into(),
        },
    );
    // A refused attempt does not use the token up.
    assert_eq!(
        reg.redeem(&bound_secret, "vm-1", t(2))
            .await
            .unwrap()
            .uses_left,
        Some(0)
    );

    let (revoked, revoked_secret) = reg.create_token(None, Some(3), None, t(0)).await.unwrap();
    assert!(reg.revoke_token(&revoked, t(1)).await.unwrap().is_empty());
    assert_token_error(
        reg.redeem(&revoked_secret, "vm-1", t(2)).await,
        &TokenError::Revoked {
            id: revoked.clone(),
        },
    );

    let mut wrong = single_secret.expose().to_owned();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    let err = reg
        .redeem(&Secret::new(wrong.clone()), "vm-1", t(1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::Token(TokenError::Unknown)),
        "{err:?}"
    );
    assert!(!err.to_string().contains(&wrong));

    // The states as listed.
    let states: Vec<(TokenId, TokenState)> = reg
        .list_tokens()
        .await
        .unwrap()
        .iter()
        .map(|i| (i.id.clone(), TokenState::of(i, t(61))))
        .collect();
    for (id, state) in [
        (&single, TokenState::Exhausted),
        (&unlimited, TokenState::Active),
        (&expiring, TokenState::Expired),
        (&bound, TokenState::Exhausted),
        (&revoked, TokenState::Revoked),
    ] {
        assert!(states.contains(&(id.clone(), state)), "{id}: {states:?}");
    }

    // No secret anywhere in KV.
    let values = all_values(&consul, "");
    for s in [
        &single_secret,
        &unlimited_secret,
        &expiring_secret,
        &bound_secret,
        &revoked_secret,
    ] {
        assert!(!values.contains(s.expose()), "{values}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_use_token_redeemed_concurrently_succeeds_once() {
    let consul = ConsulEmulator::start();
    let reg = registry(&consul, "vmesh");
    let (id, secret) = reg.create_token(None, Some(1), None, t(0)).await.unwrap();
    // Other tokens are read (and compared against) on every attempt too.
    for _ in 0..3 {
        reg.create_token(None, Some(1), None, t(0)).await.unwrap();
    }

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let reg = reg.clone();
            let secret = secret.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                reg.redeem(&secret, &format!("vm-{i}"), t(1)).await
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(info) => {
                assert_eq!(info.id, id);
                ok += 1;
            }
            Err(RegistryError::Token(TokenError::Exhausted { id: e })) => assert_eq!(e, id),
            Err(other) => panic!("unexpected error: {other:?}"),
        }
    }
    assert_eq!(ok, 1, "exactly one redemption may succeed");
    let info = reg
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.id == id)
        .unwrap();
    assert_eq!(info.uses_left, Some(0));
}

#[tokio::test]
async fn redeem_skips_a_corrupt_record_but_listing_reports_it() {
    let consul = ConsulEmulator::start();
    let reg = registry(&consul, "vmesh");
    let (_, secret) = reg.create_token(None, Some(1), None, t(0)).await.unwrap();
    consul.kv_put("vmesh/tokens/0000000000000000", "not json");
    reg.redeem(&secret, "vm-1", t(1)).await.unwrap();
    match reg.list_tokens().await {
        Err(RegistryError::Corrupt { key, .. }) => assert_eq!(key, "vmesh/tokens/0000000000000000"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn revoking_a_token_revokes_its_agents_and_the_watch_sees_it() {
    let consul = ConsulEmulator::start();
    let reg = registry(&consul, "vmesh");
    let (id, secret) = reg.create_token(None, None, None, t(0)).await.unwrap();
    let (other, _) = reg.create_token(None, None, None, t(0)).await.unwrap();
    reg.redeem(&secret, "vm-1", t(1)).await.unwrap();
    reg.record_agent(&agent_record("vm-1", &id)).await.unwrap();
    reg.record_agent(&agent_record("vm-2", &id)).await.unwrap();
    reg.record_agent(&agent_record("vm-3", &other))
        .await
        .unwrap();
    assert_eq!(
        consul.kv_list("vmesh/agents/dc1/").len(),
        3,
        "one key per agent"
    );
    assert_eq!(
        reg.agent(&agent("vm-1")).await.unwrap(),
        Some(agent_record("vm-1", &id))
    );
    let listed = reg.list_agents().await.unwrap();
    assert_eq!(
        listed.iter().map(AgentRecord::node).collect::<Vec<_>>(),
        ["vm-1", "vm-2", "vm-3"]
    );

    assert!(reg.deny().await.unwrap().is_empty());

    let revoked = reg.revoke_token(&id, t(5)).await.unwrap();
    assert_eq!(revoked, [agent("vm-1"), agent("vm-2")]);
    let deny = reg.deny().await.unwrap();
    assert!(deny.is_revoked(&agent("vm-1"), ""));
    assert!(deny.is_revoked(&agent("vm-2"), ""));
    assert!(!deny.is_revoked(&agent("vm-3"), ""));
    let revocations = reg.list_revocations().await.unwrap();
    assert_eq!(revocations.len(), 2);
    assert_eq!(revocations[0].revoked_unix, 1_800_000_005);
    assert!(
        revocations[0].reason.contains(id.as_str()),
        "{revocations:?}"
    );
    assert!(consul.kv_get("vmesh/revoked/dc1/vm-1").is_some());

    // Revoking again is harmless and still names the agents.
    assert_eq!(reg.revoke_token(&id, t(6)).await.unwrap().len(), 2);
    assert_eq!(
        reg.list_revocations().await.unwrap()[0].revoked_unix,
        1_800_000_005
    );

    // Unknown and malformed ids are NotFound (never turned into another key).
    for missing in ["0123456789abcdef", "../agents/dc1/vm-3"] {
        let missing = TokenId::new(missing);
        assert_token_error(
            reg.revoke_token(&missing, t(7)).await,
            &TokenError::NotFound {
                id: missing.clone(),
            },
        );
    }

    // Allowing lifts one revocation.
    assert!(reg.allow_agent(&agent("vm-1")).await.unwrap());
    assert!(!reg.allow_agent(&agent("vm-1")).await.unwrap());
    let deny = reg.deny().await.unwrap();
    assert!(!deny.is_revoked(&agent("vm-1"), ""));
    assert!(deny.is_revoked(&agent("vm-2"), ""));

    // Agents are revoked one by one too, registered or not.
    reg.revoke_agent(&agent("vm-9"), "lost laptop", t(8))
        .await
        .unwrap();
    let deny = reg.deny().await.unwrap();
    assert!(deny.is_revoked(&agent("vm-9"), ""));
    let service = SpiffeId::service("vmesh", "dc1", "web").unwrap();
    assert!(matches!(
        reg.revoke_agent(&service, "x", t(9)).await,
        Err(RegistryError::NotAnAgent { .. })
    ));
}

#[tokio::test]
async fn a_revocation_that_does_not_decode_fails_the_deny_list_rather_than_hide() {
    let consul = ConsulEmulator::start();
    let reg = registry(&consul, "vmesh");
    reg.revoke_agent(&agent("vm-1"), "test", t(0))
        .await
        .unwrap();
    consul.kv_put("vmesh/revoked/dc1/vm-2", "{");
    match reg.deny().await {
        Err(RegistryError::Corrupt { key, .. }) => assert_eq!(key, "vmesh/revoked/dc1/vm-2"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

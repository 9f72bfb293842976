//! End to end with Consul KV as the config source: the test kit's Consul emulator,
//! controllers reading it, a real Envoy they configure, and echo upstreams.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use vmesh_testkit::consul::{ConsulEmulator, ConsulOptions};
use vmesh_testkit::{eventually, free_port, http_get, EchoServer};
use vmeshctl::bootstrap::Protocol;

const PROXY: &str = "gateway-proxy";

fn vs_to(upstream: &str) -> String {
    format!("kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - upstream: {upstream}\n")
}

struct Setup {
    consul: ConsulEmulator,
    v1: EchoServer,
    v2: EchoServer,
    port: u16,
}

/// An emulated Consul holding a gateway, two upstreams and a virtual service to v1.
fn setup() -> Setup {
    let consul = ConsulEmulator::start_with(ConsulOptions {
        session_ttl_min: Duration::from_secs(1),
        ..Default::default()
    });
    let s = Setup {
        consul,
        v1: EchoServer::start("v1"),
        v2: EchoServer::start("v2"),
        port: free_port(),
    };
    put(&s.consul, "Gateway/edge", &gateway_doc(s.port, PROXY));
    put(&s.consul, "Upstream/v1", &upstream_doc("v1", s.v1.port()));
    put(&s.consul, "Upstream/v2", &upstream_doc("v2", s.v2.port()));
    put(&s.consul, "VirtualService/web", &vs_to("v1"));
    s
}

/// `consul kv put vmesh/config/<what> <text>`
fn put(consul: &ConsulEmulator, what: &str, text: &str) {
    consul.kv_put(&format!("vmesh/config/{what}"), text.as_bytes());
}

/// The status the leader wrote to `vmesh/status/<what>`.
fn kv_status(consul: &ConsulEmulator, what: &str) -> Option<Value> {
    consul
        .kv_get(&format!("vmesh/status/{what}"))
        .map(|bytes| serde_json::from_slice(&bytes).expect("status is JSON"))
}

#[track_caller]
fn wait_status(consul: &ConsulEmulator, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    eventually(DEADLINE, &format!("the status of {what}"), || {
        let s = kv_status(consul, what).ok_or("no status key")?;
        if check(&s) {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
}

#[test]
fn kv_puts_route_traffic_and_status_is_written_back() {
    let s = setup();
    let c = Controller::consul(&s.consul.url(), &[]);
    let _envoy = c.envoy(PROXY, Protocol::Delta);
    wait_served_by(s.port, "/", &[], "v1");

    // consul kv put → traffic changes.
    put(&s.consul, "VirtualService/web", &vs_to("v2"));
    wait_served_by(s.port, "/", &[], "v2");
    let st = wait_status(&s.consul, "VirtualService/web", |st| {
        st["state"] == "Accepted" && st["proxies"]["acked"] == 1
    });
    assert_eq!(st["proxies"]["total"], 1, "{st}");
    assert_eq!(st["source"], "vmesh/config/VirtualService/web");
    assert!(st["configModifyIndex"].as_u64().unwrap() > 0, "{st}");
    // The user's own key is never touched.
    assert_eq!(
        s.consul.kv_get("vmesh/config/VirtualService/web").unwrap(),
        vs_to("v2").into_bytes()
    );

    // An invalid value: Rejected with the field at fault; traffic stays.
    put(
        &s.consul,
        "VirtualService/web",
        "kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - match: {regex: \"/(\"}\n      upstream: v1\n",
    );
    let st = wait_status(&s.consul, "VirtualService/web", |st| {
        st["state"] == "Rejected"
    });
    assert_eq!(
        st["errors"][0]["path"], "spec.routes[0].match.regex",
        "{st}"
    );
    assert_eq!(st["servingLastGood"], true);
    for _ in 0..10 {
        assert_eq!(served_by(&get(s.port, "/", &[]).unwrap()), "v2");
    }

    // A value whose document names another object is rejected on its own.
    put(
        &s.consul,
        "Upstream/v3",
        &upstream_doc("not-v3", s.v1.port()),
    );
    let st = wait_status(&s.consul, "Upstream/v3", |st| st["state"] == "Rejected");
    assert!(
        st["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("its key says Upstream/v3"),
        "{st}"
    );

    // Deleting the key removes the routes and the status.
    s.consul.kv_delete("vmesh/config/VirtualService/web");
    eventually(DEADLINE, "routes to be removed", || {
        let r = get(s.port, "/", &[])?;
        (r.status == 404)
            .then_some(())
            .ok_or(format!("status {}", r.status))
    });
    eventually(DEADLINE, "the status key to be removed", || {
        kv_status(&s.consul, "VirtualService/web").map_or(Ok(()), |st| Err(st.to_string()))
    });
}

#[test]
fn consul_down_for_a_while_changes_nothing_and_recovery_resends_nothing() {
    let s = setup();
    let c = Controller::consul(&s.consul.url(), &[]);
    let envoy = c.envoy(PROXY, Protocol::Sotw);
    wait_served_by(s.port, "/", &[], "v1");
    wait_status(&s.consul, "VirtualService/web", |st| {
        st["proxies"]["acked"] == 1
    });
    let pushes = || http_get(&c.admin("/metrics"), &[]).unwrap().body;
    let updates = || {
        envoy
            .stat("cluster_manager.cds.update_success")
            .unwrap_or(0)
            + envoy
                .stats_matching("rds.*update_success")
                .values()
                .sum::<u64>()
    };
    let before = updates();

    s.consul.stop();
    eventually(DEADLINE, "readiness to say degraded", || {
        let r = http_get(&c.admin("/readyz"), &[])?;
        (r.status == 200 && r.body.contains("degraded"))
            .then_some(())
            .ok_or(r.body)
    });
    assert!(pushes().contains("vmesh_config_source_up 0"));
    for _ in 0..10 {
        assert_eq!(
            served_by(&get(s.port, "/", &[]).unwrap()),
            "v1",
            "traffic unaffected"
        );
    }

    s.consul.restart();
    eventually(DEADLINE, "the source to recover", || {
        let r = http_get(&c.admin("/readyz"), &[])?;
        (!r.body.contains("degraded")).then_some(()).ok_or(r.body)
    });
    assert!(pushes().contains("vmesh_config_source_up 1"));
    assert_eq!(
        updates(),
        before,
        "nothing was pushed again after the recovery"
    );

    // And it still follows changes.
    put(&s.consul, "VirtualService/web", &vs_to("v2"));
    wait_served_by(s.port, "/", &[], "v2");
}

/// A Consul that takes requests and answers none (no error, the connection open): within a
/// few seconds the source is degraded, whatever the blocking read was doing; when Consul
/// answers again, the source recovers and follows changes made meanwhile.
#[test]
fn a_hung_consul_is_degraded_within_seconds_and_its_recovery_seen() {
    let s = setup();
    let c = Controller::consul(&s.consul.url(), &[]);
    let _envoy = c.envoy(PROXY, Protocol::Delta);
    wait_served_by(s.port, "/", &[], "v1");
    let metrics = || http_get(&c.admin("/metrics"), &[]).unwrap().body;
    assert!(metrics().contains("vmesh_config_source_up 1"));

    s.consul.set_hung(true);
    eventually(DEADLINE, "readiness to say degraded", || {
        let r = http_get(&c.admin("/readyz"), &[])?;
        r.body.contains("degraded").then_some(()).ok_or(r.body)
    });
    assert!(metrics().contains("vmesh_config_source_up 0"));
    assert!(c.log().contains("Consul does not answer"), "{}", c.log());
    // A change made while it hangs is applied once it answers.
    s.consul
        .kv_put("vmesh/config/VirtualService/web", vs_to("v2").as_bytes());
    for _ in 0..10 {
        assert_eq!(served_by(&get(s.port, "/", &[]).unwrap()), "v1");
    }

    s.consul.set_hung(false);
    wait_served_by(s.port, "/", &[], "v2");
    eventually(DEADLINE, "the source to recover", || {
        let r = http_get(&c.admin("/readyz"), &[])?;
        (!r.body.contains("degraded")).then_some(()).ok_or(r.body)
    });
    assert!(metrics().contains("vmesh_config_source_up 1"));
}

/// The id a controller holding the leader lock wrote into it.
fn leader_id(consul: &ConsulEmulator) -> Option<String> {
    consul
        .kv_get("vmesh/leader")
        .map(|v| String::from_utf8_lossy(&v).to_string())
}

#[test]
fn two_replicas_elect_one_status_writer_and_fail_over() {
    let s = setup();
    let fast = ["--leader-ttl", "2s", "--leader-lock-delay", "200ms"];
    let mut a = Controller::consul(
        &s.consul.url(),
        &[&["--id", "replica-a"][..], &fast].concat(),
    );
    let mut b = Controller::consul(
        &s.consul.url(),
        &[&["--id", "replica-b"][..], &fast].concat(),
    );
    let _envoy = a.envoy(PROXY, Protocol::Delta);
    wait_served_by(s.port, "/", &[], "v1");

    let first = eventually(DEADLINE, "a leader", || {
        leader_id(&s.consul).ok_or("none".to_string())
    });
    assert!(first == "replica-a" || first == "replica-b", "{first}");
    let leader_logs = |c: &Controller| c.log().matches("became the leader").count();
    eventually(DEADLINE, "exactly one replica to lead", || {
        let n = leader_logs(&a) + leader_logs(&b);
        (n == 1).then_some(()).ok_or(format!("{n} leaders"))
    });
    wait_status(&s.consul, "VirtualService/web", |st| {
        st["state"] == "Accepted"
    });

    // The leader is killed outright: its session expires and the other takes over.
    let (survivor, survivor_id) = if first == "replica-a" {
        a.kill();
        (&b, "replica-b")
    } else {
        b.kill();
        (&a, "replica-a")
    };
    eventually(DEADLINE, "the other replica to take over", || {
        (leader_id(&s.consul).as_deref() == Some(survivor_id) && leader_logs(survivor) == 1)
            .then_some(())
            .ok_or(format!("leader {:?}", leader_id(&s.consul)))
    });
    // The new leader writes status: a new rejection shows up.
    put(
        &s.consul,
        "Upstream/bad",
        "kind: Upstream\nname: bad\nspec: {}\n",
    );
    wait_status(&s.consul, "Upstream/bad", |st| st["state"] == "Rejected");

    // A clean stop hands over at once (no TTL to wait for).
    let mut c = Controller::consul(
        &s.consul.url(),
        &[&["--id", "replica-c"][..], &fast].concat(),
    );
    if survivor_id == "replica-a" {
        a.terminate();
    } else {
        b.terminate();
    }
    eventually(Duration::from_secs(5), "replica-c to take over", || {
        (leader_id(&s.consul).as_deref() == Some("replica-c"))
            .then_some(())
            .ok_or(format!("leader {:?}", leader_id(&s.consul)))
    });
    // The lock is visible in Consul a moment before the new leader logs that it took it.
    eventually(DEADLINE, "replica-c to say it leads", || {
        c.log()
            .contains("became the leader")
            .then_some(())
            .ok_or("not yet".to_string())
    });
    c.kill();
}

/// Proxies connect to different replicas; the status the leader writes counts the
/// proxies of every replica, and forgets a replica that is gone.
#[test]
fn status_counts_the_proxies_of_every_replica() {
    let s = setup();
    let (p1, p2) = (free_port(), free_port());
    put(&s.consul, "Gateway/edge", &gateway_doc(p1, "edge-1"));
    put(
        &s.consul,
        "Gateway/edge-2",
        &gateway_doc(p2, "edge-2").replace("name: edge\n", "name: edge-2\n"),
    );
    let fast = ["--leader-ttl", "2s", "--leader-lock-delay", "200ms"];
    let a = Controller::consul(
        &s.consul.url(),
        &[&["--id", "replica-a"][..], &fast].concat(),
    );
    let mut b = Controller::consul(
        &s.consul.url(),
        &[&["--id", "replica-b"][..], &fast].concat(),
    );
    let _e1 = a.envoy("edge-1", Protocol::Delta);
    let _e2 = b.envoy("edge-2", Protocol::Sotw);
    wait_served_by(p1, "/", &[], "v1");
    wait_served_by(p2, "/", &[], "v1");
    eventually(DEADLINE, "a leader", || {
        leader_id(&s.consul).ok_or("none".to_string())
    });

    let st = wait_status(&s.consul, "VirtualService/web", |st| {
        st["proxies"]["total"] == 2 && st["proxies"]["acked"] == 2
    });
    assert_eq!(st["state"], "Accepted");

    // A change: both proxies take it, each from its own replica.
    put(&s.consul, "VirtualService/web", &vs_to("v2"));
    wait_served_by(p1, "/", &[], "v2");
    wait_served_by(p2, "/", &[], "v2");
    wait_status(&s.consul, "VirtualService/web", |st| {
        st["proxies"]["acked"] == 2 && st["version"] == st["servingVersion"]
    });

    // Replica b dies (its Envoy keeps running, now without a control plane): once its
    // session is gone, so is its report, and only replica a's proxy counts.
    b.kill();
    if leader_id(&s.consul).as_deref() == Some("replica-b") {
        eventually(DEADLINE, "replica a to lead", || {
            (leader_id(&s.consul).as_deref() == Some("replica-a"))
                .then_some(())
                .ok_or(format!("{:?}", leader_id(&s.consul)))
        });
    }
    wait_status(&s.consul, "VirtualService/web", |st| {
        st["proxies"]["total"] == 2 && st["proxies"]["acked"] == 1
    });
}

/// With Consul ACLs: the controller's token (from CONSUL_HTTP_TOKEN_FILE) is sent and
/// never shown; a token that may not read the config leaves the controller degraded,
/// with Consul's message naming the missing permission.
#[test]
fn acl_tokens_are_used_and_a_missing_permission_is_named() {
    use vmesh_testkit::consul::{AclConfig, AclRules, AclToken, KeyPolicy};
    let controller_rules = AclRules::default()
        .key_prefix("vmesh/config/", KeyPolicy::Read)
        .key_prefix("vmesh/status/", KeyPolicy::Write)
        .key_prefix("vmesh/replicas/", KeyPolicy::Write)
        .key_prefix("vmesh/leader", KeyPolicy::Write)
        .with_session_write();
    let acl = AclConfig::default()
        .with_token(AclToken::new("s3cret-controller-token", controller_rules))
        .with_token(AclToken::new(
            "s3cret-other-token",
            AclRules::default().key_prefix("other/", KeyPolicy::Read),
        ));
    let consul = ConsulEmulator::start_with(ConsulOptions {
        acl: Some(acl),
        session_ttl_min: Duration::from_secs(1),
        ..Default::default()
    });
    let v1 = EchoServer::start("v1");
    let port = free_port();
    put(&consul, "Gateway/edge", &gateway_doc(port, PROXY));
    put(&consul, "Upstream/v1", &upstream_doc("v1", v1.port()));
    put(&consul, "VirtualService/web", &vs_to("v1"));

    let dir = std::env::temp_dir().join(format!("vmesh-acl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret-controller-token\n").unwrap();
    let c = Controller::consul(
        &consul.url(),
        &["--consul-token-file", token_file.to_str().unwrap()],
    );
    let _envoy = c.envoy(PROXY, Protocol::Delta);
    wait_served_by(port, "/", &[], "v1");
    wait_status(&consul, "VirtualService/web", |st| {
        st["proxies"]["acked"] == 1
    });
    assert!(!c.log().contains("s3cret"), "the token never shows in logs");

    // Another controller with a token that may not read vmesh/config/.
    std::fs::write(&token_file, "s3cret-other-token").unwrap();
    let denied = {
        let base = Controller::consul_unready(
            &consul.url(),
            &["--consul-token-file", token_file.to_str().unwrap()],
        );
        eventually(DEADLINE, "readiness to name the missing permission", || {
            let r = http_get(&base.admin("/readyz"), &[])?;
            // Not ready: it never read a config, and an empty one would be a lie.
            (r.status == 503 && r.body.contains("may not read"))
                .then_some(r.body.clone())
                .ok_or(r.body)
        })
    };
    assert!(denied.contains("vmesh/config/"), "{denied}");
    assert!(!denied.contains("s3cret"), "{denied}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A newly added virtual service listing a domain another one already serves does not take it,
/// even when its name sorts first (with per-key ACLs, one team cannot take another's host): it
/// is warned, naming the owner, and gets the domain only once the owner lets it go.
#[test]
fn the_older_claim_keeps_a_contested_domain() {
    let s = setup();
    let shop = |name: &str, upstream: &str| {
        format!("kind: VirtualService\nname: {name}\nspec:\n  domains: [shop.example.com]\n  routes:\n    - upstream: {upstream}\n")
    };
    put(&s.consul, "VirtualService/shop", &shop("shop", "v1"));
    let c = Controller::consul(&s.consul.url(), &[]);
    let _envoy = c.envoy(PROXY, Protocol::Delta);
    let host = [("host", "shop.example.com")];
    wait_served_by(s.port, "/", &host, "v1");

    // Another team adds a-shop (it sorts first) with the same domain.
    put(&s.consul, "VirtualService/a-shop", &shop("a-shop", "v2"));
    let st = wait_status(&s.consul, "VirtualService/a-shop", |st| {
        st["state"] == "Warning"
    });
    assert_eq!(
        st["warnings"][0]["message"],
        "domain \"shop.example.com\" belongs to VirtualService \"shop\", which claimed it first on Gateway \"edge\"; ignored there",
        "{st}"
    );
    wait_status(&s.consul, "VirtualService/shop", |st| {
        st["state"] == "Accepted"
    });
    // The owner keeps serving, through later changes of either.
    put(&s.consul, "VirtualService/a-shop", &shop("a-shop", "v1"));
    put(&s.consul, "VirtualService/shop", &shop("shop", "v2"));
    wait_served_by(s.port, "/", &host, "v2");
    put(&s.consul, "VirtualService/a-shop", &shop("a-shop", "v1"));
    for _ in 0..10 {
        assert_eq!(served_by(&get(s.port, "/", &host).unwrap()), "v2");
    }

    // The owner lets it go: the newcomer gets it.
    s.consul.kv_delete("vmesh/config/VirtualService/shop");
    wait_served_by(s.port, "/", &host, "v1");
    wait_status(&s.consul, "VirtualService/a-shop", |st| {
        st["state"] == "Accepted"
    });
}

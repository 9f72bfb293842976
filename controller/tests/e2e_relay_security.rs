//! The relay's security, end to end: a controller with its relay on, and clients that try what a
//! stolen token, a foreign or expired certificate, a revoked agent or a compromised VM would.
//! Each attempt must be refused with a clear message, a log line and a metric, and the
//! controller must keep serving.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

mod common;

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use common::vm::{create_token, route_to_consul_service, tls_channel, ClientCert, RelayController};
use common::*;
use tonic::transport::Channel;
use vmesh_proto::v1::registration_client::RegistrationClient;
use vmesh_proto::v1::relay_client::RelayClient;
use vmesh_proto::v1::{
    agent_message, controller_message, AgentMessage, DiscoverySnapshot, Health, Hello,
    RegisterRequest, RenewRequest, ServiceInstance,
};
use vmesh_testkit::consul::ConsulEmulator;
use vmesh_testkit::{eventually, free_port, http_get};
use vmesh_tls::{certificates_to_pem, new_key_and_csr, BuiltinCa, SpiffeId};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A TLS channel to the relay from `bind`, trusting the controller's CA, with `cert` if given.
async fn channel(
    relay: &RelayController,
    cert: Option<&ClientCert>,
    bind: IpAddr,
) -> Result<Channel, String> {
    tls_channel(relay, &relay.relay_addr(), cert, bind).await
}

/// Registers `node` with `token` from `bind`, as an agent would. Returns the certificate or the
/// gRPC status.
async fn register(
    relay: &RelayController,
    token: &str,
    node: &str,
    bind: IpAddr,
) -> Result<ClientCert, tonic::Status> {
    common::vm::register(relay, token, node, None, bind).await
}

/// Opens a discovery stream with `cert` and sends Hello and `instances` as the snapshot.
/// Returns the first message the controller answers with, or the error.
async fn report(
    relay: &RelayController,
    cert: Option<&ClientCert>,
    bind: IpAddr,
    instances: Vec<ServiceInstance>,
) -> Result<controller_message::Message, String> {
    let channel = channel(relay, cert, bind).await?;
    let outbound = tokio_stream::iter(vec![
        AgentMessage {
            message: Some(agent_message::Message::Hello(Hello::default())),
        },
        AgentMessage {
            message: Some(agent_message::Message::Snapshot(DiscoverySnapshot {
                seq: 1,
                instances,
            })),
        },
    ]);
    let mut inbound = RelayClient::new(channel)
        .connect(outbound)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    match inbound.message().await {
        Ok(Some(m)) => m.message.ok_or_else(|| "empty message".to_string()),
        Ok(None) => Err("stream ended".into()),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

#[test]
fn bootstrap_tokens_are_refused_when_reused_expired_unknown_or_for_another_node() {
    let consul = ConsulEmulator::start();
    let relay = RelayController::start(&consul, &[]);
    let rt = runtime();

    // A single-use token works once.
    let once = create_token(&consul, None, Some(1), None);
    rt.block_on(register(&relay, &once, "vm-a", ip(71)))
        .unwrap();
    let reused = rt
        .block_on(register(&relay, &once, "vm-b", ip(72)))
        .err()
        .unwrap();
    assert_eq!(reused.code(), tonic::Code::PermissionDenied);
    assert!(reused.message().contains("no uses left"), "{reused:?}");

    // An expired token.
    let short = create_token(&consul, Some(Duration::from_secs(1)), None, None);
    let created = SystemTime::now();
    eventually(Duration::from_secs(5), "the token to expire", || {
        (created.elapsed().unwrap() >= Duration::from_secs(2))
            .then_some(())
            .ok_or("not yet".to_string())
    });
    let expired = rt
        .block_on(register(&relay, &short, "vm-c", ip(73)))
        .err()
        .unwrap();
    assert_eq!(expired.code(), tonic::Code::PermissionDenied);
    assert!(expired.message().contains("expired"), "{expired:?}");

    // A token bound to another node, and a made-up one.
    let bound = create_token(&consul, None, None, Some("vm-d"));
    let wrong_node = rt
        .block_on(register(&relay, &bound, "vm-e", ip(74)))
        .err()
        .unwrap();
    assert!(
        wrong_node.message().contains("bound to node"),
        "{wrong_node:?}"
    );
    let unknown = rt
        .block_on(register(&relay, "vmbt_0000", "vm-f", ip(75)))
        .err()
        .unwrap();
    assert!(unknown.message().contains("not recognised"), "{unknown:?}");
    rt.block_on(register(&relay, &bound, "vm-d", ip(76)))
        .unwrap();

    for reason in [
        "token_exhausted",
        "token_expired",
        "token_wrong_node",
        "token_unknown",
    ] {
        assert_eq!(
            relay.metric("vmesh_relay_refused_total", &format!("reason=\"{reason}\"")),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(relay.metric("vmesh_relay_registrations_total", ""), 2.0);
    let log = relay.controller.log();
    assert_eq!(log.matches("relay call refused").count(), 4, "{log}");
    for secret in [&once, &short, &bound] {
        assert!(!log.contains(secret.as_str()), "a token secret was logged");
    }
    relay.assert_alive();
}

#[test]
fn streams_without_a_valid_client_certificate_are_refused() {
    let consul = ConsulEmulator::start();
    let relay = RelayController::start(&consul, &[]);
    let rt = runtime();
    let id = SpiffeId::agent("vmesh", "dc1", "vm-g").unwrap();

    // No client certificate at all.
    let none = rt
        .block_on(report(&relay, None, ip(81), Vec::new()))
        .unwrap_err();
    assert!(none.contains("Unauthenticated"), "{none}");
    assert_eq!(
        relay.metric("vmesh_relay_refused_total", "no_client_certificate"),
        1.0
    );

    // A certificate for the right identity from another CA.
    let other_dir = relay.controller.base().join("other-ca");
    let other = BuiltinCa::load_or_create(&other_dir, "vmesh").unwrap();
    let sign = |ca: &BuiltinCa, at: SystemTime| {
        let (key, csr) = new_key_and_csr().unwrap();
        let issued = ca.sign_at(&csr, &id, Duration::from_secs(60), at).unwrap();
        ClientCert {
            chain_pem: certificates_to_pem(issued.chain_der.iter().map(Vec::as_slice)),
            key_pem: key.expose().to_owned(),
        }
    };
    let foreign = sign(&other, SystemTime::now());
    let refused = rt.block_on(report(&relay, Some(&foreign), ip(82), Vec::new()));
    assert!(refused.is_err(), "{refused:?}");
    eventually(DEADLINE, "the foreign certificate to be counted", || {
        // The client may try the handshake more than once.
        let n = relay.metric("vmesh_relay_refused_total", "unknown_ca");
        (n >= 1.0).then_some(()).ok_or(format!("{n}"))
    });

    // A certificate from the controller's own CA that expired three minutes ago (the CA itself
    // is only minutes old).
    let ca_dir = relay.ca_file().parent().unwrap().to_owned();
    let own = BuiltinCa::load_or_create(&ca_dir, "vmesh").unwrap();
    let stale = sign(&own, SystemTime::now() - Duration::from_secs(4 * 60));
    let refused = rt.block_on(report(&relay, Some(&stale), ip(83), Vec::new()));
    assert!(refused.is_err(), "{refused:?}");
    eventually(DEADLINE, "the expired certificate to be counted", || {
        let n = relay.metric("vmesh_relay_refused_total", "certificate_expired");
        (n >= 1.0).then_some(()).ok_or(format!("{n}"))
    });

    // The same CA, valid now: accepted.
    let good = sign(&own, SystemTime::now());
    let answer = rt
        .block_on(report(&relay, Some(&good), ip(84), Vec::new()))
        .unwrap();
    assert!(
        matches!(answer, controller_message::Message::DiscoveryAck(_)),
        "{answer:?}"
    );
    let log = relay.controller.log();
    assert!(log.contains("TLS handshake refused"), "{log}");
    relay.assert_alive();
}

#[test]
fn an_agent_may_not_report_another_machines_address() {
    let consul = ConsulEmulator::start();
    let port = free_port();
    route_to_consul_service(&consul, port, "gateway-proxy");
    let relay = RelayController::start(&consul, &[]);
    let rt = runtime();
    let token = create_token(&consul, None, None, None);
    // A compromised VM at 127.0.0.91 claims an instance at 127.0.0.92, another machine.
    let cert = rt
        .block_on(register(&relay, &token, "vm-h", ip(91)))
        .unwrap();
    let instance = |id: &str, address: &str| ServiceInstance {
        id: id.into(),
        service: "web".into(),
        address: address.into(),
        port: 8080,
        health: Health::Passing as i32,
        ..Default::default()
    };
    let answer = rt
        .block_on(report(
            &relay,
            Some(&cert),
            ip(91),
            vec![
                instance("steal", "127.0.0.92"),
                instance("own", "127.0.0.91"),
            ],
        ))
        .unwrap();
    assert!(matches!(
        answer,
        controller_message::Message::DiscoveryAck(_)
    ));
    assert_eq!(relay.metric("vmesh_relay_instances_refused_total", ""), 1.0);
    let log = relay.controller.log();
    assert!(
        log.contains("service instance refused") && log.contains("not the address of node vm-h"),
        "{log}"
    );
    // Only the VM's own instance reaches Envoy's endpoints.
    eventually(DEADLINE, "the VM's own instance to be served", || {
        let dump = http_get(
            &relay.controller.admin("/config_dump?proxy=gateway-proxy"),
            &[],
        )?;
        if dump.body.contains("127.0.0.92") {
            return Err("the stolen address is served".into());
        }
        dump.body
            .contains("127.0.0.91")
            .then_some(())
            .ok_or_else(|| "no endpoint yet".to_string())
    });
    relay.assert_alive();
}

#[test]
fn a_token_cannot_take_over_a_registered_node() {
    let consul = ConsulEmulator::start();
    let relay = RelayController::start(&consul, &[]);
    let rt = runtime();
    let token = create_token(&consul, None, None, None);
    rt.block_on(register(&relay, &token, "vm-k", ip(101)))
        .unwrap();
    // Another machine with the same (unbound) token claims the node's name.
    let takeover = rt
        .block_on(register(&relay, &token, "vm-k", ip(102)))
        .err()
        .unwrap();
    assert_eq!(takeover.code(), tonic::Code::PermissionDenied);
    assert!(
        takeover.message().contains("already registered"),
        "{takeover:?}"
    );
    assert_eq!(
        relay.metric("vmesh_relay_refused_total", "already_registered"),
        1.0
    );
    relay.assert_alive();
}

#[test]
fn a_request_that_cannot_be_signed_does_not_spend_the_token() {
    let consul = ConsulEmulator::start();
    let relay = RelayController::start(&consul, &[]);
    let rt = runtime();
    let once = create_token(&consul, None, Some(1), None);
    let bad = rt.block_on(async {
        let channel = channel(&relay, None, ip(111)).await.unwrap();
        RegistrationClient::new(channel)
            .register(RegisterRequest {
                token: once.clone(),
                node: "vm-m".into(),
                datacenter: "dc1".into(),
                csr_der: b"not a CSR".to_vec(),
                ..Default::default()
            })
            .await
    });
    let status = bad.err().unwrap();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("certificate signing request"),
        "{status:?}"
    );
    rt.block_on(register(&relay, &once, "vm-m", ip(111)))
        .expect("the single-use token still has its use");
}

#[test]
fn certificates_from_before_a_revocation_cannot_be_renewed_after_it_is_lifted() {
    let consul = ConsulEmulator::start();
    let relay = RelayController::start(&consul, &[]);
    let rt = runtime();
    let token = create_token(&consul, None, None, None);
    let old = rt
        .block_on(register(&relay, &token, "vm-n", ip(121)))
        .unwrap();

    // `vmeshctl agent revoke vm-n`, then `vmeshctl agent allow vm-n`.
    let vmeshctl =
        std::path::Path::new(env!("CARGO_BIN_EXE_vmesh-controller")).with_file_name("vmeshctl");
    for action in ["revoke", "allow"] {
        let out = std::process::Command::new(&vmeshctl)
            .args(["agent", action, "vm-n", "--consul-addr", &consul.url()])
            .output()
            .expect("run vmeshctl (build it with `cargo build -p vmeshctl`)");
        assert!(out.status.success(), "{action}: {out:?}");
    }

    let renew = || {
        rt.block_on(async {
            let (_, csr) = new_key_and_csr().unwrap();
            let channel = channel(&relay, Some(&old), ip(121)).await?;
            RelayClient::new(channel)
                .renew(RenewRequest { csr_der: csr })
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        })
    };
    eventually(
        DEADLINE,
        "the old certificate's renewal to be refused",
        || match renew() {
            Err(e) if e.contains("no registration on record") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(relay.metric("vmesh_relay_refused_total", "not_registered") >= 1.0);
    // The node registers again with a token.
    rt.block_on(register(&relay, &token, "vm-n", ip(121)))
        .unwrap();
    relay.assert_alive();
}

#[test]
fn a_registration_flood_costs_no_consul_reads_and_a_few_log_lines() {
    let consul = ConsulEmulator::start();
    // A burst large enough that much of the flood reaches the token check; the rest is refused
    // by the rate limit before it.
    let relay = RelayController::start(
        &consul,
        &["--registration-burst", "100", "--registration-rate", "1"],
    );
    let rt = runtime();
    let honest_token = create_token(&consul, None, None, None);
    // Reads that are not the relay's watches.
    let reads = || consul.kv_reads_under("vmesh/tokens/") + consul.kv_reads_under("vmesh/agents/");
    let before = reads();

    // 300 registrations from one address, 16 at a time on one connection: made-up tokens, and
    // every other one with a CSR that is not one.
    let (_key, csr) = new_key_and_csr().unwrap();
    let codes = rt.block_on(async {
        let channel = channel(&relay, None, ip(90)).await.unwrap();
        let mut codes = Vec::new();
        for batch in 0..(300 / 15) {
            let calls = (0..15).map(|i| {
                let mut client = RegistrationClient::new(channel.clone());
                let n = batch * 15 + i;
                let csr_der = if n % 2 == 0 {
                    csr.clone()
                } else {
                    b"garbage".to_vec()
                };
                async move {
                    client
                        .register(RegisterRequest {
                            token: format!("vmbt_{n:064x}"),
                            node: format!("flood-{n}"),
                            datacenter: "dc1".to_owned(),
                            csr_der,
                            ..Default::default()
                        })
                        .await
                        .err()
                        .map(|s| s.code())
                }
            });
            codes.extend(futures::future::join_all(calls).await);
        }
        codes
    });
    let count = |code| codes.iter().filter(|c| **c == Some(code)).count();
    assert_eq!(codes.len(), 300);
    assert!(
        codes.iter().all(Option::is_some),
        "a made-up registration succeeded"
    );
    let (unknown, bad_csr, limited) = (
        count(tonic::Code::PermissionDenied),
        count(tonic::Code::InvalidArgument),
        count(tonic::Code::ResourceExhausted),
    );
    assert_eq!(unknown + bad_csr + limited, 300, "{codes:?}");
    assert!(
        unknown >= 40 && bad_csr >= 40,
        "{unknown} unknown, {bad_csr} bad CSRs"
    );
    assert!(limited >= 100, "{limited} rate-limited");
    // Not one of them read Consul.
    assert_eq!(
        reads(),
        before,
        "the flood read the tokens or agents in Consul"
    );

    // Meanwhile an agent from another address registers as usual.
    rt.block_on(register(&relay, &honest_token, "vm-honest", ip(91)))
        .unwrap();

    // The log has one line per reason, then a count.
    eventually(DEADLINE, "the refusals to be summed up in the log", || {
        let log = relay.controller.log();
        log.lines()
            .find(|l| l.contains("more calls refused") && l.contains("port=\"relay\""))
            .map(str::to_owned)
            .ok_or("no summary yet".to_string())
    });
    // A slow machine may spread the flood over more than one summing-up window; each window
    // still logs each reason at most once.
    let log = relay.controller.log();
    let mut logged_in_window = Vec::new();
    for line in log.lines() {
        if line.contains("more calls refused") {
            logged_in_window.clear();
        } else if line.contains("relay call refused") {
            let reason = line
                .split("reason=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default();
            assert!(
                !logged_in_window.contains(&reason),
                "{reason} logged twice in one window:\n{log}"
            );
            logged_in_window.push(reason);
        }
    }
    for reason in ["bad_request", "token_unknown", "rate_limited"] {
        assert!(
            log.contains(&format!("reason=\"{reason}\"")),
            "no full line for {reason}:\n{log}"
        );
    }
    assert_eq!(
        relay.metric("vmesh_relay_refused_total", "reason=\"rate_limited\"") as usize,
        limited
    );
    relay.assert_alive();
}

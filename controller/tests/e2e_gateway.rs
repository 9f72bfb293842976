//! Edge gateways on the authenticated xDS port (the relay is on): a real Envoy with the
//! certificate `vmesh-agent --gateway` keeps for it, and clients that try to read or speak for a
//! proxy they are not. Each attempt is refused with a log line and a metric, and changes nothing
//! a proxy gets or what status says.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::IpAddr;

use common::vm::{create_gateway_token, create_token, register, tls_channel, RelayController};
use common::*;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use vmesh_testkit::consul::ConsulEmulator;
use vmesh_testkit::{eventually, free_port, EchoServer};
use vmeshctl::bootstrap::Protocol;

const PROXY: &str = "edge-proxy";
const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

fn routing(consul: &ConsulEmulator, port: u16, upstream: &str, echo_port: u16) {
    let put =
        |what: &str, text: &str| consul.kv_put(&format!("vmesh/config/{what}"), text.as_bytes());
    put("Gateway/edge", &gateway_doc(port, PROXY));
    put(
        &format!("Upstream/{upstream}"),
        &upstream_doc(upstream, echo_port),
    );
    put(
        "VirtualService/web",
        &format!("kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - upstream: {upstream}\n"),
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// A state-of-the-world NACK of the route configuration, as Envoy sends one, for `node`.
fn nack(node: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: node.into(),
            ..Default::default()
        }),
        type_url: ROUTE.into(),
        response_nonce: "1".into(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "spoofed: this config is broken".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn a_gateway_keeps_its_config_flowing_across_certificate_renewals() {
    let consul = ConsulEmulator::start();
    let (v1, v2) = (EchoServer::start("v1"), EchoServer::start("v2"));
    let port = free_port();
    routing(&consul, port, "v1", v1.port());
    // Certificates live 6 s: the gateway renews about every 3 s, and each connection to the
    // xDS port ends when the certificate it was opened with expires.
    let relay = RelayController::start(&consul, &["--agent-cert-ttl", "6s"]);
    let gateway = relay.gateway(&consul, PROXY, Protocol::Delta);
    wait_served_by(port, "/", &[], "v1");

    // Two connections replaced at expiry, each opened with the certificate renewed meanwhile.
    eventually(
        std::time::Duration::from_secs(30),
        "Envoy to reconnect twice",
        || {
            let n = gateway
                .envoy
                .stats_matching("cluster.vmesh_xds.upstream_cx_total")
                .values()
                .sum::<u64>();
            (n >= 3).then_some(()).ok_or(format!("{n} connections"))
        },
    );
    routing(&consul, port, "v2", v2.port());
    wait_served_by(port, "/", &[], "v2");
    // Envoy never presented an expired certificate, and the agent never needed its token again.
    assert_eq!(relay.metric("vmesh_xds_refused_total", ""), 0.0);
    assert!(
        gateway.agent_log().matches("renewed").count() >= 2,
        "{}",
        gateway.agent_log()
    );
    assert_eq!(
        gateway.agent_log().matches("client: registered ").count(),
        1,
        "{}",
        gateway.agent_log()
    );
}

#[test]
fn nobody_but_the_gateway_can_read_its_config_or_reject_it() {
    let consul = ConsulEmulator::start();
    let v1 = EchoServer::start("v1");
    let port = free_port();
    routing(&consul, port, "v1", v1.port());
    let relay = RelayController::start(&consul, &[]);
    let _gateway = relay.gateway(&consul, PROXY, Protocol::Sotw);
    wait_served_by(port, "/", &[], "v1");
    let status_of_web = || {
        consul
            .kv_get("vmesh/status/VirtualService/web")
            .map(|b| String::from_utf8(b).unwrap())
            .unwrap_or_default()
    };
    eventually(DEADLINE, "web to be Accepted", || {
        let s = status_of_web();
        s.contains("\"Accepted\"").then_some(()).ok_or(s)
    });
    let xds = relay.controller.xds_addr();
    let rt = runtime();

    // Plaintext: the port speaks TLS only.
    let plaintext = rt.block_on(async {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}")).await?;
        client
            .stream_aggregated_resources(tokio_stream::iter([nack(PROXY)]))
            .await?
            .into_inner()
            .message()
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    assert!(plaintext.is_err(), "a plaintext client was served");

    // TLS without a client certificate: refused at the handshake.
    let anonymous = rt.block_on(async {
        let channel = tls_channel(&relay, &xds, None, ip(61)).await?;
        AggregatedDiscoveryServiceClient::new(channel)
            .stream_aggregated_resources(tokio_stream::iter([nack(PROXY)]))
            .await
            .map_err(|s| s.to_string())?
            .into_inner()
            .message()
            .await
            .map_err(|s| s.to_string())
    });
    assert!(
        anonymous.is_err(),
        "a client without a certificate was served"
    );

    // An agent's certificate, and another gateway's: valid certificates from the mesh CA, but
    // not this proxy's. Each stream is refused before anything is sent or heard.
    let agent = rt
        .block_on(register(
            &relay,
            &create_token(&consul, None, None, None),
            "vm-62",
            None,
            ip(62),
        ))
        .unwrap();
    let other_token = create_gateway_token(&consul, "other-proxy");
    let other = rt
        .block_on(register(
            &relay,
            &other_token,
            "vm-63",
            Some("other-proxy"),
            ip(63),
        ))
        .unwrap();
    for (who, cert) in [("an agent", &agent), ("another gateway", &other)] {
        let refused = rt.block_on(async {
            let channel = tls_channel(&relay, &xds, Some(cert), ip(64)).await.unwrap();
            AggregatedDiscoveryServiceClient::new(channel)
                .stream_aggregated_resources(tokio_stream::iter([nack(PROXY)]))
                .await
                .unwrap()
                .into_inner()
                .message()
                .await
                .expect_err("the stream was served")
        });
        assert!(
            matches!(
                refused.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            ),
            "{who}: {refused:?}"
        );
    }
    // The spoofed NACKs changed no status, and the controller said why it refused each.
    assert!(
        status_of_web().contains("\"Accepted\""),
        "{}",
        status_of_web()
    );
    assert!(!status_of_web().contains("spoofed"), "{}", status_of_web());
    assert_eq!(
        relay.metric("vmesh_xds_refused_total", "reason=\"node_mismatch\""),
        1.0
    );
    assert_eq!(
        relay.metric("vmesh_xds_refused_total", "reason=\"bad_certificate\""),
        1.0
    );
    assert!(
        relay.metric(
            "vmesh_xds_refused_total",
            "reason=\"no_client_certificate\""
        ) >= 1.0
    );
    let log = relay.controller.log();
    assert!(log.contains("xDS stream refused"), "{log}");
    assert!(
        log.contains("it may not speak for node \\\"edge-proxy\\\""),
        "{log}"
    );
    // The gateway is still served.
    wait_served_by(port, "/", &[], "v1");
}

#[test]
fn tokens_register_only_what_they_were_made_for() {
    let consul = ConsulEmulator::start();
    let relay = RelayController::start(&consul, &[]);
    let rt = runtime();
    let agent_token = create_token(&consul, None, None, None);
    let gateway_token = create_gateway_token(&consul, PROXY);
    let refused = |token: &str, gateway: Option<&str>, n: u8| {
        rt.block_on(register(&relay, token, &format!("vm-{n}"), gateway, ip(n)))
            .err()
            .unwrap()
    };
    let e = refused(&agent_token, Some(PROXY), 71);
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message().contains("token create --gateway edge-proxy"),
        "{e:?}"
    );
    let e = refused(&gateway_token, None, 72);
    assert!(
        e.message()
            .contains("registers the gateway \"edge-proxy\", not agents"),
        "{e:?}"
    );
    let e = refused(&gateway_token, Some("other-proxy"), 73);
    assert!(e.message().contains("not \"other-proxy\""), "{e:?}");
    assert_eq!(
        relay.metric("vmesh_relay_refused_total", "reason=\"token_wrong_scope\""),
        3.0
    );
    // What each was made for works.
    rt.block_on(register(
        &relay,
        &gateway_token,
        "vm-74",
        Some(PROXY),
        ip(74),
    ))
    .unwrap();
    rt.block_on(register(&relay, &agent_token, "vm-75", None, ip(75)))
        .unwrap();
}

#[test]
fn a_connection_that_finishes_tls_and_says_nothing_is_closed() {
    use std::sync::Arc;
    use tokio::io::AsyncReadExt as _;

    let consul = ConsulEmulator::start();
    let relay = RelayController::start(&consul, &["--first-bytes-timeout", "1s"]);
    let ca = std::fs::read_to_string(relay.ca_file()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let rt = runtime();
    let (closed, closed_after) = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(relay.relay_addr())
            .await
            .unwrap();
        let name =
            rustls::pki_types::ServerName::try_from(vmesh_tls::CONTROLLER_SERVER_NAME).unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let t0 = std::time::Instant::now();
        // Say nothing (but read what the server says first: its HTTP/2 SETTINGS); the
        // controller closes the connection.
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(DEADLINE, async {
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        (read.is_ok(), t0.elapsed())
    });
    assert!(closed, "the connection was never closed");
    assert!(
        closed_after >= std::time::Duration::from_millis(900),
        "closed after {closed_after:?}, before the deadline"
    );
    relay.assert_alive();
}

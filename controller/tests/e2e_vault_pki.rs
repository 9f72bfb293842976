//! Vault as the mesh's CA and its secret store, with the relay on: agents and the edge gateway
//! get their certificates signed by Vault PKI (`pki/sign/vmesh`) and renew them there, the
//! gateway's Envoy takes its config over the mutual-TLS xDS port with that certificate and
//! serves HTTPS with a certificate from Vault KV; another proxy, with a valid certificate of its
//! own, gets none of the gateway's secrets.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::vm::{
    create_gateway_token, create_token, register, route_to_consul_service, tls_channel,
    RelayController, WebVm,
};
use common::*;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use serde_json::json;
use vmesh_testkit::consul::ConsulEmulator;
use vmesh_testkit::tls::{https_get, TestCa};
use vmesh_testkit::vault::VaultEmulator;
use vmesh_testkit::{eventually, free_port, request};
use vmeshctl::bootstrap::Protocol;

const PROXY: &str = "gateway-proxy";
const ROOT: &str = "vmesh-pki-root-token-4d2e";
const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

fn vault_call(vault: &VaultEmulator, method: &str, path: &str, body: serde_json::Value) {
    let body = body.to_string();
    let r = request(
        method,
        &format!("{}/v1/{path}", vault.url()),
        &[("x-vault-token", ROOT)],
        Some(body.as_bytes()),
    )
    .unwrap();
    assert!(r.status < 300, "{method} {path}: {r:?}");
}

/// Vault set up as docs/tls.md says: the role that signs agents, gateways and controllers, and
/// the gateway's certificate in KV.
fn vault(ca: &TestCa) -> VaultEmulator {
    let vault = VaultEmulator::start_with_root_token(ROOT);
    vault_call(
        &vault,
        "POST",
        "pki/roles/vmesh",
        json!({
            "allowed_domains": "vmesh-controller",
            "allow_bare_domains": true,
            "allowed_uri_sans": "spiffe://vmesh/*",
            "require_cn": false,
            "max_ttl": "1h",
        }),
    );
    let shop = ca.issue(&["shop.example.com"], 30);
    vault_call(
        &vault,
        "POST",
        "secret/data/vmesh/tls/shop",
        json!({"data": {"cert": shop.cert_pem, "key": shop.key_pem}}),
    );
    vault
}

/// A controller with its relay on, Vault PKI as the mesh CA and Vault KV for secrets; agents
/// renew about every 3 s. Agents are given Vault's CA as their `--ca-file`.
fn relay_on_vault(
    consul: &ConsulEmulator,
    vault: &VaultEmulator,
    extra: &[&str],
) -> RelayController {
    let vault_ca = vmesh_testkit::process::scratch_dir("vault-pki").join("ca.pem");
    std::fs::write(&vault_ca, vault.pki_ca_pem()).unwrap();
    let url = vault.url();
    let mut args = vec![
        "--vault-addr",
        url.as_str(),
        "--vault-token",
        ROOT,
        "--vault-pki-mount",
        "pki",
        "--agent-cert-ttl",
        "6s",
    ];
    args.extend_from_slice(extra);
    RelayController::start_with_ca_file(consul, &args, Some(vault_ca))
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

#[test]
fn agents_and_gateways_get_certificates_from_vault_pki_and_https_from_vault_kv() {
    let consul = ConsulEmulator::start();
    let ca = TestCa::new("shop CA");
    let vault = vault(&ca);
    let (http, https) = (free_port(), free_port());
    route_to_consul_service(&consul, http, PROXY);
    consul.kv_put(
        "vmesh/config/Gateway/https",
        format!(
            "kind: Gateway\nname: https\nspec:\n  bindPort: {https}\n  proxyNames: [{PROXY}]\n  tls:\n    certificates:\n      - secret: vmesh/tls/shop\n"
        )
        .as_bytes(),
    );
    // Secrets polled every 200 ms.
    let relay = relay_on_vault(&consul, &vault, &["--vault-poll-interval", "200ms"]);

    // An agent on a VM registers and renews through Vault PKI; its service gets traffic.
    let mut web = WebVm::new(71);
    let token = create_token(&consul, None, None, None);
    web.vm.start_agent(&relay, &token, &[]);
    // The gateway's certificate for the xDS port comes from Vault PKI too.
    let _gateway = relay.gateway(&consul, PROXY, Protocol::Delta);
    wait_served_by(http, "/", &[], "web@vm-71");
    eventually(
        Duration::from_secs(30),
        "two renewals through Vault PKI",
        || {
            let n = relay.metric("vmesh_relay_renewals_total", "");
            (n >= 2.0).then_some(()).ok_or(format!("{n} renewals"))
        },
    );
    wait_served_by(http, "/", &[], "web@vm-71");
    // No built-in CA was made.
    assert!(!relay.ca_key().exists());

    // HTTPS with the certificate from Vault KV, over SDS on the authenticated stream.
    eventually(DEADLINE, "HTTPS served", || {
        let r = https_get(https, "shop.example.com", "/", ca.pem())?;
        (r.status == 200 && r.header("x-served-by") == Some("web@vm-71"))
            .then_some(())
            .ok_or(format!("status {}", r.status))
    });

    // Another gateway, with a valid certificate of its own, asks for this one's secret by name:
    // it is never sent. The same request with this gateway's own certificate gets it, so the
    // request is one that would be answered.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let xds = relay.controller.xds_addr();
    let ask = |node: &str, cert: &common::vm::ClientCert| -> Vec<DiscoveryResponse> {
        rt.block_on(async {
            let channel = tls_channel(&relay, &xds, Some(cert), ip(72)).await.unwrap();
            let request = DiscoveryRequest {
                node: Some(Node {
                    id: node.into(),
                    ..Default::default()
                }),
                type_url: SECRET_TYPE.into(),
                resource_names: vec!["cert:vmesh/tls/shop".into()],
                ..Default::default()
            };
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(request).await.unwrap();
            let mut stream = AggregatedDiscoveryServiceClient::new(channel)
                .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let mut got = Vec::new();
            while let Ok(Ok(Some(r))) =
                tokio::time::timeout(Duration::from_secs(2), stream.message()).await
            {
                got.push(r);
            }
            drop(tx);
            got
        })
    };
    let other_token = create_gateway_token(&consul, "other-proxy");
    let other = rt
        .block_on(register(
            &relay,
            &other_token,
            "vm-73",
            Some("other-proxy"),
            ip(73),
        ))
        .unwrap();
    let answers = ask("other-proxy", &other);
    assert!(
        answers.iter().all(|r| r.resources.is_empty()),
        "another proxy got secrets: {answers:?}"
    );
    let own_token = create_gateway_token(&consul, PROXY);
    let own = rt
        .block_on(register(&relay, &own_token, "vm-74", Some(PROXY), ip(74)))
        .unwrap();
    let answers = ask(PROXY, &own);
    assert!(
        answers.iter().any(|r| r.resources.len() == 1),
        "the gateway's own certificate did not get its secret: {answers:?}"
    );
}

#[test]
fn a_rotation_of_vaults_ca_keeps_agents_and_the_gateway_connected() {
    let consul = ConsulEmulator::start();
    let ca = TestCa::new("shop CA");
    let vault = vault(&ca);
    let http = free_port();
    route_to_consul_service(&consul, http, PROXY);
    // The CA read every 200 ms; the controller's certificate lives 12 s.
    let relay = relay_on_vault(&consul, &vault, &["--vault-pki-poll-interval", "200ms"]);
    let mut web = WebVm::new(75);
    web.vm
        .start_agent(&relay, &create_token(&consul, None, None, None), &[]);
    let gateway = relay.gateway(&consul, PROXY, Protocol::Delta);
    wait_served_by(http, "/", &[], "web@vm-75");

    // The operator rotates the root. The controller trusts both, keeps its own certificate from
    // the old one until the agents have renewed (and learnt the new one), then moves.
    let new_ca = vault.rotate_pki_root();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let relay_addr = relay.relay_addr();
    eventually(
        Duration::from_secs(30),
        "the controller's certificate from the new CA",
        || {
            rt.block_on(vmesh_testkit::relay::tls_channel(
                &relay_addr,
                &new_ca,
                None,
                ip(76),
            ))
            .map(|_| ())
        },
    );
    // After the move, the agent and the gateway still renew over the relay, and a config change
    // still reaches the gateway's Envoy over the mutual-TLS xDS port.
    let renewed = relay.metric("vmesh_relay_renewals_total", "");
    eventually(Duration::from_secs(30), "renewals after the move", || {
        let n = relay.metric("vmesh_relay_renewals_total", "");
        (n >= renewed + 4.0)
            .then_some(())
            .ok_or(format!("{n} renewals, {renewed} at the move"))
    });
    let connected = relay.metric("vmesh_relay_agents_connected", "");
    assert!(connected >= 1.0, "{connected} agents connected");
    consul.kv_put(
        "vmesh/config/VirtualService/after",
        b"kind: VirtualService\nname: after\nspec:\n  domains: [after.example]\n  routes:\n    - directResponse:\n        status: 200\n        body: after the rotation\n",
    );
    eventually(DEADLINE, "a change after the rotation served", || {
        let r = get(http, "/", &[("host", "after.example")])?;
        (r.status == 200 && r.body == "after the rotation")
            .then_some(())
            .ok_or(format!(
                "{} {}; status {:?}; envoy connected {:?}; {}",
                r.status,
                r.body,
                relay.controller.object("VirtualService", "after"),
                gateway.envoy.stat("control_plane.connected_state"),
                vmesh_testkit::process::tail(&gateway.envoy.log(), 5)
            ))
    });
    wait_served_by(http, "/", &[], "web@vm-75");
}

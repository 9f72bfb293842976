//! Hostile documents against a running controller on Consul KV, with a real Envoy: one write
//! must never crash, stall or blind the control plane. Each scenario is a finding of the probe
//! recorded in the hostile-input issue, and fails without the limits of `docs/limits.md`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use vmesh_model::limits::{MAX_DOCUMENT_BYTES, MAX_PROBLEM_TEXT};
use vmesh_testkit::consul::{ConsulEmulator, ConsulOptions};
use vmesh_testkit::{eventually, free_port, EchoServer};
use vmeshctl::bootstrap::Protocol;

const PROXY: &str = "gateway-proxy";

fn vs_to(upstream: &str) -> String {
    format!("kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - upstream: {upstream}\n")
}

fn put(consul: &ConsulEmulator, what: &str, text: &str) {
    consul.kv_put(&format!("vmesh/config/{what}"), text.as_bytes());
}

#[track_caller]
fn wait_status(consul: &ConsulEmulator, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    eventually(DEADLINE, &format!("the status of {what}"), || {
        let bytes = consul
            .kv_get(&format!("vmesh/status/{what}"))
            .ok_or("no status key")?;
        let s: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if check(&s) {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
}

/// ~490 KiB of YAML whose one 200 KB anchor is used 70,000 times: about 14 GB expanded.
fn alias_bomb() -> String {
    let big = "x".repeat(200_000);
    let aliases = "*x, ".repeat(70_000);
    format!("kind: Upstream\nname: bomb\nspec:\n  static:\n    hosts: [&x \"{big}\", {aliases}]\n")
}

/// Flow mappings nested 60,000 deep: minutes for the YAML parser if it ever saw them.
fn deep_nesting() -> String {
    format!(
        "kind: Upstream\nname: deep\nspec: {}1{}\n",
        "{a: ".repeat(60_000),
        "}".repeat(60_000)
    )
}

/// A split over 14,000 upstreams that do not exist: 14 s to translate and a 1.7 MB status
/// before the limits.
fn wide_split() -> String {
    let backends: Vec<String> = (0..14_000)
        .map(|i| format!("{{upstream: m{i}, weight: 1}}"))
        .collect();
    format!(
        "kind: VirtualService\nname: wide\nspec:\n  domains: [wide.example.com]\n  routes:\n    - split: [{}]\n",
        backends.join(", ")
    )
}

#[test]
fn hostile_kv_writes_are_rejected_on_their_field_and_delay_nothing_else() {
    let consul = ConsulEmulator::start_with(ConsulOptions {
        session_ttl_min: Duration::from_secs(1),
        ..Default::default()
    });
    let (v1, v2) = (EchoServer::start("v1"), EchoServer::start("v2"));
    let port = free_port();
    put(&consul, "Gateway/edge", &gateway_doc(port, PROXY));
    put(&consul, "Upstream/v1", &upstream_doc("v1", v1.port()));
    put(&consul, "Upstream/v2", &upstream_doc("v2", v2.port()));
    put(&consul, "VirtualService/web", &vs_to("v1"));
    let mut c = Controller::consul(&consul.url(), &[]);
    let _envoy = c.envoy(PROXY, Protocol::Delta);
    wait_served_by(port, "/", &[], "v1");

    // All three at once, then an ordinary change right behind them.
    let bomb = alias_bomb();
    assert!(bomb.len() < MAX_DOCUMENT_BYTES, "{}", bomb.len());
    put(&consul, "Upstream/bomb", &bomb);
    put(&consul, "Upstream/deep", &deep_nesting());
    let wide = wide_split();
    assert!(wide.len() < MAX_DOCUMENT_BYTES, "{}", wide.len());
    put(&consul, "VirtualService/wide", &wide);
    put(&consul, "VirtualService/web", &vs_to("v2"));
    // The ordinary change goes through (a slow document would hold it up; a crash would end it).
    wait_served_by(port, "/", &[], "v2");

    let bomb = wait_status(&consul, "Upstream/bomb", |s| s["state"] == "Rejected");
    let error = &bomb["errors"][0];
    assert!(
        error["path"]
            .as_str()
            .unwrap()
            .starts_with("spec.static.hosts["),
        "{bomb}"
    );
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("aliases included"),
        "{bomb}"
    );
    let deep = wait_status(&consul, "Upstream/deep", |s| s["state"] == "Rejected");
    assert!(
        deep["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("nest more than 64 levels"),
        "{deep}"
    );
    let wide = wait_status(&consul, "VirtualService/wide", |s| s["state"] == "Rejected");
    assert_eq!(wide["errors"][0]["path"], "spec.routes[0].split", "{wide}");
    // Every status stays small: long lists summarised, long values quoted in part.
    for what in ["Upstream/bomb", "Upstream/deep", "VirtualService/wide"] {
        let bytes = consul.kv_get(&format!("vmesh/status/{what}")).unwrap();
        assert!(bytes.len() < 16 * 1024, "{what}: {} bytes", bytes.len());
        let status: Value = serde_json::from_slice(&bytes).unwrap();
        for p in status["errors"].as_array().unwrap() {
            assert!(p["message"].as_str().unwrap().len() <= MAX_PROBLEM_TEXT + 64);
        }
    }
    assert_eq!(c.try_exit(), None, "the controller is still running");
    // And it still follows changes.
    put(&consul, "VirtualService/web", &vs_to("v1"));
    wait_served_by(port, "/", &[], "v1");
}

#[test]
fn a_duplicate_key_is_refused_rather_than_the_last_one_winning() {
    let consul = ConsulEmulator::start();
    let (v1, v2) = (EchoServer::start("v1"), EchoServer::start("v2"));
    let port = free_port();
    put(&consul, "Gateway/edge", &gateway_doc(port, PROXY));
    put(&consul, "Upstream/v1", &upstream_doc("v1", v1.port()));
    put(&consul, "Upstream/v2", &upstream_doc("v2", v2.port()));
    put(&consul, "VirtualService/web", &vs_to("v1"));
    let c = Controller::consul(&consul.url(), &[]);
    let _envoy = c.envoy(PROXY, Protocol::Delta);
    wait_served_by(port, "/", &[], "v1");
    // A merge gone wrong: two `upstream` keys. Before, the last one (v2) won silently.
    put(
        &consul,
        "VirtualService/web",
        "kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - upstream: v1\n      upstream: v2\n",
    );
    let status = wait_status(&consul, "VirtualService/web", |s| s["state"] == "Rejected");
    assert_eq!(
        status["errors"][0]["path"], "spec.routes[0].upstream",
        "{status}"
    );
    assert_eq!(status["servingLastGood"], true);
    wait_served_by(port, "/", &[], "v1");
}

//! End to end: a controller reading a config directory, a real Envoy it
//! configures (delta and state of the world), and echo upstreams behind it.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use vmesh_testkit::{eventually, free_port, request, EchoServer, HttpClient};
use vmeshctl::bootstrap::Protocol;

const PROXY: &str = "gateway-proxy";

macro_rules! for_each_protocol {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[test]
            fn delta() {
                super::$scenario(vmeshctl::bootstrap::Protocol::Delta);
            }

            #[test]
            fn sotw() {
                super::$scenario(vmeshctl::bootstrap::Protocol::Sotw);
            }
        }
    )*};
}

struct Mesh {
    v1: EchoServer,
    v2: EchoServer,
    port: u16,
    controller: Controller,
}

/// Two upstreams (v1, v2), a gateway on a free port and the given virtual service.
fn mesh(virtual_service: &str) -> Mesh {
    let v1 = EchoServer::start("v1");
    let v2 = EchoServer::start("v2");
    let port = free_port();
    let upstreams = format!(
        "{}---\n{}",
        upstream_doc("v1", v1.port()),
        upstream_doc("v2", v2.port())
    );
    let controller = Controller::start(&[
        ("gateway.yaml", &gateway_doc(port, PROXY)),
        ("upstreams.yaml", &upstreams),
        ("web.yaml", virtual_service),
    ]);
    Mesh {
        v1,
        v2,
        port,
        controller,
    }
}

const ROUTES: &str = r#"
kind: VirtualService
name: web
spec:
  domains: ["*"]
  routes:
    - match: {prefix: /, headers: [{name: x-version, value: v2}]}
      upstream: v2
    - match: {exact: /exact}
      upstream: v2
    - match: {regex: "/items/[0-9]+"}
      upstream: v2
    - match: {prefix: /write, methods: [POST, PUT]}
      upstream: v2
    - match: {prefix: /q, queryParameters: [{name: beta, value: "1"}]}
      upstream: v2
    - match: {prefix: /old/}
      redirect: {prefixRewrite: /new/, responseCode: 302}
    - match: {exact: /healthz}
      directResponse: {status: 200, body: "ok"}
    - match: {prefix: /api/}
      upstream: v2
      options:
        prefixRewrite: /
        requestHeaders: {add: [{name: x-added, value: "yes"}]}
        responseHeaders: {add: [{name: x-resp, value: r}]}
    - upstream: v1
"#;

fn traffic_is_routed_per_config(protocol: Protocol) {
    let m = mesh(ROUTES);
    let _envoy = m.controller.envoy(PROXY, protocol);
    let p = m.port;
    wait_served_by(p, "/", &[], "v1");

    let by = |path: &str, headers: &[(&str, &str)]| served_by(&get(p, path, headers).unwrap());
    assert_eq!(by("/", &[("x-version", "v2")]), "v2", "header match");
    assert_eq!(
        by("/", &[("x-version", "v3")]),
        "v1",
        "header value must match exactly"
    );
    assert_eq!(by("/exact", &[]), "v2", "exact path");
    assert_eq!(by("/exact/more", &[]), "v1", "exact is not a prefix");
    assert_eq!(by("/items/42", &[]), "v2", "regex path");
    assert_eq!(
        by("/items/abc", &[]),
        "v1",
        "regex must match the whole path"
    );
    assert_eq!(by("/q?beta=1", &[]), "v2", "query parameter");
    assert_eq!(by("/q?beta=2", &[]), "v1", "query parameter value");

    let url = format!("http://127.0.0.1:{p}/write");
    assert_eq!(
        served_by(&request("POST", &url, &[], Some(b"x")).unwrap()),
        "v2",
        "method POST"
    );
    assert_eq!(
        served_by(&request("PUT", &url, &[], Some(b"x")).unwrap()),
        "v2",
        "method PUT"
    );
    assert_eq!(
        served_by(&request("GET", &url, &[], None).unwrap()),
        "v1",
        "method GET"
    );

    let r = get(p, "/old/page", &[]).unwrap();
    assert_eq!(r.status, 302, "redirect");
    assert!(
        r.header("location").unwrap().ends_with("/new/page"),
        "{r:?}"
    );

    let r = get(p, "/healthz", &[]).unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ok"), "direct response");

    let r = get(p, "/api/orders", &[]).unwrap();
    assert_eq!(served_by(&r), "v2");
    let echo = r.json().unwrap();
    assert_eq!(echo["path"], "/orders", "prefix rewrite");
    assert_eq!(echo["headers"]["x-added"], "yes", "request header added");
    assert_eq!(r.header("x-resp"), Some("r"), "response header added");

    // Every object is accepted and acknowledged by the one proxy.
    eventually(
        DEADLINE,
        "status to show the proxy acked everything",
        || {
            let s = m
                .controller
                .object("VirtualService", "web")
                .ok_or("no status")?;
            (s["state"] == "Accepted" && s["proxies"]["acked"] == 1 && s["proxies"]["total"] == 1)
                .then_some(())
                .ok_or(format!("{s}"))
        },
    );
}

const TO_V1: &str =
    "kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - upstream: v1\n";
const TO_V2: &str =
    "kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - upstream: v2\n";

fn edits_change_routing_and_bad_edits_are_rejected(protocol: Protocol) {
    let m = mesh(TO_V1);
    let _envoy = m.controller.envoy(PROXY, protocol);
    wait_served_by(m.port, "/", &[], "v1");

    // A file edit moves the traffic.
    m.controller.write("web.yaml", TO_V2);
    wait_served_by(m.port, "/", &[], "v2");

    // An invalid edit is rejected with the field at fault; traffic stays on the last good config.
    m.controller.write(
        "web.yaml",
        "kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - match: {regex: \"/(unclosed\"}\n      upstream: v1\n",
    );
    let status = eventually(DEADLINE, "the invalid edit to be rejected", || {
        let s = m
            .controller
            .object("VirtualService", "web")
            .ok_or("no status")?;
        (s["state"] == "Rejected")
            .then_some(s.clone())
            .ok_or(format!("{s}"))
    });
    assert_eq!(
        status["errors"][0]["path"], "spec.routes[0].match.regex",
        "{status}"
    );
    assert_eq!(status["servingLastGood"], true);
    assert!(status["servingVersion"].is_string(), "{status}");
    assert_ne!(status["servingVersion"], status["version"], "{status}");
    for _ in 0..20 {
        assert_eq!(
            served_by(&get(m.port, "/", &[]).unwrap()),
            "v2",
            "last good config keeps serving"
        );
    }

    // An unknown field is named too.
    m.controller.write(
        "web.yaml",
        "kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - upstream: v1\n      timeoutt: 5s\n",
    );
    eventually(DEADLINE, "the unknown field to be reported", || {
        let s = m
            .controller
            .object("VirtualService", "web")
            .ok_or("no status")?;
        let path = s["errors"][0]["path"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        (path.starts_with("spec.routes[0]"))
            .then_some(())
            .ok_or(format!("{s}"))
    });

    // Fixing it applies the fix.
    m.controller.write("web.yaml", TO_V1);
    wait_served_by(m.port, "/", &[], "v1");
    let s = m.controller.object("VirtualService", "web").unwrap();
    assert_eq!(s["state"], "Accepted", "{s}");

    // Deleting the file removes the routes.
    m.controller.remove("web.yaml");
    eventually(DEADLINE, "routes to be removed", || {
        let r = get(m.port, "/", &[])?;
        (r.status == 404)
            .then_some(())
            .ok_or(format!("status {}", r.status))
    });
    assert!(m.controller.object("VirtualService", "web").is_none());
}

fn weighted_split_follows_weights(protocol: Protocol) {
    let m = mesh(
        "kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - split:\n        - {upstream: v1, weight: 75}\n        - {upstream: v2, weight: 25}\n",
    );
    let _envoy = m.controller.envoy(PROXY, protocol);
    eventually(DEADLINE, "the split to be served", || {
        let r = get(m.port, "/", &[])?;
        (r.status == 200)
            .then_some(())
            .ok_or(format!("status {}", r.status))
    });
    let client = HttpClient::pooled();
    let n = 2000;
    let (v1_before, v2_before) = (m.v1.requests(), m.v2.requests());
    for _ in 0..n {
        let r = client
            .get(&format!("http://127.0.0.1:{}/", m.port), &[])
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let v1 = (m.v1.requests() - v1_before) as f64 / n as f64;
    let v2 = (m.v2.requests() - v2_before) as f64 / n as f64;
    // 2000 draws at p = 0.25: one standard deviation is about 1 %; allow 4.
    assert!((v1 - 0.75).abs() < 0.04, "v1 share {v1}");
    assert!((v2 - 0.25).abs() < 0.04, "v2 share {v2}");
}

/// Route changes under steady load: alternating targets, a new upstream that
/// the route moves to, and the old one removed. Not one request may fail.
fn no_request_fails_while_routes_change(protocol: Protocol) {
    let m = mesh(TO_V1);
    let _envoy = m.controller.envoy(PROXY, protocol);
    wait_served_by(m.port, "/", &[], "v1");
    let v3 = EchoServer::start("v3");

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let url = format!("http://127.0.0.1:{}/", m.port);
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, sent, url) = (stop.clone(), sent.clone(), url.clone());
            std::thread::spawn(move || {
                let client = HttpClient::pooled();
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match client.get(&url, &[]) {
                        Ok(r) if r.status == 200 => {}
                        Ok(r) => failures.push(format!("status {}: {}", r.status, r.body)),
                        Err(e) => failures.push(e),
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                failures
            })
        })
        .collect();

    let upstreams = |extra: bool| {
        let mut s = format!(
            "{}---\n{}",
            upstream_doc("v1", m.v1.port()),
            upstream_doc("v2", m.v2.port())
        );
        if extra {
            s.push_str(&format!("---\n{}", upstream_doc("v3", v3.port())));
        }
        s
    };
    let to_v3 = TO_V1.replace("upstream: v1", "upstream: v3");
    for round in 0..6 {
        m.controller.write("web.yaml", TO_V2);
        wait_served_by(m.port, "/", &[], "v2");
        // A new upstream and a route to it in one step.
        m.controller.write("upstreams.yaml", &upstreams(true));
        m.controller.write("web.yaml", &to_v3);
        wait_served_by(m.port, "/", &[], "v3");
        // Back to v1, and the new upstream removed at the same time.
        m.controller.write("web.yaml", TO_V1);
        m.controller.write("upstreams.yaml", &upstreams(false));
        wait_served_by(m.port, "/", &[], "v1");
        eprintln!(
            "round {round}: {} requests so far",
            sent.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = load.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let total = sent.load(Ordering::Relaxed);
    assert!(total > 100, "the load ran ({total} requests)");
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed during route changes, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

/// A config Envoy refuses (here an Envoy without vmeshctl's RE2 limit, given a regex over
/// RE2's default one) is reported on the object that produced it, and the proxy keeps its last
/// good config.
fn a_proxy_rejection_is_reported_on_its_object(protocol: Protocol) {
    let m = mesh(TO_V1);
    let envoy = m.controller.envoy_with_default_re2_limit(PROXY, protocol);
    wait_served_by(m.port, "/", &[], "v1");

    m.controller.write(
        "web.yaml",
        "kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - match: {regex: \"/[^/]{1,64}\"}\n      upstream: v2\n    - upstream: v2\n",
    );
    let status = eventually(DEADLINE, "the proxy's rejection to be reported", || {
        let s = m
            .controller
            .object("VirtualService", "web")
            .ok_or("no status")?;
        (s["state"] == "Rejected")
            .then_some(s.clone())
            .ok_or(format!("{s}"))
    });
    let message = status["errors"][0]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("proxy gateway-proxy rejected"),
        "{message}"
    );
    let rejected: u64 = envoy.stats_matching("rds.*update_rejected").values().sum();
    assert!(rejected >= 1, "Envoy counted the rejection");
    for _ in 0..10 {
        assert_eq!(
            served_by(&get(m.port, "/", &[]).unwrap()),
            "v1",
            "the proxy keeps its last good config"
        );
    }

    // Fixing the object clears the rejection and applies the fix.
    m.controller.write("web.yaml", TO_V2);
    wait_served_by(m.port, "/", &[], "v2");
    eventually(DEADLINE, "the status to be Accepted again", || {
        let s = m
            .controller
            .object("VirtualService", "web")
            .ok_or("no status")?;
        (s["state"] == "Accepted")
            .then_some(())
            .ok_or(format!("{s}"))
    });
    let metrics = vmesh_testkit::http_get(&m.controller.admin("/metrics"), &[])
        .unwrap()
        .body;
    assert!(
        metrics.contains("vmesh_xds_nacks_total{type=\"route\"} 1"),
        "{metrics}"
    );
}

/// The controller goes away and comes back: Envoy keeps serving its last config
/// meanwhile, reconnects, and — versions being content hashes — is sent nothing.
fn a_controller_restart_resends_nothing(protocol: Protocol) {
    let mut m = mesh(ROUTES);
    let envoy = m.controller.envoy(PROXY, protocol);
    wait_served_by(m.port, "/", &[], "v1");
    let updates = || -> Vec<u64> {
        [
            "cluster_manager.cds.update_success",
            "listener_manager.lds.update_success",
        ]
        .iter()
        .map(|s| envoy.stat(s).unwrap_or(0))
        .chain([envoy
            .stats_matching("rds.*update_success")
            .values()
            .sum::<u64>()])
        .collect()
    };
    let before = updates();

    m.controller.kill();
    for _ in 0..10 {
        assert_eq!(
            served_by(&get(m.port, "/", &[]).unwrap()),
            "v1",
            "Envoy serves on its own"
        );
    }
    m.controller.restart();
    eventually(DEADLINE, "Envoy to reconnect and be in sync", || {
        let s = m.controller.status();
        let p = &s["proxies"][0];
        (p["connected"] == 1
            && p["inSync"] == true
            && envoy.stat("control_plane.connected_state") == Some(1))
        .then_some(())
        .ok_or(format!("{p}"))
    });
    assert_eq!(updates(), before, "nothing was resent after the reconnect");
    assert_eq!(
        served_by(&get(m.port, "/", &[("x-version", "v2")]).unwrap()),
        "v2"
    );
}

// Every scenario runs once per xDS protocol, as `<scenario>::delta` and `<scenario>::sotw`.
for_each_protocol!(
    traffic_is_routed_per_config,
    edits_change_routing_and_bad_edits_are_rejected,
    weighted_split_follows_weights,
    no_request_fails_while_routes_change,
    a_proxy_rejection_is_reported_on_its_object,
    a_controller_restart_resends_nothing,
);

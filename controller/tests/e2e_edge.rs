//! Config shapes that vmesh accepted and Envoy refused (each NACKed the gateway's whole route
//! configuration, freezing every virtual service on it), and edge behaviour a client sees: each
//! through a real Envoy, with a change to another virtual service right behind it to show
//! nothing froze.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use vmesh_testkit::{eventually, free_port, EchoServer, ECHO_STATUS_HEADER};
use vmeshctl::bootstrap::Protocol;

const PROXY: &str = "edge-proxy";

fn gateway(port: u16) -> String {
    gateway_doc(port, PROXY)
}

fn vs(name: &str, domain: &str, routes: &str) -> String {
    format!(
        "kind: VirtualService\nname: {name}\nspec:\n  domains: [{domain:?}]\n  routes:\n{routes}\n"
    )
}

/// `other.example` served by `upstream`: the change that must keep flowing.
fn other(upstream: &str) -> String {
    vs(
        "other",
        "other.example",
        &format!("    - upstream: {upstream}"),
    )
}

fn host(h: &str) -> Vec<(&'static str, String)> {
    vec![("host", h.to_string())]
}

fn get_with(port: u16, path: &str, headers: &[(&str, &str)]) -> vmesh_testkit::Response {
    get(port, path, headers).unwrap()
}

/// Starts a controller on `files` plus a gateway, the upstreams v1 and v2 and `other` → v1, and
/// an Envoy; waits until `other.example` is served.
struct Edge {
    c: Controller,
    _envoy: vmesh_testkit::Envoy,
    port: u16,
    v1: EchoServer,
    _v2: EchoServer,
}

impl Edge {
    fn start(files: &[(&str, &str)]) -> Edge {
        Self::starting(files, |c| c.envoy(PROXY, Protocol::Delta))
    }

    /// [`Edge::start`] with an Envoy that refuses regexes over RE2's default limit.
    fn start_with(files: &[(&str, &str)], protocol: Protocol) -> Edge {
        Self::starting(files, |c| c.envoy_with_default_re2_limit(PROXY, protocol))
    }

    fn starting(
        files: &[(&str, &str)],
        envoy: impl FnOnce(&Controller) -> vmesh_testkit::Envoy,
    ) -> Edge {
        let (v1, v2) = (EchoServer::start("v1"), EchoServer::start("v2"));
        let port = free_port();
        let mut all: Vec<(String, String)> = vec![
            ("gateway.yaml".into(), gateway(port)),
            ("v1.yaml".into(), upstream_doc("v1", v1.port())),
            ("v2.yaml".into(), upstream_doc("v2", v2.port())),
            ("other.yaml".into(), other("v1")),
        ];
        all.extend(files.iter().map(|(n, t)| (n.to_string(), t.to_string())));
        let refs: Vec<(&str, &str)> = all.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
        let c = Controller::start_with(&refs, &[]);
        let envoy = envoy(&c);
        wait_served_by(port, "/", &[("host", "other.example")], "v1");
        Edge {
            c,
            _envoy: envoy,
            port,
            v1,
            _v2: v2,
        }
    }

    /// A change to `other` reaches Envoy, and no NACK was ever reported: the gateway's routes
    /// are not frozen.
    fn still_flowing(&self) {
        self.c.write("other.yaml", &other("v2"));
        wait_served_by(self.port, "/", &[("host", "other.example")], "v2");
        let status = self.c.status();
        assert!(
            !status.to_string().contains("proxy rejected"),
            "a NACK was reported: {status}"
        );
        assert!(
            !self.c.log().contains("proxy rejected config"),
            "Envoy rejected config: {}",
            self.c.log()
        );
    }
}

#[test]
fn a_direct_response_body_over_4_kib_is_served() {
    let body = "x".repeat(10 * 1024);
    let e = Edge::start(&[(
        "big.yaml",
        &vs(
            "big",
            "big.example",
            &format!("    - directResponse: {{status: 200, body: {body:?}}}"),
        ),
    )]);
    eventually(DEADLINE, "the 10 KiB body", || {
        let r = get(e.port, "/", &[("host", "big.example")])?;
        (r.status == 200 && r.body.len() == body.len())
            .then_some(())
            .ok_or(format!("{} {} bytes", r.status, r.body.len()))
    });
    e.still_flowing();
}

#[test]
fn a_split_whose_only_weighted_backend_is_missing_answers_503_and_freezes_nothing() {
    // {v1: 0}, {ghost: 100}: before, sent with a zero weight sum, which Envoy refuses.
    let e = Edge::start(&[(
        "canary.yaml",
        &vs(
            "canary",
            "canary.example",
            "    - split: [{upstream: v1, weight: 0}, {upstream: ghost, weight: 100}]",
        ),
    )]);
    eventually(DEADLINE, "503 for canary.example", || {
        let r = get(e.port, "/", &[("host", "canary.example")])?;
        (r.status == 503).then_some(()).ok_or(r.status.to_string())
    });
    e.still_flowing();
}

#[test]
fn a_canary_keeps_its_share_when_the_stable_upstream_disappears() {
    let e = Edge::start(&[(
        "canary.yaml",
        &vs(
            "canary",
            "canary.example",
            "    - split: [{upstream: stable, weight: 95}, {upstream: v2, weight: 5}]",
        ),
    )]);
    let h = host("canary.example");
    let headers: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    eventually(DEADLINE, "the canary route", || {
        let r = get(e.port, "/", &headers)?;
        matches!(r.status, 200 | 503)
            .then_some(())
            .ok_or(r.status.to_string())
    });
    let (mut unavailable, mut canary) = (0, 0);
    for _ in 0..400 {
        let r = get_with(e.port, "/", &headers);
        match (r.status, served_by(&r).as_str()) {
            (503, _) => unavailable += 1,
            (200, "v2") => canary += 1,
            other => panic!("unexpected answer {other:?}"),
        }
        // The missing upstream is not named to clients.
        assert!(!r.body.contains("stable"), "{}", r.body);
    }
    // 95 % of the traffic stays with the (missing) stable upstream: answered 503, never moved.
    assert!(unavailable >= 340, "{unavailable} of 400 answered 503");
    assert!(
        (1..=60).contains(&canary),
        "{canary} of 400 reached the canary"
    );
    let warning = e.c.object("VirtualService", "canary").unwrap();
    assert!(
        warning
            .to_string()
            .contains("its share (95 of 100) is answered 503"),
        "{warning}"
    );
    e.still_flowing();
}

#[test]
fn retries_on_status_codes_and_headers_are_sent_and_fire() {
    let e = Edge::start(&[(
        "retry.yaml",
        &vs(
            "retry",
            "retry.example",
            "    - upstream: v1\n      options:\n        retries:\n          attempts: 2\n          retryOn: retriable-status-codes\n          retriableStatusCodes: [418]",
        ),
    )]);
    eventually(DEADLINE, "the retry route", || {
        let r = get(e.port, "/", &[("host", "retry.example")])?;
        (served_by(&r) == "v1")
            .then_some(())
            .ok_or(r.status.to_string())
    });
    let before = e.v1.requests();
    let r = get_with(
        e.port,
        "/",
        &[("host", "retry.example"), (ECHO_STATUS_HEADER, "418")],
    );
    assert_eq!(r.status, 418);
    // The first try and two retries.
    assert_eq!(e.v1.requests() - before, 3);
    e.still_flowing();
}

#[test]
fn a_query_parameter_marked_absent_matches_only_when_absent() {
    let e = Edge::start(&[(
        "query.yaml",
        &vs(
            "query",
            "query.example",
            "    - match: {prefix: /, queryParameters: [{name: debug, present: false}]}\n      upstream: v1\n    - upstream: v2",
        ),
    )]);
    let h = [("host", "query.example")];
    wait_served_by(e.port, "/page", &h, "v1");
    for (path, want) in [
        ("/page", "v1"),
        ("/page?lang=en", "v1"),
        ("/page?debugging=1", "v1"),
        ("/page?debug", "v2"),
        ("/page?debug=1", "v2"),
        ("/page?lang=en&debug=1", "v2"),
    ] {
        assert_eq!(served_by(&get_with(e.port, path, &h)), want, "{path}");
    }
    e.still_flowing();
}

#[test]
fn a_host_with_a_port_matches_its_domain() {
    let e = Edge::start(&[(
        "shop.yaml",
        &vs("shop", "shop.example", "    - upstream: v1"),
    )]);
    let with_port = format!("shop.example:{}", e.port);
    // As browsers and curl send it to a gateway on a port other than 80.
    wait_served_by(e.port, "/", &[("host", with_port.as_str())], "v1");
    wait_served_by(e.port, "/", &[("host", "shop.example")], "v1");
    // The upstream sees Host as the client sent it.
    let r = get_with(e.port, "/", &[("host", with_port.as_str())]);
    assert!(
        r.body.contains(&format!("\"host\":\"{with_port}\"")),
        "{}",
        r.body
    );
    e.still_flowing();
}

/// A redirect that changes only the path sends the client back to the port it came to.
#[test]
fn a_redirect_keeps_the_port_the_client_used() {
    let e = Edge::start(&[(
        "old.yaml",
        &vs(
            "old",
            "old.example",
            "    - redirect: {pathRedirect: /new, responseCode: 302}",
        ),
    )]);
    let with_port = format!("old.example:{}", e.port);
    let location = eventually(DEADLINE, "the redirect", || {
        let r = get(e.port, "/x", &[("host", with_port.as_str())])?;
        (r.status == 302)
            .then(|| r.header("location").unwrap_or_default().to_string())
            .ok_or(r.status.to_string())
    });
    assert_eq!(location, format!("http://{with_port}/new"));
    e.still_flowing();
}

#[test]
fn a_missing_upstream_is_named_in_status_not_to_clients() {
    let e = Edge::start(&[(
        "ghost.yaml",
        &vs("ghost", "ghost.example", "    - upstream: secret-backend"),
    )]);
    eventually(DEADLINE, "503 for ghost.example", || {
        let r = get(e.port, "/", &[("host", "ghost.example")])?;
        (r.status == 503).then_some(r).ok_or("not yet".to_string())
    });
    let r = get_with(e.port, "/", &[("host", "ghost.example")]);
    assert!(!r.body.contains("secret-backend"), "{}", r.body);
    let status = e.c.object("VirtualService", "ghost").unwrap();
    assert_eq!(status["state"], "Warning", "{status}");
    assert!(status.to_string().contains("secret-backend"), "{status}");
    e.still_flowing();
}

/// An Envoy started without `vmeshctl bootstrap`'s RE2 setting refuses a regex vmesh accepts
/// (docs/configuration.md, "Regexes"): the refusal is blamed on the virtual service alone,
/// which keeps its last accepted routes, and the others on the gateway keep changing.
#[test]
fn a_route_envoy_refuses_freezes_only_its_own_virtual_service() {
    for protocol in [Protocol::Delta, Protocol::Sotw] {
        let shop = |route: &str| vs("shop", "shop.example", route);
        let e = Edge::start_with(&[("shop.yaml", &shop("    - upstream: v1"))], protocol);
        wait_served_by(e.port, "/", &[("host", "shop.example")], "v1");

        // shop gets a route Envoy's default RE2 limit refuses, and a new upstream.
        e.c.write(
            "shop.yaml",
            &shop("    - match: {regex: \"/[^/]{1,64}\"}\n      upstream: v2"),
        );
        let status = eventually(DEADLINE, "shop reported rejected by the proxy", || {
            let s = e.c.object("VirtualService", "shop").unwrap_or_default();
            (s["state"] == "Rejected")
                .then(|| s.clone())
                .ok_or(format!("{s}"))
        });
        let text = status.to_string();
        assert!(
            text.contains("proxy edge-proxy rejected route gw-edge-routes (VirtualService/shop)"),
            "{text}"
        );
        assert!(text.contains("RE2 program size"), "{text}");
        assert!(
            !text.contains("\\n\""),
            "Envoy's trailing newline is trimmed: {text}"
        );

        // The other virtual service and the gateway are not blamed, and still change.
        e.c.write("other.yaml", &other("v2"));
        wait_served_by(e.port, "/", &[("host", "other.example")], "v2");
        for (kind, name) in [("VirtualService", "other"), ("Gateway", "edge")] {
            let s = e.c.object(kind, name).unwrap();
            assert_eq!(s["state"], "Accepted", "{protocol:?} {s}");
        }
        // shop keeps serving what Envoy last accepted.
        let r = get_with(e.port, "/x", &[("host", "shop.example")]);
        assert_eq!(
            (r.status, served_by(&r)),
            (200, "v1".to_string()),
            "{protocol:?}"
        );
    }
}

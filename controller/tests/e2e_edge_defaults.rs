//! What a gateway does with requests a hostile or careless client sends, and what it logs of
//! them: the hardened defaults and access logs of `docs/configuration.md`, through a real Envoy.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::Value;
use vmesh_testkit::{eventually, free_port, raw_request, EchoServer, Envoy, Response};
use vmeshctl::bootstrap::Protocol;

const PROXY: &str = "edge-proxy";

/// The gateway, with `extra` appended to its spec (indented by four spaces).
fn gateway(port: u16, extra: &str) -> String {
    format!(
        "kind: Gateway\nname: edge\nspec:\n  bindPort: {port}\n  proxyNames: [{PROXY}]\n{extra}"
    )
}

/// `shop.example`: `/admin` is answered 403 by the gateway itself, everything else goes to v1.
const SHOP: &str = "kind: VirtualService\nname: shop\nspec:\n  domains: [shop.example]\n  routes:\n    - match: {prefix: /admin}\n      directResponse: {status: 403, body: admin is closed}\n    - upstream: v1\n";

struct Edge {
    c: Controller,
    envoy: Envoy,
    port: u16,
    _v1: EchoServer,
}

impl Edge {
    fn start(gateway_extra: &str) -> Edge {
        let v1 = EchoServer::start("v1");
        let port = free_port();
        let c = Controller::start_with(
            &[
                ("gateway.yaml", &gateway(port, gateway_extra)),
                ("v1.yaml", &upstream_doc("v1", v1.port())),
                ("shop.yaml", SHOP),
            ],
            &[],
        );
        let envoy = c.envoy(PROXY, Protocol::Delta);
        wait_served_by(port, "/", &[("host", "shop.example")], "v1");
        Edge {
            c,
            envoy,
            port,
            _v1: v1,
        }
    }

    /// Sends `GET <target>` for shop.example exactly as written, with `headers` lines after.
    fn raw(&self, target: &str, headers: &[&str]) -> Response {
        let mut head = format!("GET {target} HTTP/1.1\r\nhost: shop.example");
        for h in headers {
            head.push_str("\r\n");
            head.push_str(h);
        }
        raw_request(self.port, &head).unwrap()
    }

    /// The access-log lines Envoy printed on its standard output so far, parsed.
    fn access_log(&self) -> Vec<Value> {
        json_lines(&self.envoy.log())
    }

    /// Waits for the access-log line of the request to `path`.
    fn logged(&self, path: &str) -> Value {
        eventually(DEADLINE, &format!("an access-log line for {path}"), || {
            self.access_log()
                .into_iter()
                .find(|l| l["path"] == path)
                .ok_or_else(|| format!("none among {:?}", self.access_log()))
        })
    }
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The path the upstream received, from the echo server's answer.
fn upstream_path(r: &Response) -> String {
    let start = r.body.find('{').unwrap_or(0);
    let end = r.body.rfind('}').map_or(r.body.len(), |i| i + 1);
    let echo: Value = serde_json::from_str(&r.body[start..end])
        .unwrap_or_else(|e| panic!("not an echo ({e}): {}", r.body));
    echo["path"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_route_cannot_be_bypassed_by_spelling_its_path_differently() {
    let e = Edge::start("");
    assert_eq!(e.raw("/admin/users", &[]).status, 403);
    // Dot-segments, encoded or not, and doubled slashes are resolved before routing.
    for sneaky in [
        "/public/../admin/users",
        "/public/%2e%2e/admin/users",
        "/public/%2E%2E/admin/users",
        "//admin/users",
        "/public/../../admin/users",
    ] {
        let r = e.raw(sneaky, &[]);
        assert_eq!(r.status, 403, "{sneaky} reached {}", served_by(&r));
    }
    // An escaped slash is answered with a redirect to what an upstream would make of it.
    let r = e.raw("/public%2F..%2Fadmin/users", &[]);
    assert_eq!(r.status, 307, "{}", r.body);
    assert_eq!(r.header("location"), Some("/admin/users"));
    let r = e.raw("/public%5Cadmin", &[]);
    assert_eq!(r.status, 307, "{}", r.body);
    assert_eq!(r.header("location"), Some("/public/admin"));
    // The upstream is sent the path it was routed by.
    let r = e.raw("/public/a//b/../c", &[]);
    assert_eq!(
        (r.status, served_by(&r).as_str()),
        (200, "v1"),
        "{}",
        r.body
    );
    assert_eq!(upstream_path(&r), "/public/a/c");
    // A NUL in the path is refused outright.
    assert_eq!(e.raw("/public/x%00y", &[]).status, 400);
}

#[test]
fn header_names_with_underscores_are_refused() {
    let e = Edge::start("");
    let r = e.raw("/", &["x-user: alice"]);
    assert_eq!((r.status, served_by(&r).as_str()), (200, "v1"));
    let r = e.raw("/", &["x_user: alice"]);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(served_by(&r), "-");
}

#[test]
fn a_client_cannot_choose_its_address_or_request_id_and_each_request_is_logged() {
    let e = Edge::start("  accessLog: {}\n");
    let r = e.raw(
        "/whoami",
        &[
            "x-forwarded-for: 203.0.113.9",
            "x-request-id: client-chosen",
            "user-agent: e2e-test",
        ],
    );
    assert_eq!(r.status, 200);
    let line = e.logged("/whoami");
    // Every documented field is there.
    let keys: Vec<&str> = line
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let documented: Vec<&str> = vmesh_model::DEFAULT_ACCESS_LOG_FIELDS
        .iter()
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(keys, documented, "{line}");
    assert_eq!(line["response_code"], 200, "{line}");
    assert_eq!(line["response_code_details"], "via_upstream", "{line}");
    assert_eq!(line["route_name"], "shop/1", "{line}");
    assert_eq!(line["upstream_cluster"], "v1", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["authority"], "shop.example", "{line}");
    assert_eq!(line["user_agent"], "e2e-test", "{line}");
    // The client is the TCP peer, not what it wrote into X-Forwarded-For, and Envoy chose the
    // request id.
    let client = line["downstream_remote_address"].as_str().unwrap();
    assert!(client.starts_with("127.0.0.1:"), "{line}");
    assert_ne!(line["request_id"], "client-chosen", "{line}");

    // Behind one trusted proxy, the client is the address that proxy saw.
    e.c.write(
        "gateway.yaml",
        &gateway(e.port, "  accessLog: {}\n  xffNumTrustedHops: 1\n"),
    );
    eventually(DEADLINE, "the client address from X-Forwarded-For", || {
        let path = format!("/behind-a-proxy-{}", e.access_log().len());
        e.raw(&path, &["x-forwarded-for: 203.0.113.9"]);
        let line = e.logged(&path);
        let client = line["downstream_remote_address"].as_str().unwrap_or("");
        client
            .starts_with("203.0.113.9")
            .then_some(())
            .ok_or(format!("client {client}"))
    });
}

#[test]
fn a_file_access_log_writes_the_chosen_fields_and_an_unwritable_one_is_reported() {
    let dir = vmesh_testkit::process::scratch_dir("e2e-access-log");
    let file = dir.join("edge.log");
    let e = Edge::start(&format!(
        "  accessLog:\n    to: {:?}\n    fields: {{status: \"%RESPONSE_CODE%\", agent: \"%REQ(user-agent)%\", where: \"%REQ(:path)%\"}}\n",
        file.display().to_string()
    ));
    assert_eq!(e.raw("/to-the-file", &["user-agent: e2e-file"]).status, 200);
    // Envoy writes files in batches (every 10 s by default).
    let line = eventually(DEADLINE, "the line in the file", || {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        json_lines(&text)
            .into_iter()
            .find(|l| l["where"] == "/to-the-file")
            .ok_or(format!("file has {text:?}"))
    });
    assert_eq!(
        line,
        serde_json::json!({"agent": "e2e-file", "status": 200, "where": "/to-the-file"})
    );

    // A log file Envoy cannot open: the gateway is reported rejected by the proxy, which keeps
    // its listener and goes on serving.
    e.c.write(
        "gateway.yaml",
        &gateway(e.port, "  accessLog: {to: /nonexistent-dir/edge.log}\n"),
    );
    let status = eventually(DEADLINE, "the gateway reported rejected", || {
        let s = e.c.object("Gateway", "edge").unwrap_or_default();
        (s["state"] == "Rejected")
            .then(|| s.clone())
            .ok_or(format!("{s}"))
    });
    assert!(
        status.to_string().contains("/nonexistent-dir/edge.log"),
        "{status}"
    );
    assert_eq!(e.raw("/still-served", &[]).status, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

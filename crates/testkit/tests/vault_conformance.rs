//! The Vault behaviour vmesh depends on (`../shared/vault.md`), checked against the test kit's
//! emulator and, with `VAULT_ADDR` and `VAULT_TOKEN` (a root token, e.g. `vault server -dev`)
//! set, against that real Vault instead. Each test works under its own key prefix and policy
//! names, so runs against one Vault do not meet.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{json, Value};
use vmesh_testkit::vault::VaultEmulator;
use vmesh_testkit::{request, Response};

/// Where a test runs: its own emulator, or the real Vault of `VAULT_ADDR`.
struct Target {
    _emulator: Option<VaultEmulator>,
    url: String,
    root: String,
    /// This test's prefix under `secret/`.
    prefix: String,
}

impl Target {
    fn new(test: &str) -> Target {
        let run = vmesh_testkit::consul::new_uuid();
        let prefix = format!("vmesh-conformance/{test}-{}", &run[..8]);
        match (std::env::var("VAULT_ADDR"), std::env::var("VAULT_TOKEN")) {
            (Ok(url), Ok(root)) if !url.is_empty() => Target {
                _emulator: None,
                url: url.trim_end_matches('/').to_string(),
                root,
                prefix,
            },
            _ => {
                let e = VaultEmulator::start();
                Target {
                    url: e.url(),
                    root: e.root_token().to_string(),
                    _emulator: Some(e),
                    prefix,
                }
            }
        }
    }

    fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> Response {
        let url = format!("{}/v1/{path}", self.url);
        let mut headers = vec![("content-type", "application/json")];
        if let Some(t) = token {
            headers.push(("x-vault-token", t));
        }
        let body = body.map(|b| b.to_string());
        request(method, &url, &headers, body.as_deref().map(str::as_bytes)).unwrap()
    }

    fn root(&self, method: &str, path: &str, body: Option<Value>) -> Response {
        self.call(method, path, Some(&self.root), body)
    }

    fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }
}

fn json_of(r: &Response) -> Value {
    r.json().unwrap()
}

#[test]
fn health_answers_active_and_unsealed() {
    let t = Target::new("health");
    let r = t.call("GET", "sys/health", None, None);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = json_of(&r);
    assert_eq!(v["initialized"], true);
    assert_eq!(v["sealed"], false);
    assert_eq!(v["standby"], false);
}

#[test]
fn kv_v2_keeps_versions_metadata_and_checks_cas() {
    let t = Target::new("kv");
    let key = t.key("tls/shop");
    let r = t.root(
        "POST",
        &format!("secret/data/{key}"),
        Some(json!({"data": {"cert": "one"}})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = json_of(&r);
    assert_eq!(v["data"]["version"], 1, "{v}");
    for field in [
        "request_id",
        "lease_id",
        "renewable",
        "lease_duration",
        "wrap_info",
        "warnings",
        "auth",
    ] {
        assert!(v.get(field).is_some(), "the envelope has {field}: {v}");
    }

    // A write with the wrong CAS is refused; the right one makes version 2.
    let r = t.root(
        "POST",
        &format!("secret/data/{key}"),
        Some(json!({"data": {"cert": "two"}, "options": {"cas": 0}})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let r = t.root(
        "POST",
        &format!("secret/data/{key}"),
        Some(json!({"data": {"cert": "two"}, "options": {"cas": 1}})),
    );
    assert_eq!(r.status, 200, "{}", r.body);

    let v = json_of(&t.root("GET", &format!("secret/data/{key}"), None));
    assert_eq!(v["data"]["data"]["cert"], "two");
    assert_eq!(v["data"]["metadata"]["version"], 2);
    let v = json_of(&t.root("GET", &format!("secret/data/{key}?version=1"), None));
    assert_eq!(v["data"]["data"]["cert"], "one");

    // What a watcher polls: the current version, cheaply.
    let v = json_of(&t.root("GET", &format!("secret/metadata/{key}"), None));
    assert_eq!(v["data"]["current_version"], 2, "{v}");
    assert!(v["data"]["versions"]["1"].is_object(), "{v}");

    // Deleting the latest version: 404, with the metadata still there.
    let r = t.root("DELETE", &format!("secret/data/{key}"), None);
    assert_eq!(r.status, 204, "{}", r.body);
    let r = t.root("GET", &format!("secret/data/{key}"), None);
    assert_eq!(r.status, 404, "{}", r.body);
    let v = json_of(&r);
    assert_eq!(v["data"]["metadata"]["version"], 2, "{v}");
    assert_ne!(v["data"]["metadata"]["deletion_time"], "", "{v}");

    let r = t.root("GET", &format!("secret/data/{}", t.key("nothing")), None);
    assert_eq!(r.status, 404);
}

#[test]
fn kv_list_shows_keys_and_folders() {
    let t = Target::new("list");
    for name in ["a", "b", "dir/c"] {
        let r = t.root(
            "POST",
            &format!("secret/data/{}", t.key(name)),
            Some(json!({"data": {"x": "1"}})),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = t.root(
        "GET",
        &format!("secret/metadata/{}?list=true", t.prefix),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let mut keys: Vec<String> = json_of(&r)["data"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    keys.sort();
    assert_eq!(keys, ["a", "b", "dir/"]);
    let r = t.root(
        "GET",
        &format!("secret/metadata/{}/none?list=true", t.prefix),
        None,
    );
    assert_eq!(r.status, 404);
}

#[test]
fn a_policy_in_hcl_limits_a_token_to_its_paths() {
    let t = Target::new("policy");
    let name = t.prefix.replace('/', "-");
    let policy = format!(
        "path \"secret/data/{p}/app/*\" {{ capabilities = [\"read\"] }}\npath \"secret/metadata/{p}/app/*\" {{ capabilities = [\"read\", \"list\"] }}\n",
        p = t.prefix
    );
    let r = t.root(
        "PUT",
        &format!("sys/policies/acl/{name}"),
        Some(json!({"policy": policy})),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = t.root(
        "PUT",
        &format!("sys/policies/acl/{name}-bad"),
        Some(json!({"policy": "path {"})),
    );
    assert_eq!(r.status, 400, "{}", r.body);

    t.root(
        "POST",
        &format!("secret/data/{}", t.key("app/tls")),
        Some(json!({"data": {"k": "v"}})),
    );
    t.root(
        "POST",
        &format!("secret/data/{}", t.key("other")),
        Some(json!({"data": {"k": "v"}})),
    );
    let r = t.root(
        "POST",
        "auth/token/create",
        Some(json!({"policies": [name], "ttl": "1h"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let auth = &json_of(&r)["auth"];
    let token = auth["client_token"].as_str().unwrap().to_string();
    let policies: Vec<&str> = auth["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        policies.contains(&name.as_str()) && policies.contains(&"default"),
        "{auth}"
    );

    let as_app = |method: &str, path: String, body: Option<Value>| {
        t.call(method, &path, Some(&token), body).status
    };
    assert_eq!(
        as_app("GET", format!("secret/data/{}", t.key("app/tls")), None),
        200
    );
    assert_eq!(
        as_app("GET", format!("secret/metadata/{}", t.key("app/tls")), None),
        200
    );
    assert_eq!(
        as_app("GET", format!("secret/data/{}", t.key("other")), None),
        403
    );
    assert_eq!(
        as_app(
            "POST",
            format!("secret/data/{}", t.key("app/tls")),
            Some(json!({"data": {"k": "w"}}))
        ),
        403
    );
    assert_eq!(
        as_app(
            "PUT",
            format!("sys/policies/acl/{name}"),
            Some(json!({"policy": ""}))
        ),
        403
    );
    t.root("DELETE", &format!("sys/policies/acl/{name}"), None);
}

#[test]
fn a_token_looks_itself_up_renews_itself_and_expires() {
    let t = Target::new("token");
    let r = t.root(
        "POST",
        "auth/token/create",
        Some(json!({"ttl": "3s", "renewable": true})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let token = json_of(&r)["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = t.call("GET", "auth/token/lookup-self", Some(&token), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = json_of(&r);
    assert!(v["data"]["ttl"].as_u64().unwrap() <= 3, "{v}");
    assert_eq!(v["data"]["renewable"], true);

    let r = t.call(
        "POST",
        "auth/token/renew-self",
        Some(&token),
        Some(json!({"increment": "1h"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(json_of(&r)["auth"]["lease_duration"].as_u64().unwrap() > 3);

    // A token that is not renewable is refused renewal; one past its TTL is refused everything.
    let r = t.root(
        "POST",
        "auth/token/create",
        Some(json!({"ttl": "2s", "renewable": false})),
    );
    let short = json_of(&r)["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = t.call(
        "POST",
        "auth/token/renew-self",
        Some(&short),
        Some(json!({})),
    );
    assert!(
        r.status == 403 || r.status == 400,
        "{} {}",
        r.status,
        r.body
    );
    std::thread::sleep(Duration::from_millis(2500));
    let r = t.call("GET", "auth/token/lookup-self", Some(&short), None);
    assert_eq!(r.status, 403, "{}", r.body);
}

#[test]
fn a_missing_or_unknown_token_is_denied() {
    let t = Target::new("denied");
    let path = format!("secret/data/{}", t.key("x"));
    assert_eq!(t.call("GET", &path, None, None).status, 403);
    let r = t.call("GET", &path, Some("hvs.not-a-token"), None);
    assert_eq!(r.status, 403);
    assert!(json_of(&r)["errors"].is_array(), "{}", r.body);
}

#[test]
fn a_sealed_emulator_answers_503_but_health() {
    let e = VaultEmulator::start();
    e.set_sealed(true);
    let r = request("GET", &format!("{}/v1/sys/health", e.url()), &[], None).unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json().unwrap()["sealed"], true);
    let r = request(
        "GET",
        &format!("{}/v1/auth/token/lookup-self", e.url()),
        &[("x-vault-token", e.root_token())],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 503);
    e.set_sealed(false);
    let r = request("GET", &format!("{}/v1/sys/health", e.url()), &[], None).unwrap();
    assert_eq!(r.status, 200);
}

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

/// The PKI engine at `pki/`, mounted and with a root CA (the emulator has both from the start;
/// a real `vault server -dev` gets them here).
fn pki_ready(t: &Target) {
    let r = t.root("POST", "sys/mounts/pki", Some(json!({"type": "pki"})));
    assert!(
        r.status == 204 || r.status == 400,
        "{} {}",
        r.status,
        r.body
    );
    let ca = t.call("GET", "pki/ca/pem", None, None);
    if ca.status != 200 || !ca.body.contains("BEGIN CERTIFICATE") {
        let r = t.root(
            "POST",
            "pki/root/generate/internal",
            Some(json!({"common_name": "vmesh conformance root", "ttl": "87600h"})),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

#[test]
fn pki_signs_a_csr_within_what_its_role_allows() {
    let t = Target::new("pki");
    pki_ready(&t);
    let role = format!("vmesh-agent-{}", &t.prefix[t.prefix.len() - 8..]);
    let r = t.root(
        "POST",
        &format!("pki/roles/{role}"),
        Some(json!({
            "allowed_domains": ["mesh.internal"], "allow_subdomains": true,
            "allowed_uri_sans": ["spiffe://vmesh/*"], "require_cn": false, "max_ttl": "72h",
        })),
    );
    assert_eq!(r.status, 204, "{}", r.body);

    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let sign = |body: Value| t.root("POST", &format!("pki/sign/{role}"), Some(body));
    let r = sign(json!({"csr": csr, "uri_sans": "spiffe://vmesh/dc/dc1/agent/vm-1", "ttl": "1h"}));
    assert_eq!(r.status, 200, "{}", r.body);
    let data = json_of(&r)["data"].clone();
    let pem = data["certificate"].as_str().unwrap();
    let der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .unwrap()
        .1
        .contents;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, ["spiffe://vmesh/dc/dc1/agent/vm-1"]);
    assert!(data["issuing_ca"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert!(data["ca_chain"].is_array(), "{data}");
    assert!(
        data["serial_number"].as_str().unwrap().contains(':'),
        "{data}"
    );
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(lifetime <= 3600 + 120, "ttl 1h, got {lifetime}s");

    // Outside the role: refused with 400.
    let r = sign(json!({"csr": csr, "uri_sans": "spiffe://other/x"}));
    assert_eq!(r.status, 400, "{}", r.body);
    let r = sign(json!({"csr": csr, "common_name": "evil.example.com"}));
    assert_eq!(r.status, 400, "{}", r.body);
    // The CA certificate needs no token.
    let r = t.call("GET", "pki/ca/pem", None, None);
    assert_eq!(r.status, 200);
    assert!(
        r.body.starts_with("-----BEGIN CERTIFICATE-----"),
        "{}",
        r.body
    );
    // ... nor as JSON, the same certificate.
    let r = t.call("GET", "pki/cert/ca", None, None);
    assert_eq!(r.status, 200, "{}", r.body);
    let json: Value = serde_json::from_str(&r.body).unwrap();
    let pem = json["data"]["certificate"].as_str().unwrap_or_default();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{}", r.body);

    // issue/<role> makes the key too.
    let r = t.root(
        "POST",
        &format!("pki/issue/{role}"),
        Some(json!({"common_name": "gw.mesh.internal", "ttl": "1h"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(json_of(&r)["data"]["private_key"]
        .as_str()
        .unwrap()
        .contains("PRIVATE KEY"));
}

#[test]
fn approle_logs_in_with_a_role_id_and_a_secret_id() {
    let t = Target::new("approle");
    let r = t.root("POST", "sys/auth/approle", Some(json!({"type": "approle"})));
    assert!(
        r.status == 204 || r.status == 400,
        "{} {}",
        r.status,
        r.body
    );
    let role = format!("vmesh-{}", &t.prefix[t.prefix.len() - 8..]);
    let r = t.root(
        "POST",
        &format!("auth/approle/role/{role}"),
        Some(json!({"token_policies": ["vmesh-reader"], "token_ttl": "20m"})),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = t.root("GET", &format!("auth/approle/role/{role}/role-id"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let role_id = json_of(&r)["data"]["role_id"].as_str().unwrap().to_string();
    let r = t.root("POST", &format!("auth/approle/role/{role}/secret-id"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let secret_id = json_of(&r)["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_string();

    let r = t.call(
        "POST",
        "auth/approle/login",
        None,
        Some(json!({"role_id": role_id, "secret_id": secret_id})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let auth = json_of(&r)["auth"].clone();
    let token = auth["client_token"].as_str().unwrap();
    assert_eq!(auth["renewable"], true);
    assert!(
        auth["lease_duration"].as_u64().unwrap() <= 20 * 60,
        "{auth}"
    );
    let policies: Vec<&str> = auth["token_policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(policies.contains(&"vmesh-reader"), "{auth}");
    assert_eq!(
        t.call("GET", "auth/token/lookup-self", Some(token), None)
            .status,
        200
    );

    let r = t.call(
        "POST",
        "auth/approle/login",
        None,
        Some(json!({"role_id": role_id, "secret_id": "not-it"})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
}

/// `vmesh-vault-emulator` serves the same, like `vault server -dev -dev-root-token-id`.
#[test]
fn the_standalone_emulator_starts_like_a_dev_server() {
    let port = vmesh_testkit::free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vmesh-vault-emulator"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--dev-root-token-id",
            "dev-root",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let health =
        vmesh_testkit::eventually(Duration::from_secs(20), "the emulator to listen", || {
            request("GET", &format!("{url}/v1/sys/health"), &[], None)
        });
    assert_eq!(health.status, 200);
    let put = request(
        "POST",
        &format!("{url}/v1/secret/data/demo"),
        &[("x-vault-token", "dev-root")],
        Some(br#"{"data": {"k": "v"}}"#),
    )
    .unwrap();
    assert_eq!(put.status, 200, "{}", put.body);
    let ca = request("GET", &format!("{url}/v1/pki/ca/pem"), &[], None).unwrap();
    assert!(ca.body.contains("BEGIN CERTIFICATE"));
    let _ = child.kill();
    let _ = child.wait();
}

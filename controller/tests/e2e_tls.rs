//! HTTPS at the edge, through a real Envoy: certificates from a secrets directory (the embedded
//! default) and from Vault KV v2 (the test kit's emulator, as its own process), sent to Envoy
//! over SDS only; several names on one port chosen by SNI, an HTTP→HTTPS redirect, rotation
//! under traffic, bad secrets, Vault stopped, and no token anywhere it should not be.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use vmesh_testkit::tls::{https_get, https_get_as, Issued, TestCa, TlsEchoServer};
use vmesh_testkit::{eventually, free_port, request, EchoServer};
use vmeshctl::bootstrap::Protocol;

const PROXY: &str = "edge-proxy";
const SHOP: &str = "shop.example.com";
const API: &str = "api.example.com";

fn vs(name: &str, domain: &str) -> String {
    format!("kind: VirtualService\nname: {name}\nspec:\n  domains: [{domain:?}]\n  routes:\n    - upstream: web\n")
}

fn https_gateway(port: u16) -> String {
    format!(
        "kind: Gateway\nname: https\nspec:\n  bindPort: {port}\n  proxyNames: [{PROXY}]\n  tls:\n    certificates:\n      - secret: vmesh/tls/shop\n      - secret: vmesh/tls/api\n"
    )
}

fn redirect_gateway(port: u16, https_port: u16) -> String {
    format!(
        "kind: Gateway\nname: http\nspec:\n  bindPort: {port}\n  proxyNames: [{PROXY}]\n  httpsRedirect:\n    port: {https_port}\n"
    )
}

/// The config of every scenario: `web` behind `shop` and `api`, HTTPS on `https`, and the
/// redirect on `http`.
fn config(web: u16, https: u16, http: u16) -> Vec<(&'static str, String)> {
    vec![
        ("web.yaml", upstream_doc("web", web)),
        ("shop.yaml", vs("shop", SHOP)),
        ("api.yaml", vs("api", API)),
        ("https.yaml", https_gateway(https)),
        ("http.yaml", redirect_gateway(http, https)),
    ]
}

fn write_secret(dir: &Path, name: &str, fields: &[(&str, &str)]) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for (field, text) in fields {
        // As Nomad's template does: a temporary file renamed into place.
        let tmp = d.join(format!(".{field}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, d.join(field)).unwrap();
    }
}

fn cert_fields(issued: &Issued) -> [(&'static str, &str); 2] {
    [("cert", &issued.cert_pem), ("key", &issued.key_pem)]
}

/// Waits until `name` on `port` is served with the certificate `expected` and a 200 from `web`.
#[track_caller]
fn wait_certificate(port: u16, name: &str, ca: &TestCa, expected: &Issued) {
    eventually(
        DEADLINE,
        &format!("{name} served with its certificate"),
        || {
            let r = https_get(port, name, "/", ca.pem())?;
            if r.peer != expected.der {
                return Err("another certificate".into());
            }
            if r.status != 200 || r.header("x-served-by") != Some("web") {
                return Err(format!("status {}", r.status));
            }
            Ok(())
        },
    );
}

/// The status of the Gateway `https`.
fn gateway_status(c: &Controller) -> Value {
    c.object("Gateway", "https")
        .expect("Gateway/https has a status")
}

/// HTTPS requests to `name` every 10 ms while a scenario runs, counting failures.
fn traffic(port: u16, name: &'static str, ca_pem: String) -> Traffic {
    Traffic::start(Duration::from_millis(10), move || {
        match https_get(port, name, "/", &ca_pem)? {
            r if r.status == 200 => Ok(()),
            r => Err(format!("status {}", r.status)),
        }
    })
}

#[test]
fn https_from_a_secrets_directory_two_names_on_one_port_redirect_rotation_and_a_bad_secret() {
    let web = EchoServer::start("web");
    let (https, http) = (free_port(), free_port());
    let ca = TestCa::new("test CA");
    let shop = ca.issue(&[SHOP], 90);
    let api = ca.issue(&[API], 90);
    let secrets = vmesh_testkit::process::scratch_dir("e2e-secrets");
    write_secret(&secrets, "vmesh/tls/shop", &cert_fields(&shop));
    write_secret(&secrets, "vmesh/tls/api", &cert_fields(&api));
    let files = config(web.port(), https, http);
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let c = Controller::start_with(&refs, &["--secrets-dir", &secrets.display().to_string()]);
    let _envoy = c.envoy(PROXY, Protocol::Delta);

    // Each name gets its own certificate on the one port.
    wait_certificate(https, SHOP, &ca, &shop);
    wait_certificate(https, API, &ca, &api);

    // Plain HTTP is sent to HTTPS, same host, path and query, on the HTTPS port.
    let r = get(http, "/cart?item=1", &[("host", SHOP)]).unwrap();
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(format!("https://{SHOP}:{https}/cart?item=1").as_str())
    );

    // Status shows each certificate's names and expiry.
    let status = gateway_status(&c);
    assert_eq!(status["state"], "Accepted", "{status:#}");
    let certs = status["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 2, "{status:#}");
    assert_eq!(certs[0]["secret"], "vmesh/tls/shop");
    assert_eq!(certs[0]["names"], json!([SHOP]));
    assert!(certs[0]["notAfter"].as_str().unwrap().starts_with("20"));

    // The controller's /config_dump shows the secrets without their keys.
    let dump = admin_text(&c, &format!("/config_dump?proxy={PROXY}"));
    assert!(dump.contains("cert:vmesh/tls/shop"), "{dump}");
    assert!(
        !dump.contains("PRIVATE KEY"),
        "a private key in /config_dump"
    );

    // Rotation under traffic: the new certificate is served, no request fails. The files are
    // replaced one at a time, so for a moment the key does not match the certificate: that
    // version is never served.
    let traffic = traffic(https, SHOP, ca.pem().to_string());
    traffic.wait_for(5);
    let shop2 = ca.issue(&[SHOP], 90);
    write_secret(&secrets, "vmesh/tls/shop", &[("cert", &shop2.cert_pem)]);
    write_secret(&secrets, "vmesh/tls/shop", &[("key", &shop2.key_pem)]);
    wait_certificate(https, SHOP, &ca, &shop2);
    traffic.finish_without_failures(5);

    // A bad secret: the gateway says which field and why, and the last good one keeps serving.
    let stranger = ca.issue(&[SHOP], 90);
    write_secret(&secrets, "vmesh/tls/shop", &[("key", &stranger.key_pem)]);
    eventually(DEADLINE, "the bad secret reported", || {
        let s = gateway_status(&c);
        let warning = s["warnings"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["path"] == "spec.tls.certificates[0].secret")
            .cloned()
            .ok_or_else(|| format!("{s:#}"))?;
        let message = warning["message"].as_str().unwrap_or_default();
        (s["state"] == "Warning" && message.contains("key does not match"))
            .then_some(())
            .ok_or_else(|| format!("{s:#}"))
    });
    let r = https_get(https, SHOP, "/", ca.pem()).unwrap();
    assert_eq!(r.peer, shop2.der, "the last good certificate keeps serving");
    assert_eq!(r.status, 200);
    assert!(
        !c.log().contains("PRIVATE KEY"),
        "key material in the controller's log"
    );
}

#[test]
fn a_gateway_whose_only_certificate_is_missing_is_rejected_and_serves_nothing() {
    let web = EchoServer::start("web");
    let (https, http) = (free_port(), free_port());
    let secrets = vmesh_testkit::process::scratch_dir("e2e-secrets");
    let gateway = format!(
        "kind: Gateway\nname: https\nspec:\n  bindPort: {https}\n  proxyNames: [{PROXY}]\n  tls:\n    certificates:\n      - secret: vmesh/tls/nowhere\n"
    );
    let files = [
        ("web.yaml", upstream_doc("web", web.port())),
        ("shop.yaml", vs("shop", SHOP)),
        ("https.yaml", gateway),
        ("http.yaml", redirect_gateway(http, https)),
    ];
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let c = Controller::start_with(&refs, &["--secrets-dir", &secrets.display().to_string()]);
    let _envoy = c.envoy(PROXY, Protocol::Sotw);
    // The redirect gateway is served; the HTTPS one is not, and says why.
    eventually(DEADLINE, "the redirect served", || {
        let r = get(http, "/", &[("host", SHOP)])?;
        (r.status == 301).then_some(()).ok_or(format!("{r:?}"))
    });
    let s = gateway_status(&c);
    assert_eq!(s["state"], "Rejected", "{s:#}");
    assert_eq!(s["errors"][0]["path"], "spec.tls.certificates[0].secret");
    let message = s["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("vmesh/tls/nowhere"), "{message}");
    assert!(message.contains("no directory"), "{message}");
}

#[test]
fn every_cipher_suite_and_version_the_model_offers_is_taken_by_envoy() {
    let web = EchoServer::start("web");
    let https = free_port();
    let ca = TestCa::new("server CA");
    let shop = ca.issue(&[SHOP], 30);
    let secrets = vmesh_testkit::process::scratch_dir("e2e-secrets");
    write_secret(&secrets, "vmesh/tls/shop", &cert_fields(&shop));
    let suites: Vec<String> = vmesh_model::CIPHER_SUITES
        .iter()
        .map(|s| format!("{s:?}"))
        .collect();
    let gateway = |max: &str| {
        format!(
            "kind: Gateway\nname: https\nspec:\n  bindPort: {https}\n  proxyNames: [{PROXY}]\n  tls:\n    certificates: [{{secret: vmesh/tls/shop}}]\n    minVersion: \"1.2\"\n    maxVersion: \"{max}\"\n    cipherSuites: [{}]\n",
            suites.join(", ")
        )
    };
    let files = [
        ("web.yaml", upstream_doc("web", web.port())),
        ("shop.yaml", vs("shop", SHOP)),
        ("https.yaml", gateway("1.2")),
    ];
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let c = Controller::start_with(&refs, &["--secrets-dir", &secrets.display().to_string()]);
    let _envoy = c.envoy(PROXY, Protocol::Delta);
    // TLS 1.2 only, with every suite listed: Envoy takes the listener and serves.
    wait_certificate(https, SHOP, &ca, &shop);
    // TLS 1.3 only (the suites do not apply there; the model refuses them with minVersion 1.3).
    let before = gateway_status(&c)["version"].clone();
    c.write(
        "https.yaml",
        &format!(
            "kind: Gateway\nname: https\nspec:\n  bindPort: {https}\n  proxyNames: [{PROXY}]\n  tls:\n    certificates: [{{secret: vmesh/tls/shop}}]\n    minVersion: \"1.3\"\n"
        ),
    );
    eventually(DEADLINE, "the TLS 1.3 listener taken", || {
        let s = gateway_status(&c);
        let acked =
            s["version"] != before && s["proxies"]["acked"] == 1 && s["state"] == "Accepted";
        acked.then_some(()).ok_or(format!("{s:#}"))
    });
    wait_certificate(https, SHOP, &ca, &shop);
    assert_eq!(gateway_status(&c)["errors"], json!([]));
}

#[test]
fn a_gateway_that_asks_for_client_certificates_serves_only_clients_with_one_from_its_ca() {
    let web = EchoServer::start("web");
    let https = free_port();
    let ca = TestCa::new("server CA");
    let clients = TestCa::new("client CA");
    let stranger_ca = TestCa::new("another CA");
    let secrets = vmesh_testkit::process::scratch_dir("e2e-secrets");
    write_secret(
        &secrets,
        "vmesh/tls/shop",
        &cert_fields(&ca.issue(&[SHOP], 30)),
    );
    write_secret(&secrets, "vmesh/ca/clients", &[("ca", clients.pem())]);
    let gateway = format!(
        "kind: Gateway\nname: https\nspec:\n  bindPort: {https}\n  proxyNames: [{PROXY}]\n  tls:\n    certificates: [{{secret: vmesh/tls/shop}}]\n    clientCertificate: {{ca: vmesh/ca/clients}}\n"
    );
    let files = [
        ("web.yaml", upstream_doc("web", web.port())),
        ("shop.yaml", vs("shop", SHOP)),
        ("https.yaml", gateway),
    ];
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let c = Controller::start_with(&refs, &["--secrets-dir", &secrets.display().to_string()]);
    let _envoy = c.envoy(PROXY, Protocol::Delta);
    let member = clients.issue(&["client.example.com"], 30);
    eventually(DEADLINE, "a client with a certificate served", || {
        let r = https_get_as(https, SHOP, "/", ca.pem(), Some(&member))?;
        (r.status == 200)
            .then_some(())
            .ok_or(format!("status {}", r.status))
    });
    assert!(
        https_get(https, SHOP, "/", ca.pem()).is_err(),
        "a client without a certificate was served"
    );
    let stranger = stranger_ca.issue(&["client.example.com"], 30);
    assert!(
        https_get_as(https, SHOP, "/", ca.pem(), Some(&stranger)).is_err(),
        "a client with a certificate from another CA was served"
    );
    assert_eq!(gateway_status(&c)["state"], "Accepted");
}

#[test]
fn an_upstream_with_tls_is_reached_over_tls_verified_against_its_ca_and_sni() {
    let internal = TestCa::new("internal CA");
    let billing = TlsEchoServer::start("billing", &internal.issue(&["billing.internal"], 30));
    let port = free_port();
    let secrets = vmesh_testkit::process::scratch_dir("e2e-secrets");
    write_secret(&secrets, "vmesh/ca/internal", &[("ca", internal.pem())]);
    let upstream = |sni: &str| {
        format!(
            "kind: Upstream\nname: billing\nspec:\n  static:\n    hosts: [{{address: 127.0.0.1, port: {}}}]\n  tls:\n    sni: {sni}\n    ca: vmesh/ca/internal\n",
            billing.port()
        )
    };
    let files = [
        ("billing.yaml", upstream("billing.internal")),
        (
            "vs.yaml",
            "kind: VirtualService\nname: b\nspec:\n  domains: [\"*\"]\n  routes: [{upstream: billing}]\n".to_string(),
        ),
        ("gateway.yaml", gateway_doc(port, PROXY)),
    ];
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let c = Controller::start_with(&refs, &["--secrets-dir", &secrets.display().to_string()]);
    let _envoy = c.envoy(PROXY, Protocol::Delta);
    wait_served_by(port, "/", &[], "billing");

    // A name the host's certificate does not carry: Envoy refuses the host (503), and never
    // falls back to plaintext.
    c.write("billing.yaml", &upstream("other.internal"));
    eventually(DEADLINE, "the wrong name refused", || {
        let r = get(port, "/", &[])?;
        (r.status == 503)
            .then_some(())
            .ok_or(format!("status {}", r.status))
    });
    // The right name again; then the CA disappears from the secrets directory: the upstream
    // says so on its field, and the CA read last keeps verifying the host.
    c.write("billing.yaml", &upstream("billing.internal"));
    wait_served_by(port, "/", &[], "billing");
    std::fs::remove_dir_all(secrets.join("vmesh/ca/internal")).unwrap();
    eventually(DEADLINE, "the missing CA reported", || {
        let s = c.object("Upstream", "billing").ok_or("no status")?;
        let warned = s["warnings"].as_array().into_iter().flatten().any(|w| {
            w["path"] == "spec.tls.ca"
                && w["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("last good"))
        });
        (s["state"] == "Warning" && warned)
            .then_some(())
            .ok_or(format!("{s:#}"))
    });
    wait_served_by(port, "/", &[], "billing");
}

// ---- Vault ----

const ROOT_TOKEN: &str = "vmesh-test-root-token-7f3a9c";

/// `vmesh-vault-emulator` as its own process, so that it can be stopped like a real Vault.
struct VaultProcess {
    child: Child,
    url: String,
    _log: PathBuf,
}

impl VaultProcess {
    fn start() -> VaultProcess {
        let binary = vmesh_testkit::workspace_binary(
            "vmesh-testkit",
            "vmesh-vault-emulator",
            vmesh_testkit::current_profile(),
        );
        let port = free_port();
        let log = vmesh_testkit::process::scratch_dir("vault").join("vault.log");
        let child = Command::new(binary)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--dev-root-token-id",
                ROOT_TOKEN,
            ])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vmesh-vault-emulator");
        let url = format!("http://127.0.0.1:{port}");
        let v = VaultProcess {
            child,
            url,
            _log: log,
        };
        eventually(DEADLINE, "Vault up", || {
            let r = v.call("GET", "sys/health", None)?;
            (r.status == 200).then_some(()).ok_or(format!("{r:?}"))
        });
        v
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<vmesh_testkit::Response, String> {
        let body = body.map(|b| b.to_string());
        request(
            method,
            &format!("{}/v1/{path}", self.url),
            &[("x-vault-token", ROOT_TOKEN)],
            body.as_deref().map(str::as_bytes),
        )
    }

    fn put(&self, name: &str, fields: &[(&str, &str)]) {
        let data: serde_json::Map<String, Value> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let r = self
            .call(
                "POST",
                &format!("secret/data/{name}"),
                Some(json!({ "data": data })),
            )
            .unwrap();
        assert!(r.status < 300, "{r:?}");
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal}");
    }
}

impl Drop for VaultProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn https_from_vault_rotation_vault_stopped_and_no_token_anywhere() {
    let vault = VaultProcess::start();
    let web = EchoServer::start("web");
    let (https, http) = (free_port(), free_port());
    let ca = TestCa::new("test CA");
    let shop = ca.issue(&[SHOP], 90);
    let api = ca.issue(&[API], 90);
    vault.put("vmesh/tls/shop", &cert_fields(&shop));
    vault.put("vmesh/tls/api", &cert_fields(&api));

    let dir = vmesh_testkit::process::scratch_dir("e2e-config");
    for (name, text) in config(web.port(), https, http) {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let opts = options()
        .args(["--config-dir", &dir.display().to_string()])
        .args(["--vault-poll-interval", "200ms", "--vault-timeout", "1s"])
        .env("VAULT_ADDR", &vault.url)
        .env("VAULT_TOKEN", ROOT_TOKEN)
        .log("debug");
    let mut c = Controller::launch(opts);
    c.process.wait_ready(DEADLINE);
    // State of the world here (the directory test uses delta): SDS over both.
    let _envoy = c.envoy(PROXY, Protocol::Sotw);
    wait_certificate(https, SHOP, &ca, &shop);
    wait_certificate(https, API, &ca, &api);

    // Rotation in Vault, under traffic.
    let traffic = traffic(https, SHOP, ca.pem().to_string());
    let shop2 = ca.issue(&[SHOP], 90);
    vault.put("vmesh/tls/shop", &cert_fields(&shop2));
    wait_certificate(https, SHOP, &ca, &shop2);
    let status = gateway_status(&c);
    assert_eq!(
        status["certificates"][0]["revision"], "version 2",
        "{status:#}"
    );

    // Vault stops answering: TLS keeps working, the controller says it is degraded.
    vault.signal("-STOP");
    eventually(DEADLINE, "the controller to report Vault degraded", || {
        let ready = admin_text(&c, "/readyz");
        let up = c.metric("vmesh_secret_source_up", "");
        (ready.contains("secrets") && ready.contains("degraded") && up == Some(0.0))
            .then_some(())
            .ok_or(format!("{ready} vmesh_secret_source_up={up:?}"))
    });
    let r = https_get(https, SHOP, "/", ca.pem()).unwrap();
    assert_eq!((r.status, r.peer.clone()), (200, shop2.der.clone()));
    vault.signal("-CONT");
    eventually(DEADLINE, "Vault back", || {
        let up = c.metric("vmesh_secret_source_up", "");
        (up == Some(1.0)).then_some(()).ok_or(format!("{up:?}"))
    });
    traffic.finish_without_failures(5);

    // The token is nowhere: not in the log (at debug), the metrics, the status, /readyz, the
    // config dump, nor in any file the controller wrote.
    let mut seen = vec![
        ("log", c.log()),
        ("metrics", admin_text(&c, "/metrics")),
        ("status", admin_text(&c, "/status")),
        ("readyz", admin_text(&c, "/readyz")),
        (
            "config_dump",
            admin_text(&c, &format!("/config_dump?proxy={PROXY}")),
        ),
    ];
    for entry in walk(c.base()) {
        if let Ok(text) = std::fs::read_to_string(&entry) {
            seen.push(("file", text));
        }
    }
    for (what, text) in &seen {
        assert!(
            !text.contains(ROOT_TOKEN),
            "the Vault token is in the {what}"
        );
        assert!(
            !text.contains("PRIVATE KEY"),
            "a private key is in the {what}"
        );
    }
    c.process.terminate();
}

/// The body of an admin endpoint of the controller.
fn admin_text(c: &Controller, path: &str) -> String {
    vmesh_testkit::http_get(&c.admin(path), &[]).unwrap().body
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

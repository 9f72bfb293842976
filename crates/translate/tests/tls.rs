//! TLS, mapping by mapping: a gateway's certificates become SDS secrets and one filter chain per
//! certificate; bad or missing secrets are reported on the field that names them; secrets go
//! only to the proxies that need them, and never when xDS may not carry them.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, tls_parameters::TlsProtocol, DownstreamTlsContext, Secret,
};
use prost::Message;
use vmesh_model::{
    CaBundle, Config, ConfigSet, KeyPem, ObjectKey, SecretEntry, SecretMaterial, SourceMode, State,
    TlsCertificate,
};
use vmesh_translate::{render::render_proxy, translate, Translation, REDACTED};
use vmesh_xds::resource::{CLUSTER, LISTENER, SECRET};

const BASE: &str = "
kind: Upstream
name: web
spec:
  static:
    hosts: [{address: 127.0.0.1, port: 8080}]
---
kind: VirtualService
name: shop
spec:
  domains: [shop.example.com]
  routes: [{upstream: web}]
---
kind: VirtualService
name: api
spec:
  domains: [api.example.com]
  routes: [{upstream: web}]
";

fn gateway(tls: &str) -> String {
    format!("---\nkind: Gateway\nname: https\nspec:\n  bindPort: 443\n  proxyNames: [gw-a]\n  tls:\n{tls}")
}

fn config(text: &str) -> Config {
    let mut set = ConfigSet::new();
    set.upsert_source("test.yaml", text, SourceMode::MultiDoc);
    set.snapshot()
}

fn cert(revision: &str, names: &[&str]) -> SecretEntry {
    SecretEntry {
        serving: Some(Arc::new(SecretMaterial {
            revision: revision.into(),
            certificate: Some(TlsCertificate {
                chain_pem: format!("CHAIN {revision}"),
                key_pem: KeyPem::new(format!("-----BEGIN PRIVATE KEY----- {revision}")),
                names: names.iter().map(|n| n.to_string()).collect(),
                not_after: 2_000_000_000,
                not_after_text: "2033-05-18T03:33:20Z".into(),
            }),
            ca: None,
        })),
        ..Default::default()
    }
}

fn ca(revision: &str) -> SecretEntry {
    SecretEntry {
        serving: Some(Arc::new(SecretMaterial {
            revision: revision.into(),
            certificate: None,
            ca: Some(CaBundle {
                pem: "CA PEM".into(),
                certificates: 1,
            }),
        })),
        ..Default::default()
    }
}

fn with_secrets(mut c: Config, secrets: &[(&str, SecretEntry)]) -> Translation {
    for (name, entry) in secrets {
        c.secrets.entries.insert(name.to_string(), entry.clone());
    }
    translate(&c)
}

fn listener(t: &Translation, proxy: &str, name: &str) -> Listener {
    let r = t.proxies[proxy].snapshot.of_type(LISTENER).unwrap()[name].clone();
    Listener::decode(r.body.value.as_slice()).unwrap()
}

fn report(t: &Translation, key: ObjectKey) -> &vmesh_model::ObjectReport {
    &t.reports[&key]
}

#[test]
fn certificates_become_sds_secrets_and_one_filter_chain_each_chosen_by_sni() {
    let c = config(&format!(
        "{BASE}{}",
        gateway(
            "    certificates: [{secret: tls/shop}, {secret: tls/api}]\n    minVersion: \"1.3\"\n"
        )
    ));
    let t = with_secrets(
        c,
        &[
            ("tls/shop", cert("version 1", &["shop.example.com"])),
            (
                "tls/api",
                cert("version 4", &["api.example.com", "*.api.example.com"]),
            ),
        ],
    );
    let gw = report(&t, ObjectKey::gateway("https"));
    assert_eq!(gw.state, State::Accepted, "{gw:?}");
    assert_eq!(gw.certificates.len(), 2);
    assert_eq!(
        gw.certificates[1].names,
        ["api.example.com", "*.api.example.com"]
    );
    assert_eq!(gw.certificates[1].revision, "version 4");

    let l = listener(&t, "gw-a", "gw-https");
    assert_eq!(
        l.listener_filters[0].name,
        "envoy.filters.listener.tls_inspector"
    );
    let names: Vec<Vec<String>> = l
        .filter_chains
        .iter()
        .map(|c| c.filter_chain_match.clone().unwrap().server_names)
        .collect();
    assert_eq!(
        names,
        [
            vec!["shop.example.com".to_string()],
            vec!["api.example.com".into(), "*.api.example.com".into()]
        ]
    );
    // The default chain serves the first certificate.
    let default = l.default_filter_chain.clone().unwrap();
    let socket = default.transport_socket.unwrap();
    let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
        any,
    )) = socket.config_type
    else {
        panic!("no typed config");
    };
    let tls = DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
    let common = tls.common_tls_context.unwrap();
    assert_eq!(
        common.tls_certificate_sds_secret_configs[0].name,
        "cert:tls/shop"
    );
    assert_eq!(
        common.tls_params.unwrap().tls_minimum_protocol_version,
        TlsProtocol::TlSv13 as i32
    );

    // Both secrets are in the proxy's snapshot, referred to by the listener, and nothing else
    // carries a key.
    let secrets = t.proxies["gw-a"].snapshot.of_type(SECRET).unwrap();
    assert_eq!(secrets.len(), 2);
    let shop = Secret::decode(secrets["cert:tls/shop"].body.value.as_slice()).unwrap();
    let Some(secret::Type::TlsCertificate(c)) = shop.r#type else {
        panic!("not a certificate");
    };
    assert!(format!("{:?}", c.private_key).contains("version 1"));
    let refs = &t.proxies["gw-a"].snapshot.of_type(LISTENER).unwrap()["gw-https"].refs;
    assert!(refs
        .iter()
        .any(|r| r.type_url == SECRET && r.name == "cert:tls/api"));
    // Renderings never show a key.
    let shown = render_proxy(&t.proxies["gw-a"]);
    assert!(shown.contains(REDACTED), "{shown}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
}

#[test]
fn a_bad_new_version_warns_on_its_field_and_a_secret_with_nothing_good_rejects_the_gateway() {
    let c = config(&format!(
        "{BASE}{}",
        gateway("    certificates: [{secret: tls/shop}, {secret: tls/api}]\n")
    ));
    let mut shop = cert("version 1", &["shop.example.com"]);
    shop.problem = Some("version 2: key does not match the certificate".into());
    let missing = SecretEntry {
        problem: Some("not found in Vault".into()),
        ..Default::default()
    };
    let t = with_secrets(
        c.clone(),
        &[("tls/shop", shop.clone()), ("tls/api", missing.clone())],
    );
    let gw = report(&t, ObjectKey::gateway("https"));
    assert_eq!(gw.state, State::Warning, "{gw:?}");
    let paths: Vec<(&str, &str)> = gw
        .warnings
        .iter()
        .map(|p| (p.path.as_str(), p.message.as_str()))
        .collect();
    assert!(
        paths
            .iter()
            .any(|(p, m)| *p == "spec.tls.certificates[0].secret"
                && m.contains("version 2: key does not match")
                && m.contains("serving version 1")),
        "{paths:?}"
    );
    assert!(
        paths
            .iter()
            .any(|(p, m)| *p == "spec.tls.certificates[1].secret" && m.contains("not found")),
        "{paths:?}"
    );
    // api.example.com is served, and no certificate carries it.
    assert!(
        paths
            .iter()
            .any(|(p, m)| *p == "spec.tls.certificates" && m.contains("\"api.example.com\"")),
        "{paths:?}"
    );
    assert_eq!(listener(&t, "gw-a", "gw-https").filter_chains.len(), 1);

    // With nothing good at all, the gateway is rejected and no listener is made.
    let t = with_secrets(c, &[("tls/shop", missing.clone()), ("tls/api", missing)]);
    let gw = report(&t, ObjectKey::gateway("https"));
    assert_eq!(gw.state, State::Rejected, "{gw:?}");
    assert_eq!(gw.errors[0].path, "spec.tls.certificates[0].secret");
    assert!(t.proxies["gw-a"]
        .snapshot
        .of_type(LISTENER)
        .is_none_or(|l| l.is_empty()));
}

#[test]
fn no_secret_goes_where_xds_may_not_carry_it() {
    let mut c = config(&format!(
        "{BASE}{}",
        gateway("    certificates: [{secret: tls/shop}]\n")
    ));
    c.secrets.refused = Some("xDS is plaintext off loopback".into());
    let t = with_secrets(c, &[("tls/shop", cert("version 1", &["shop.example.com"]))]);
    let gw = report(&t, ObjectKey::gateway("https"));
    assert_eq!(gw.state, State::Rejected);
    assert_eq!(gw.errors[0].path, "spec.tls");
    assert!(t.proxies["gw-a"]
        .snapshot
        .of_type(SECRET)
        .is_none_or(|s| s.is_empty()));
}

#[test]
fn a_proxy_gets_only_the_secrets_of_its_own_gateways() {
    let text = format!(
        "{BASE}{}---\nkind: Gateway\nname: other\nspec:\n  bindPort: 443\n  proxyNames: [gw-b]\n  tls:\n    certificates: [{{secret: tls/api}}]\n",
        gateway("    certificates: [{secret: tls/shop}]\n")
    );
    let t = with_secrets(
        config(&text),
        &[
            ("tls/shop", cert("version 1", &["shop.example.com"])),
            ("tls/api", cert("version 1", &["api.example.com"])),
        ],
    );
    let names = |p: &str| -> Vec<String> {
        t.proxies[p]
            .snapshot
            .of_type(SECRET)
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(names("gw-a"), ["cert:tls/shop"]);
    assert_eq!(names("gw-b"), ["cert:tls/api"]);
}

#[test]
fn an_upstream_with_tls_verifies_against_its_ca_or_gets_no_hosts() {
    let text = "
kind: Upstream
name: billing
spec:
  static:
    hosts: [{address: 10.0.0.7, port: 8443}]
  tls:
    sni: billing.internal
    ca: tls/internal-ca
---
kind: VirtualService
name: b
spec:
  domains: ['*']
  routes: [{upstream: billing}]
---
kind: Gateway
name: edge
spec:
  bindPort: 80
  proxyNames: [gw-a]
";
    let t = with_secrets(config(text), &[("tls/internal-ca", ca("version 2"))]);
    let cluster = t.proxies["gw-a"].snapshot.of_type(CLUSTER).unwrap()["billing"].clone();
    assert!(cluster
        .refs
        .iter()
        .any(|r| r.type_url == SECRET && r.name == "ca:tls/internal-ca"));
    let decoded = Cluster::decode(cluster.body.value.as_slice()).unwrap();
    assert_eq!(
        decoded.transport_socket.unwrap().name,
        "envoy.transport_sockets.tls"
    );
    assert!(t.proxies["gw-a"]
        .snapshot
        .of_type(SECRET)
        .unwrap()
        .contains_key("ca:tls/internal-ca"));

    // No CA: rejected on the field, no hosts (503), never plaintext.
    let t = with_secrets(config(text), &[]);
    let up = report(&t, ObjectKey::upstream("billing"));
    assert_eq!(up.state, State::Rejected);
    assert_eq!(up.errors[0].path, "spec.tls.ca");
    let cluster = t.proxies["gw-a"].snapshot.of_type(CLUSTER).unwrap()["billing"].clone();
    assert!(Cluster::decode(cluster.body.value.as_slice())
        .unwrap()
        .transport_socket
        .is_none());
}

#[test]
fn a_plaintext_gateway_can_redirect_everything_to_https() {
    let text = format!(
        "{BASE}---\nkind: Gateway\nname: http\nspec:\n  bindPort: 80\n  proxyNames: [gw-a]\n  httpsRedirect: {{port: 8443}}\n"
    );
    let t = translate(&config(&text));
    let shown = render_proxy(&t.proxies["gw-a"]);
    assert!(shown.contains("HttpsRedirect(\n"), "{shown}");
    assert!(shown.contains("port_redirect: 8443"), "{shown}");
    // Nothing upstream is needed for a redirect.
    assert!(t.proxies["gw-a"]
        .snapshot
        .of_type(CLUSTER)
        .is_none_or(|c| c.is_empty()));
}

//! The client talks to an https Consul that verifies clients, with the CA and the
//! client certificate from CONSUL_CACERT / CONSUL_CLIENT_CERT / CONSUL_CLIENT_KEY.
//! The server here is a TLS listener answering one KV read the way Consul does.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio_rustls::rustls;
use vmesh_consul::{Client, ConsulConfig, ConsulEnv};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "test consul CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca_cert.pem(),
        server: leaf(vec!["localhost".into(), "127.0.0.1".into()]),
        client: leaf(vec!["vmesh-controller".into()]),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Serves every request with one KV entry over TLS, requiring a client certificate
/// signed by the CA.
async fn serve(pki: &Pki) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(pki.server.0.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(pki.server.1.as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().fallback(|| async {
        (
            [("X-Consul-Index", "42")],
            r#"[{"Key":"vmesh/config/Upstream/a","Value":"aGk=","CreateIndex":40,"ModifyIndex":42,"LockIndex":0,"Flags":0}]"#,
        )
    });
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                // A client without a certificate fails the handshake here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    port
}

#[tokio::test]
async fn reads_kv_over_mutual_tls() {
    let pki = pki();
    let dir = std::env::temp_dir().join(format!("vmesh-consul-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = write(&dir, "ca.pem", &pki.ca_pem);
    let cert = write(&dir, "client.pem", &pki.client.0);
    let key = write(&dir, "client-key.pem", &pki.client.1);
    let port = serve(&pki).await;

    let config = |client_cert: bool| {
        ConsulConfig::from_env(ConsulEnv {
            http_addr: Some(format!("https://localhost:{port}")),
            cacert: Some(ca.clone()),
            client_cert: client_cert.then(|| cert.clone()),
            client_key: client_cert.then(|| key.clone()),
            ..Default::default()
        })
        .unwrap()
    };
    let client = Client::new(&config(true)).unwrap();
    let answer = client
        .kv_list("vmesh/config/", None, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(answer.index, 42);
    assert_eq!(answer.value[0].value, b"hi");

    // Without a client certificate the server refuses the handshake.
    let client = Client::new(&config(false)).unwrap();
    let err = client
        .kv_list("vmesh/config/", None, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot reach Consul"), "{err}");

    // A CA file that holds no certificate is named.
    let empty = write(&dir, "empty.pem", "");
    let e = Client::new(
        &ConsulConfig::from_env(ConsulEnv {
            http_addr: Some(format!("https://localhost:{port}")),
            cacert: Some(empty),
            ..Default::default()
        })
        .unwrap(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("empty.pem"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

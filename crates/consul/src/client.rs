//! The Consul HTTP calls vmesh makes: KV reads (with blocking queries), writes
//! with CAS, deletes, and sessions for leader election.
//!
//! Written on hyper rather than a Consul client crate: `rs-consul` decodes every
//! value as UTF-8 (a KV value may be any bytes), reports a missing prefix as an
//! error without the `X-Consul-Index` a blocking watch needs next, and has no
//! session renew. The calls are few and the client is small.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use crate::{ConsulConfig, ConsulError};

/// One KV entry, its value decoded from base64.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: Vec<u8>,
    pub create_index: u64,
    pub modify_index: u64,
    pub lock_index: u64,
    pub flags: u64,
    pub session: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WireEntry {
    key: String,
    value: Option<String>,
    create_index: u64,
    modify_index: u64,
    #[serde(default)]
    lock_index: u64,
    #[serde(default)]
    flags: u64,
    #[serde(default)]
    session: Option<String>,
}

/// A read's answer and the index to block on next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Indexed<T> {
    pub index: u64,
    pub value: T,
    /// Consul left out entries the token may not read: the answer is incomplete.
    pub filtered_by_acls: bool,
}

pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) index: u64,
    pub(crate) filtered: bool,
    pub(crate) body: Bytes,
}

/// Conditions of a KV write.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    /// Write only if the key's ModifyIndex is this (0: only if the key does not exist).
    pub cas: Option<u64>,
    pub flags: Option<u64>,
    /// Take the lock on the key for this session.
    pub acquire: Option<String>,
    /// Give up this session's lock on the key.
    pub release: Option<String>,
}

/// A session for leader election.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct SessionRequest {
    pub name: String,
    /// e.g. "15s"
    #[serde(rename = "TTL")]
    pub ttl: String,
    /// "release" or "delete"
    pub behavior: String,
    /// e.g. "1s"; "0s" disables it.
    pub lock_delay: String,
}

#[derive(Clone)]
pub struct Client {
    http: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    token: Option<String>,
    datacenter: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// How long a call may take beyond a blocking query's own wait.
pub(crate) const SLACK: Duration = Duration::from_secs(10);

impl Client {
    pub fn new(config: &ConsulConfig) -> Result<Self, ConsulError> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(config)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        Ok(Client {
            http: HyperClient::builder(TokioExecutor::new()).build(https),
            base: config.base_url()?,
            token: config.token.clone(),
            datacenter: config.datacenter.clone(),
        })
    }

    /// A client of the Consul at `address` with no token and default TLS (tests, tools).
    pub fn at(address: &str) -> Result<Self, ConsulError> {
        Self::new(&ConsulConfig {
            address: address.to_string(),
            ..ConsulConfig::default()
        })
    }

    pub fn address(&self) -> &str {
        &self.base
    }

    /// Every entry under `prefix`. With `index`, blocks until something under it changes
    /// past that index or `wait` ends. A prefix with no keys is an empty list (Consul
    /// answers 404 then, with the index to block on).
    pub async fn kv_list(
        &self,
        prefix: &str,
        index: Option<u64>,
        wait: Duration,
    ) -> Result<Indexed<Vec<KvEntry>>, ConsulError> {
        self.kv_read(prefix, true, index, wait).await
    }

    /// One key, if it exists; with `index`, blocks until it changes past that index or
    /// `wait` ends.
    pub async fn kv_watch_key(
        &self,
        key: &str,
        index: Option<u64>,
        wait: Duration,
    ) -> Result<Indexed<Option<KvEntry>>, ConsulError> {
        let read = self.kv_read(key, false, index, wait).await?;
        Ok(Indexed {
            index: read.index,
            value: read.value.into_iter().next(),
            filtered_by_acls: read.filtered_by_acls,
        })
    }

    async fn kv_read(
        &self,
        key: &str,
        recurse: bool,
        index: Option<u64>,
        wait: Duration,
    ) -> Result<Indexed<Vec<KvEntry>>, ConsulError> {
        let mut query = Vec::new();
        if recurse {
            query.push(("recurse", String::new()));
        }
        if let Some(i) = index {
            query.push(("index", i.to_string()));
            query.push(("wait", format!("{}ms", wait.as_millis())));
        }
        let answer = self
            .call(Method::GET, &kv_path(key), &query, None, wait + SLACK)
            .await?;
        let value = match answer.status {
            StatusCode::OK => decode_entries(&answer.body)?,
            StatusCode::NOT_FOUND => Vec::new(),
            _ => return Err(ConsulError::status(answer.status, &answer.body)),
        };
        Ok(Indexed {
            index: answer.index,
            value,
            filtered_by_acls: answer.filtered,
        })
    }

    /// Whether Consul answers at all, within `timeout`: `GET /v1/status/leader`, which needs no
    /// token and is cheap. A blocking read may legitimately wait for minutes; this tells a quiet
    /// Consul from a hung one.
    pub async fn ping(&self, timeout: Duration) -> Result<(), ConsulError> {
        let answer = self
            .call(Method::GET, "/v1/status/leader", &[], None, timeout)
            .await?;
        if answer.status == StatusCode::OK {
            Ok(())
        } else {
            Err(ConsulError::status(answer.status, &answer.body))
        }
    }

    /// One key, if it exists.
    pub async fn kv_get(&self, key: &str) -> Result<Option<KvEntry>, ConsulError> {
        let Answer { status, body, .. } = self
            .call(Method::GET, &kv_path(key), &[], None, SLACK)
            .await?;
        match status {
            StatusCode::OK => Ok(decode_entries(&body)?.into_iter().next()),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(ConsulError::status(status, &body)),
        }
    }

    /// Writes `value`; false when a condition (CAS, lock) did not hold.
    pub async fn kv_put(
        &self,
        key: &str,
        value: Vec<u8>,
        options: &WriteOptions,
    ) -> Result<bool, ConsulError> {
        let mut query = Vec::new();
        if let Some(cas) = options.cas {
            query.push(("cas", cas.to_string()));
        }
        if let Some(flags) = options.flags {
            query.push(("flags", flags.to_string()));
        }
        if let Some(s) = &options.acquire {
            query.push(("acquire", s.clone()));
        }
        if let Some(s) = &options.release {
            query.push(("release", s.clone()));
        }
        let Answer { status, body, .. } = self
            .call(Method::PUT, &kv_path(key), &query, Some(value), SLACK)
            .await?;
        expect_bool(status, &body)
    }

    /// Deletes a key (with `cas`, only at that ModifyIndex); false when the CAS did not hold.
    pub async fn kv_delete(&self, key: &str, cas: Option<u64>) -> Result<bool, ConsulError> {
        let query: Vec<(&str, String)> = cas.map(|c| ("cas", c.to_string())).into_iter().collect();
        let Answer { status, body, .. } = self
            .call(Method::DELETE, &kv_path(key), &query, None, SLACK)
            .await?;
        expect_bool(status, &body)
    }

    /// Creates a session; returns its ID.
    pub async fn session_create(&self, request: &SessionRequest) -> Result<String, ConsulError> {
        let body = serde_json::to_vec(request).map_err(|e| ConsulError::Decode(e.to_string()))?;
        let Answer { status, body, .. } = self
            .call(Method::PUT, "/v1/session/create", &[], Some(body), SLACK)
            .await?;
        if status != StatusCode::OK {
            return Err(ConsulError::status(status, &body));
        }
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let created: Created =
            serde_json::from_slice(&body).map_err(|e| ConsulError::Decode(e.to_string()))?;
        Ok(created.id)
    }

    /// Renews a session; false when Consul no longer knows it (it was invalidated).
    pub async fn session_renew(&self, id: &str) -> Result<bool, ConsulError> {
        let Answer { status, body, .. } = self
            .call(
                Method::PUT,
                &format!("/v1/session/renew/{id}"),
                &[],
                None,
                SLACK,
            )
            .await?;
        match status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(ConsulError::status(status, &body)),
        }
    }

    /// Destroys a session, releasing (or deleting) what it holds.
    pub async fn session_destroy(&self, id: &str) -> Result<(), ConsulError> {
        let Answer { status, body, .. } = self
            .call(
                Method::PUT,
                &format!("/v1/session/destroy/{id}"),
                &[],
                None,
                SLACK,
            )
            .await?;
        if status == StatusCode::OK {
            Ok(())
        } else {
            Err(ConsulError::status(status, &body))
        }
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Answer, ConsulError> {
        let mut url = format!("{}{}", self.base, path);
        let mut sep = '?';
        let dc = self.datacenter.as_ref().map(|dc| ("dc", dc.clone()));
        for (k, v) in query.iter().cloned().chain(dc) {
            url.push(sep);
            sep = '&';
            url.push_str(k);
            if !v.is_empty() {
                url.push('=');
                url.push_str(&encode_query_value(&v));
            }
        }
        let mut req = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ConsulError::Transport(format!("{path}: {e}")))?;
        let fut = async {
            let resp = self.http.request(req).await.map_err(|e| {
                ConsulError::Transport(format!("{}: {}", self.base, error_chain(&e)))
            })?;
            let status = resp.status();
            let index = resp
                .headers()
                .get("X-Consul-Index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let filtered = resp
                .headers()
                .get("X-Consul-Results-Filtered-By-ACLs")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ConsulError::Transport(format!("{}: {e}", self.base)))?
                .to_bytes();
            Ok(Answer {
                status,
                index,
                filtered,
                body,
            })
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| {
            ConsulError::Transport(format!("{}: no answer in {timeout:?}", self.base))
        })?
    }
}

/// TLS for an https Consul: the CA from CONSUL_CACERT (the system's roots without it) and,
/// when Consul verifies clients, the certificate and key from CONSUL_CLIENT_CERT/KEY.
fn tls_config(config: &ConsulConfig) -> Result<rustls::ClientConfig, ConsulError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls_err = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        ConsulError::Config(format!("{what} {}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_cert {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| tls_err("CONSUL_CACERT", path, &e))?
            {
                let cert = cert.map_err(|e| tls_err("CONSUL_CACERT", path, &e))?;
                roots
                    .add(cert)
                    .map_err(|e| tls_err("CONSUL_CACERT", path, &e))?;
            }
            if roots.is_empty() {
                return Err(tls_err("CONSUL_CACERT", path, &"no certificate in it"));
            }
        }
        None => {
            // The system's roots, for a Consul with a publicly trusted certificate.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConsulError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    match (&config.client_cert, &config.client_key) {
        (Some(cert_path), Some(key_path)) => {
            let certs = CertificateDer::pem_file_iter(cert_path)
                .map_err(|e| tls_err("CONSUL_CLIENT_CERT", cert_path, &e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls_err("CONSUL_CLIENT_CERT", cert_path, &e))?;
            // The key's own parse errors could quote it: say only which file failed.
            let key = PrivateKeyDer::from_pem_file(key_path)
                .map_err(|_| tls_err("CONSUL_CLIENT_KEY", key_path, &"not a PEM private key"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| ConsulError::Config(format!("CONSUL_CLIENT_CERT/KEY: {e}")))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

fn kv_path(key: &str) -> String {
    let encoded: Vec<String> = key.split('/').map(encode_segment).collect();
    format!("/v1/kv/{}", encoded.join("/"))
}

fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn encode_query_value(s: &str) -> String {
    encode_segment(s)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn expect_bool(status: StatusCode, body: &[u8]) -> Result<bool, ConsulError> {
    if status != StatusCode::OK {
        return Err(ConsulError::status(status, body));
    }
    match body.trim_ascii() {
        b"true" => Ok(true),
        b"false" => Ok(false),
        other => Err(ConsulError::Decode(format!(
            "expected true or false, got {:?}",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// The entries of a KV read's body as Consul sends it: a JSON array, values in base64 (`null`
/// for a folder). Public for the fuzz targets.
pub fn decode_entries(body: &[u8]) -> Result<Vec<KvEntry>, ConsulError> {
    let wire: Vec<WireEntry> =
        serde_json::from_slice(body).map_err(|e| ConsulError::Decode(e.to_string()))?;
    wire.into_iter()
        .map(|w| {
            let value = match w.value {
                Some(v) => base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map_err(|e| {
                        ConsulError::Decode(format!("{}: value is not base64: {e}", w.key))
                    })?,
                None => Vec::new(),
            };
            Ok(KvEntry {
                key: w.key,
                value,
                create_index: w.create_index,
                modify_index: w.modify_index,
                lock_index: w.lock_index,
                flags: w.flags,
                session: w.session,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_percent_encoded_per_segment() {
        assert_eq!(
            kv_path("vmesh/config/VirtualService/shop"),
            "/v1/kv/vmesh/config/VirtualService/shop"
        );
        assert_eq!(kv_path("a b/c?d"), "/v1/kv/a%20b/c%3Fd");
    }

    #[test]
    fn entries_decode_base64_and_null_values() {
        let body = br#"[{"Key":"a","Value":"aGk=","CreateIndex":1,"ModifyIndex":2,"LockIndex":0,"Flags":3},
                        {"Key":"b/","Value":null,"CreateIndex":4,"ModifyIndex":4,"LockIndex":0,"Flags":0}]"#;
        let e = decode_entries(body).unwrap();
        assert_eq!(e[0].value, b"hi");
        assert_eq!((e[0].modify_index, e[0].flags), (2, 3));
        assert!(e[1].value.is_empty());
    }
}

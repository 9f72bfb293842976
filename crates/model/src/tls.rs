//! TLS in the config: a gateway's `spec.tls` (certificates chosen by SNI, protocol versions,
//! ciphers, client certificates), a gateway's `spec.httpsRedirect`, an upstream's `spec.tls`, and
//! the names of the secrets they refer to.
//!
//! A secret is named by its path (`vmesh/tls/shop`): in Vault, the KV v2 path under the
//! controller's mount (`vault kv put secret/vmesh/tls/shop cert=@shop.crt key=@shop.key`); in a
//! secrets directory, the directory `<secrets-dir>/vmesh/tls/shop/` with one file per field
//! (`cert`, `key`, `ca`). What a secret holds is not config: the controller reads it
//! ([`crate::Secrets`]) and the translator looks it up by name.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::problem::{field, index, Problem};
use crate::validate::Problems;

/// Most certificates one gateway may serve.
pub const MAX_GATEWAY_CERTIFICATES: usize = 64;
/// Longest secret name, in bytes.
pub const MAX_SECRET_NAME_BYTES: usize = 256;

/// Cipher suites (TLS 1.2 and below) a gateway may offer, by their BoringSSL names, which is
/// what Envoy takes. TLS 1.3 suites are not configurable in Envoy.
pub const CIPHER_SUITES: [&str; 15] = [
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA",
    "AES256-SHA",
    "ECDHE-PSK-CHACHA20-POLY1305",
];

/// A TLS protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

impl TlsVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        }
    }
}

/// `Gateway.spec.tls`: the gateway terminates TLS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayTls {
    /// The certificates served, each chosen by the names (DNS SANs) it carries when a client
    /// asks for one of them (SNI). The first one is served to clients that ask for no name or
    /// for a name no certificate carries.
    pub certificates: Vec<CertificateRef>,
    /// The oldest protocol version accepted.
    #[serde(default = "default_min_version")]
    pub min_version: TlsVersion,
    /// The newest protocol version accepted; Envoy's newest when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_version: Option<TlsVersion>,
    /// Cipher suites for TLS 1.2, in order of preference; Envoy's defaults when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher_suites: Option<Vec<String>>,
    /// Ask clients for a certificate, verified against a CA from a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<ClientCertificate>,
}

fn default_min_version() -> TlsVersion {
    TlsVersion::V1_2
}

/// One certificate of a gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertificateRef {
    /// The secret with `cert` (PEM chain, leaf first) and `key` (PEM private key).
    pub secret: String,
}

/// `Gateway.spec.tls.clientCertificate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientCertificate {
    /// The secret whose `ca` field (PEM certificates) client certificates must chain to.
    pub ca: String,
    /// Accept clients without a certificate too (a certificate they do present must verify).
    #[serde(default)]
    pub optional: bool,
}

/// `Gateway.spec.httpsRedirect`: every request on this (plaintext) gateway is answered with a
/// redirect to the same URL over HTTPS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpsRedirect {
    /// The port of the HTTPS URL; 443 (left out of the URL) by default.
    #[serde(default = "default_https_port")]
    pub port: u16,
}

fn default_https_port() -> u16 {
    443
}

/// `Upstream.spec.tls`: connections to the upstream's hosts use TLS, verified against a CA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpstreamTls {
    /// The server name sent (SNI), which the host's certificate must also carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// The secret whose `ca` field (PEM certificates) the hosts' certificates must chain to.
    pub ca: String,
}

/// Whether `name` can name a secret: `/`-separated segments of letters, digits, `.`, `_` and
/// `-` (not `.` or `..`), at most [`MAX_SECRET_NAME_BYTES`]. The same name is a Vault KV path
/// and a path under the secrets directory, so it may never climb out of either.
pub fn is_valid_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SECRET_NAME_BYTES
        && name.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

pub(crate) fn check_secret_name(path: &str, name: &str, problems: &mut Problems) {
    if !is_valid_secret_name(name) {
        problems.push(Problem::new(
            path,
            format!(
                "{name:?} is not a secret name: '/'-separated segments of letters, digits, '.', '_' and '-' (not '.' or '..'), at most {MAX_SECRET_NAME_BYTES} bytes"
            ),
        ));
    }
}

/// Whether `name` is a DNS name a certificate or SNI can carry.
pub(crate) fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl GatewayTls {
    /// Every secret this refers to, with the field that names it.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        self.certificates
            .iter()
            .map(|c| c.secret.as_str())
            .chain(self.client_certificate.iter().map(|c| c.ca.as_str()))
    }

    pub(crate) fn validate(&self, path: &str, problems: &mut Problems) {
        let certs_path = field(path, "certificates");
        if self.certificates.is_empty() {
            problems.push(Problem::new(
                &certs_path,
                "must list at least one certificate",
            ));
        }
        if self.certificates.len() > MAX_GATEWAY_CERTIFICATES {
            problems.push(Problem::new(
                &certs_path,
                format!(
                    "has {} certificates; the limit is {MAX_GATEWAY_CERTIFICATES}",
                    self.certificates.len()
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, cert) in self.certificates.iter().enumerate() {
            let p = field(&index(&certs_path, i), "secret");
            check_secret_name(&p, &cert.secret, problems);
            if !seen.insert(cert.secret.as_str()) {
                problems.push(Problem::new(
                    p,
                    format!("secret {:?} is listed twice", cert.secret),
                ));
            }
        }
        if let Some(max) = self.max_version {
            if max < self.min_version {
                problems.push(Problem::new(
                    field(path, "maxVersion"),
                    format!(
                        "{} is older than minVersion {}",
                        max.as_str(),
                        self.min_version.as_str()
                    ),
                ));
            }
        }
        if let Some(suites) = &self.cipher_suites {
            let p = field(path, "cipherSuites");
            if suites.is_empty() {
                problems.push(Problem::new(
                    &p,
                    "must list at least one cipher suite (or be omitted)",
                ));
            }
            if self.min_version == TlsVersion::V1_3 {
                problems.push(Problem::new(
                    &p,
                    "applies to TLS 1.2 only, and minVersion is 1.3: remove it or lower minVersion",
                ));
            }
            let mut seen = BTreeSet::new();
            for (i, suite) in suites.iter().take(CIPHER_SUITES.len() + 1).enumerate() {
                let p = index(&p, i);
                if !CIPHER_SUITES.contains(&suite.as_str()) {
                    problems.push(Problem::new(
                        p,
                        format!(
                            "{suite:?} is not a cipher suite Envoy offers; use one of {}",
                            CIPHER_SUITES.join(", ")
                        ),
                    ));
                } else if !seen.insert(suite.as_str()) {
                    problems.push(Problem::new(p, format!("{suite:?} is listed twice")));
                }
            }
        }
        if let Some(client) = &self.client_certificate {
            check_secret_name(
                &field(&field(path, "clientCertificate"), "ca"),
                &client.ca,
                problems,
            );
        }
    }
}

impl HttpsRedirect {
    pub(crate) fn validate(&self, path: &str, problems: &mut Problems) {
        if self.port == 0 {
            problems.push(Problem::new(
                field(path, "port"),
                "must be between 1 and 65535",
            ));
        }
    }
}

impl UpstreamTls {
    pub(crate) fn validate(&self, path: &str, problems: &mut Problems) {
        if let Some(sni) = &self.sni {
            if !is_dns_name(sni) {
                problems.push(Problem::new(
                    field(path, "sni"),
                    format!("{sni:?} is not a DNS name"),
                ));
            }
        }
        check_secret_name(&field(path, "ca"), &self.ca, problems);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_stay_inside_their_mount_and_directory() {
        for good in ["shop", "vmesh/tls/shop", "a.b/c_d/e-f", "x/..y"] {
            assert!(is_valid_secret_name(good), "{good}");
        }
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/",
            "../x",
            "a/../b",
            "a/./b",
            "a b",
            "a\\b",
            "ä",
            &"x".repeat(MAX_SECRET_NAME_BYTES + 1),
        ] {
            assert!(!is_valid_secret_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn dns_names() {
        assert!(is_dns_name("shop.example.com"));
        assert!(is_dns_name("localhost"));
        assert!(!is_dns_name("*.example.com"));
        assert!(!is_dns_name("a..b"));
        assert!(!is_dns_name(""));
    }
}

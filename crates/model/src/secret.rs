//! What the controller knows of the secrets the config refers to: input to translation, like
//! the [`Catalog`](crate::Catalog), filled by the controller's secret watcher, never config.
//!
//! Each secret keeps the last version that was good ([`SecretEntry::serving`]); a newer version
//! that is not usable (not PEM, a key that does not match its certificate, already expired) is
//! described in [`SecretEntry::problem`] while the last good one keeps serving.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

/// The secrets known to the controller, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Secrets {
    pub entries: BTreeMap<String, SecretEntry>,
    /// Why no secret may be sent to proxies at all (xDS is plaintext off loopback); `None` when
    /// they may be.
    pub refused: Option<String>,
    /// Secrets are not read at all (`vmeshctl validate`, offline): an object that refers to one
    /// is told so in a warning, and what needs the secret is left out.
    pub offline: bool,
}

/// One secret.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretEntry {
    /// The last good version, served.
    pub serving: Option<Arc<SecretMaterial>>,
    /// Why the latest version read is not served (or, with nothing to serve, why there is
    /// nothing): missing, unreadable, not PEM, key mismatch, expired.
    pub problem: Option<String>,
    /// A warning about what is served (it expires soon, or has expired).
    pub warning: Option<String>,
}

/// The usable content of one version of a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretMaterial {
    /// Which version this is, for status: `version 3` (Vault) or a content hash (a directory).
    pub revision: String,
    /// `cert` and `key`, when both are present.
    pub certificate: Option<TlsCertificate>,
    /// `ca`, when present.
    pub ca: Option<CaBundle>,
}

/// A certificate chain and its private key, checked to belong together.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsCertificate {
    /// PEM, leaf first.
    pub chain_pem: String,
    /// PEM private key. Never printed: its `Debug` is redacted.
    pub key_pem: KeyPem,
    /// The leaf's DNS names (subject alternative names), lowercase; wildcards as `*.example.com`.
    pub names: Vec<String>,
    /// The leaf's `notAfter`, as Unix seconds and RFC 3339.
    pub not_after: u64,
    pub not_after_text: String,
}

impl fmt::Debug for TlsCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCertificate")
            .field("names", &self.names)
            .field("not_after", &self.not_after_text)
            .field("key_pem", &self.key_pem)
            .finish_non_exhaustive()
    }
}

/// A PEM private key: no `Display`, a redacted `Debug`, no `Serialize`.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPem(String);

impl KeyPem {
    pub fn new(pem: String) -> Self {
        KeyPem(pem)
    }

    /// The PEM text, for the one place it goes: an SDS secret.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for KeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyPem(<redacted>)")
    }
}

/// CA certificates that peers' certificates are verified against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaBundle {
    pub pem: String,
    /// How many certificates it holds.
    pub certificates: usize,
}

/// A certificate a config object serves, for status (`vmeshctl status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateInfo {
    /// The secret it comes from.
    pub secret: String,
    /// Which version of the secret is served.
    pub revision: String,
    /// Its DNS names.
    pub names: Vec<String>,
    /// When it expires (RFC 3339).
    pub not_after: String,
}

impl CertificateInfo {
    pub fn of(secret: &str, material: &SecretMaterial, cert: &TlsCertificate) -> Self {
        CertificateInfo {
            secret: secret.to_string(),
            revision: material.revision.clone(),
            names: cert.names.clone(),
            not_after: cert.not_after_text.clone(),
        }
    }
}

/// Whether a certificate name (possibly `*.example.com`) covers `host` (lowercase): a wildcard
/// covers exactly one leftmost label, as in RFC 6125.
pub fn name_covers(name: &str, host: &str) -> bool {
    match name.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == parent),
        None => name == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_covers_one_label() {
        assert!(name_covers("shop.example.com", "shop.example.com"));
        assert!(name_covers("*.example.com", "shop.example.com"));
        assert!(!name_covers("*.example.com", "example.com"));
        assert!(!name_covers("*.example.com", "a.shop.example.com"));
        assert!(!name_covers("shop.example.com", "api.example.com"));
    }

    #[test]
    fn a_key_is_never_printed() {
        let key = KeyPem::new("-----BEGIN PRIVATE KEY-----\nSECRETBYTES".into());
        let cert = TlsCertificate {
            chain_pem: String::new(),
            key_pem: key,
            names: vec!["a".into()],
            not_after: 0,
            not_after_text: String::new(),
        };
        assert!(!format!("{cert:?}").contains("SECRETBYTES"));
    }
}

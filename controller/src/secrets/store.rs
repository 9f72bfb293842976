//! [`SecretStore`]: what the secret watcher knows of each secret, with last-good semantics.
//! No IO, no clock: reads and `now` go in, [`SecretEntry`]s come out.
//!
//! - A version that is usable replaces the one served.
//! - A version that is not (not PEM, a key that does not match, expired, no DNS name), a secret
//!   that is gone, or one that cannot be read (denied) keeps the last good version serving and
//!   says why in `problem`; with nothing good yet, nothing is served.
//! - A source that cannot be reached (Vault down) changes nothing that is known; a secret never
//!   read gets a problem saying so, so that the config that refers to it is reported.
//! - What is served is checked again for expiry ([`SecretStore::recheck`]): within
//!   [`EXPIRY_WARNING`] of its end it carries a warning, and another once expired.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vmesh_model::{CaBundle, KeyPem, SecretEntry, SecretMaterial, TlsCertificate};
use vmesh_tls::material::{check_ca_bundle, check_certificate, humantime_rfc3339};

/// How long before a certificate's end its gateway says so.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// The fields a secret may hold.
pub const CERT_FIELD: &str = "cert";
pub const KEY_FIELD: &str = "key";
pub const CA_FIELD: &str = "ca";

/// One read of one secret.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretRead {
    /// Its fields at a revision (`version 3`, or a content hash).
    Found {
        revision: String,
        fields: BTreeMap<String, String>,
    },
    /// It does not exist (or its latest version is deleted).
    Missing(String),
    /// It exists but may not be read (Vault said 403).
    Denied(String),
    /// The source cannot be reached: nothing is known.
    Unreachable(String),
    /// The source answered that nothing changed since the last read.
    Unchanged,
}

impl std::fmt::Debug for SecretRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretRead::Found { revision, fields } => f
                .debug_struct("Found")
                .field("revision", revision)
                .field("fields", &fields.keys().collect::<Vec<_>>())
                .finish(),
            SecretRead::Missing(m) => f.debug_tuple("Missing").field(m).finish(),
            SecretRead::Denied(m) => f.debug_tuple("Denied").field(m).finish(),
            SecretRead::Unreachable(m) => f.debug_tuple("Unreachable").field(m).finish(),
            SecretRead::Unchanged => f.write_str("Unchanged"),
        }
    }
}

#[derive(Debug, Default)]
struct Known {
    entry: SecretEntry,
    /// The revision last judged, so an unchanged one is not parsed again.
    judged: Option<String>,
}

#[derive(Debug, Default)]
pub struct SecretStore {
    known: BTreeMap<String, Known>,
}

/// The material of one version, checked; or why it is not usable.
pub fn material(
    revision: &str,
    fields: &BTreeMap<String, String>,
    now: SystemTime,
) -> Result<SecretMaterial, String> {
    let unknown: Vec<&str> = fields
        .keys()
        .map(String::as_str)
        .filter(|k| ![CERT_FIELD, KEY_FIELD, CA_FIELD].contains(k))
        .collect();
    let cert = fields.get(CERT_FIELD);
    let key = fields.get(KEY_FIELD);
    let ca = fields.get(CA_FIELD);
    if cert.is_none() && key.is_none() && ca.is_none() {
        return Err(format!(
            "has none of the fields {CERT_FIELD}, {KEY_FIELD}, {CA_FIELD} (it has: {})",
            unknown.join(", ")
        ));
    }
    let certificate = match (cert, key) {
        (Some(cert), Some(key)) => {
            let checked = check_certificate(cert, key, now)?;
            let not_after = checked
                .not_after
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            Some(TlsCertificate {
                chain_pem: cert.clone(),
                key_pem: KeyPem::new(key.clone()),
                names: checked.names,
                not_after,
                not_after_text: humantime_rfc3339(checked.not_after),
            })
        }
        (Some(_), None) => return Err(format!("has {CERT_FIELD} but no {KEY_FIELD}")),
        (None, Some(_)) => return Err(format!("has {KEY_FIELD} but no {CERT_FIELD}")),
        (None, None) => None,
    };
    let ca = match ca {
        Some(pem) => {
            let checked = check_ca_bundle(pem)?;
            Some(CaBundle {
                pem: pem.clone(),
                certificates: checked.certificates,
            })
        }
        None => None,
    };
    Ok(SecretMaterial {
        revision: revision.to_string(),
        certificate,
        ca,
    })
}

fn expiry_warning(material: &SecretMaterial, now: SystemTime) -> Option<String> {
    let cert = material.certificate.as_ref()?;
    let end = UNIX_EPOCH + Duration::from_secs(cert.not_after);
    if end <= now {
        Some(format!(
            "the certificate expired at {}: clients refuse it; put a new one in the secret",
            cert.not_after_text
        ))
    } else if end <= now + EXPIRY_WARNING {
        Some(format!(
            "the certificate expires at {}, within {} days: put a new one in the secret",
            cert.not_after_text,
            EXPIRY_WARNING.as_secs() / 86400
        ))
    } else {
        None
    }
}

impl SecretStore {
    /// Records one read of `name`. Returns whether what the config sees changed.
    pub fn apply(&mut self, name: &str, read: SecretRead, now: SystemTime) -> bool {
        if read == SecretRead::Unchanged {
            return false;
        }
        let known = self.known.entry(name.to_string()).or_default();
        let before = known.entry.clone();
        match read {
            SecretRead::Found { revision, fields } => {
                if known.judged.as_deref() != Some(revision.as_str()) {
                    known.judged = Some(revision.clone());
                    match material(&revision, &fields, now) {
                        Ok(m) => {
                            known.entry.serving = Some(Arc::new(m));
                            known.entry.problem = None;
                        }
                        Err(e) => known.entry.problem = Some(format!("{revision}: {e}")),
                    }
                }
            }
            SecretRead::Missing(why) | SecretRead::Denied(why) => {
                known.judged = None;
                known.entry.problem = Some(why);
            }
            SecretRead::Unreachable(why) => {
                if known.entry.serving.is_none() && known.judged.is_none() {
                    known.entry.problem = Some(format!("cannot be read yet: {why}"));
                }
            }
            SecretRead::Unchanged => {}
        }
        known.entry.warning = known
            .entry
            .serving
            .as_ref()
            .and_then(|m| expiry_warning(m, now));
        known.entry != before
    }

    /// Checks what is served for expiry again. Returns whether a warning changed.
    pub fn recheck(&mut self, now: SystemTime) -> bool {
        let mut changed = false;
        for known in self.known.values_mut() {
            let warning = known
                .entry
                .serving
                .as_ref()
                .and_then(|m| expiry_warning(m, now));
            if warning != known.entry.warning {
                known.entry.warning = warning;
                changed = true;
            }
        }
        changed
    }

    /// Forgets the secrets that are no longer referred to. Returns whether any was known.
    pub fn retain(&mut self, names: &BTreeSet<String>) -> bool {
        let before = self.known.len();
        self.known.retain(|name, _| names.contains(name));
        self.known.len() != before
    }

    /// What the config sees.
    pub fn entries(&self) -> BTreeMap<String, SecretEntry> {
        self.known
            .iter()
            .map(|(name, k)| (name.clone(), k.entry.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(names: &[&str], days: u32) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let dev = vmesh_tls::dev::dev_certificate(&names, days).unwrap();
        (dev.cert_pem, dev.key_pem)
    }

    fn found(revision: &str, cert: &str, key: &str) -> SecretRead {
        SecretRead::Found {
            revision: revision.into(),
            fields: BTreeMap::from([
                (CERT_FIELD.into(), cert.into()),
                (KEY_FIELD.into(), key.into()),
            ]),
        }
    }

    #[test]
    fn a_bad_version_keeps_the_last_good_one_serving_and_says_why() {
        let now = SystemTime::now();
        let mut store = SecretStore::default();
        let (cert, key) = pair(&["shop.example.com"], 90);
        assert!(store.apply("shop", found("version 1", &cert, &key), now));
        let e = &store.entries()["shop"];
        assert_eq!(e.serving.as_ref().unwrap().revision, "version 1");
        assert_eq!(e.problem, None);

        let (_, other_key) = pair(&["shop.example.com"], 90);
        assert!(store.apply("shop", found("version 2", &cert, &other_key), now));
        let e = &store.entries()["shop"];
        assert_eq!(e.serving.as_ref().unwrap().revision, "version 1");
        let problem = e.problem.as_deref().unwrap();
        assert!(
            problem.starts_with("version 2: key does not match"),
            "{problem}"
        );

        // The same bad version read again changes nothing.
        assert!(!store.apply("shop", found("version 2", &cert, &other_key), now));
        // Gone: still serving, and saying so.
        assert!(store.apply("shop", SecretRead::Missing("not found".into()), now));
        assert_eq!(
            store.entries()["shop"].problem.as_deref(),
            Some("not found")
        );
        assert!(store.entries()["shop"].serving.is_some());
        // Back, good.
        let (cert3, key3) = pair(&["shop.example.com"], 90);
        assert!(store.apply("shop", found("version 3", &cert3, &key3), now));
        let e = &store.entries()["shop"];
        assert_eq!(e.serving.as_ref().unwrap().revision, "version 3");
        assert_eq!(e.problem, None);
    }

    #[test]
    fn an_unreachable_source_changes_nothing_known() {
        let now = SystemTime::now();
        let mut store = SecretStore::default();
        assert!(store.apply("new", SecretRead::Unreachable("timed out".into()), now));
        assert_eq!(
            store.entries()["new"].problem.as_deref(),
            Some("cannot be read yet: timed out")
        );
        let (cert, key) = pair(&["a.example.com"], 90);
        store.apply("shop", found("version 1", &cert, &key), now);
        assert!(!store.apply("shop", SecretRead::Unreachable("timed out".into()), now));
        assert_eq!(store.entries()["shop"].problem, None);
    }

    #[test]
    fn expiry_is_warned_about_before_and_after() {
        let now = SystemTime::now();
        let mut store = SecretStore::default();
        let (cert, key) = pair(&["shop.example.com"], 10);
        store.apply("shop", found("version 1", &cert, &key), now);
        let warning = store.entries()["shop"].warning.clone().unwrap();
        assert!(warning.contains("within 14 days"), "{warning}");
        assert!(store.recheck(now + Duration::from_secs(11 * 86400)));
        let warning = store.entries()["shop"].warning.clone().unwrap();
        assert!(warning.contains("expired at"), "{warning}");
        assert!(!store.recheck(now + Duration::from_secs(12 * 86400)));
    }

    #[test]
    fn fields_must_make_a_certificate_or_a_ca() {
        let now = SystemTime::now();
        let (cert, _) = pair(&["a"], 90);
        let only_cert = BTreeMap::from([(CERT_FIELD.to_string(), cert.clone())]);
        assert_eq!(
            material("v", &only_cert, now).unwrap_err(),
            "has cert but no key"
        );
        let nothing = BTreeMap::from([("crt".to_string(), cert.clone())]);
        let e = material("v", &nothing, now).unwrap_err();
        assert!(e.contains("(it has: crt)"), "{e}");
        let ca = BTreeMap::from([(CA_FIELD.to_string(), cert)]);
        assert_eq!(material("v", &ca, now).unwrap().ca.unwrap().certificates, 1);
    }
}

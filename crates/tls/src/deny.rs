//! Revoked agents: SPIFFE ids and certificate serials that are refused on every stream even
//! though their certificates still verify.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::SpiffeId;

/// A deny list of revoked identities and certificate serials. Pure data: the caller persists it
/// (JSON) and checks [`DenyList::is_revoked`] on every call and stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenyList {
    #[serde(default)]
    ids: BTreeSet<SpiffeId>,
    /// Normalized serials (see [`normalize_serial`]).
    #[serde(default)]
    serials: BTreeSet<String>,
}

impl DenyList {
    pub fn new() -> Self {
        Self::default()
    }

    /// Revokes an identity: every certificate for it is refused, including ones issued later,
    /// until [`DenyList::allow_id`].
    pub fn deny_id(&mut self, id: SpiffeId) -> bool {
        self.ids.insert(id)
    }

    /// Revokes one certificate. Accepts `3f:0a:..`, `3F0A..` and a leading `00` byte alike.
    pub fn deny_serial(&mut self, serial: &str) -> bool {
        self.serials.insert(normalize_serial(serial))
    }

    pub fn allow_id(&mut self, id: &SpiffeId) -> bool {
        self.ids.remove(id)
    }

    pub fn allow_serial(&mut self, serial: &str) -> bool {
        self.serials.remove(&normalize_serial(serial))
    }

    /// True if the identity or the certificate serial is revoked.
    pub fn is_revoked(&self, id: &SpiffeId, serial: &str) -> bool {
        self.ids.contains(id) || self.serials.contains(&normalize_serial(serial))
    }

    pub fn ids(&self) -> impl Iterator<Item = &SpiffeId> {
        self.ids.iter()
    }

    pub fn serials(&self) -> impl Iterator<Item = &str> {
        self.serials.iter().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.serials.is_empty()
    }
}

/// Lowercase hex digits without separators or leading zeros.
fn normalize_serial(serial: &str) -> String {
    let hex: String = serial
        .chars()
        .filter(|c| !matches!(c, ':' | ' ' | '-'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() && !hex.is_empty() {
        "0".to_owned()
    } else {
        trimmed.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_serials() {
        let a = SpiffeId::agent("td", "dc1", "vm-1").expect("id");
        let b = SpiffeId::agent("td", "dc1", "vm-2").expect("id");
        let mut deny = DenyList::new();
        assert!(deny.is_empty());
        assert!(!deny.is_revoked(&a, "4a:01"));
        assert!(deny.deny_id(a.clone()));
        assert!(deny.is_revoked(&a, "anything"));
        assert!(!deny.is_revoked(&b, "4a:01"));
        deny.deny_serial("4A:01");
        assert!(deny.is_revoked(&b, "4a:01"));
        assert!(deny.is_revoked(&b, "004a01"));
        assert!(!deny.is_revoked(&b, "4a:02"));
        assert!(!deny.is_revoked(&b, ""));

        let json = serde_json::to_string(&deny).expect("json");
        let back: DenyList = serde_json::from_str(&json).expect("json");
        assert_eq!(back, deny);
        assert_eq!(back.ids().count(), 1);
        assert_eq!(back.serials().collect::<Vec<_>>(), vec!["4a01"]);

        assert!(deny.allow_id(&a));
        assert!(!deny.is_revoked(&a, "4a:02"));
        assert!(deny.allow_serial("4a:01"));
        assert!(deny.is_empty());
    }
}

//! The status wire types: what the controller says of each config object, in the JSON that the
//! leader writes to `<prefix>/status/<Kind>/<name>` and the admin endpoint serves at `/status`,
//! and the report each replica writes to `<prefix>/replicas/<id>`.
//!
//! Field names are camelCase JSON. Readers ignore fields they do not know, so a newer
//! controller's status still reads in an older vmeshctl.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vmesh_model::{CertificateInfo, ObjectKey, Problem, State};

/// One object's status: `<prefix>/status/<Kind>/<name>`, and each entry of `/status`'s `objects`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStatus {
    pub kind: String,
    pub name: String,
    pub state: State,
    #[serde(default)]
    pub errors: Vec<Problem>,
    #[serde(default)]
    pub warnings: Vec<Problem>,
    /// The file or KV key that defines the object.
    #[serde(default)]
    pub source: String,
    /// Content hash of the document as last written.
    #[serde(default)]
    pub version: String,
    /// Rejected, and its last accepted version is still served.
    #[serde(default)]
    pub serving_last_good: bool,
    /// The version being served (the last accepted one when rejected).
    #[serde(default)]
    pub serving_version: Option<String>,
    /// The Consul ModifyIndex of the config value that was judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_modify_index: Option<u64>,
    #[serde(default)]
    pub proxies: ProxyCount,
    /// The certificates the object serves (a gateway with TLS): names and expiry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateInfo>,
}

impl ObjectStatus {
    /// The object this status is about, if its kind and name are valid.
    pub fn key(&self) -> Option<ObjectKey> {
        ObjectKey::parse(&format!("{}/{}", self.kind, self.name))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyCount {
    /// Proxies whose config this object contributes to.
    pub total: usize,
    /// Of those, the ones that acknowledged everything it contributes at the current version.
    pub acked: usize,
}

/// Whether the config source can be read (`/status`'s `source`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceState {
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<u32>,
}

/// One proxy the translation has config for (`/status`'s `proxies`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyState {
    pub name: String,
    /// Streams of this proxy connected to this replica.
    pub connected: usize,
    /// Every one of them holds the current config.
    pub in_sync: bool,
}

/// The admin endpoint's `/status` document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerStatus {
    pub generation: u64,
    pub translation_ms: f64,
    pub source: SourceState,
    pub objects: Vec<ObjectStatus>,
    /// Problems that belong to no object (a file that is not YAML, a key that names no
    /// object), by source.
    #[serde(default)]
    pub source_errors: BTreeMap<String, Vec<Problem>>,
    #[serde(default)]
    pub proxies: Vec<ProxyState>,
}

/// `<prefix>/replicas/<id>`: per proxy connected to the replica, the objects whose current
/// resources it holds, each with the version of the object they were translated from. The
/// leader merges every replica's report into the proxy counts of the status it writes.
///
/// On the wire: `{"<proxy>": {"<Kind>/<name>": "<version>"}}`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaReport {
    pub proxies: BTreeMap<String, BTreeMap<ObjectKey, String>>,
}

impl ReplicaReport {
    pub fn to_json(&self) -> Vec<u8> {
        let wire: BTreeMap<&String, BTreeMap<String, &String>> = self
            .proxies
            .iter()
            .map(|(proxy, objects)| {
                (
                    proxy,
                    objects.iter().map(|(k, v)| (k.to_string(), v)).collect(),
                )
            })
            .collect();
        // A map of strings always serializes.
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// Decodes a report; entries whose key names no object are left out.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let wire: BTreeMap<String, BTreeMap<String, String>> = serde_json::from_slice(bytes)?;
        let proxies = wire
            .into_iter()
            .map(|(proxy, objects)| {
                let objects = objects
                    .into_iter()
                    .filter_map(|(k, v)| Some((ObjectKey::parse(&k)?, v)))
                    .collect();
                (proxy, objects)
            })
            .collect();
        Ok(ReplicaReport { proxies })
    }

    /// Adds what `other` says proxies hold.
    pub fn merge(&mut self, other: ReplicaReport) {
        for (proxy, objects) in other.proxies {
            self.proxies.entry(proxy).or_default().extend(objects);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> ObjectStatus {
        ObjectStatus {
            kind: "VirtualService".into(),
            name: "web".into(),
            state: State::Rejected,
            errors: vec![Problem::new("spec.routes[0].match.regex", "invalid regex")],
            warnings: vec![],
            source: "vmesh/config/VirtualService/web".into(),
            version: "abc".into(),
            serving_last_good: true,
            serving_version: Some("def".into()),
            config_modify_index: Some(42),
            proxies: ProxyCount { total: 2, acked: 1 },
            certificates: vec![],
        }
    }

    #[test]
    fn object_status_is_camel_case_json_and_reads_back() {
        let s = status();
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["servingLastGood"], true);
        assert_eq!(json["configModifyIndex"], 42);
        assert_eq!(json["proxies"]["acked"], 1);
        assert_eq!(json["errors"][0]["path"], "spec.routes[0].match.regex");
        assert_eq!(serde_json::from_value::<ObjectStatus>(json).unwrap(), s);
        assert_eq!(s.key(), Some(ObjectKey::virtual_service("web")));
    }

    #[test]
    fn a_status_with_fields_added_or_left_out_still_reads() {
        let s: ObjectStatus = serde_json::from_str(
            r#"{"kind":"Upstream","name":"a","state":"Accepted","newField":1}"#,
        )
        .unwrap();
        assert_eq!(s.state, State::Accepted);
        assert_eq!(s.proxies, ProxyCount::default());
        assert!(serde_json::from_str::<ObjectStatus>(r#"{"kind":"Upstream"}"#).is_err());
    }

    #[test]
    fn replica_reports_round_trip_and_merge() {
        let mut a = ReplicaReport::default();
        a.proxies.insert(
            "gw".into(),
            BTreeMap::from([(ObjectKey::upstream("a"), "v1".to_string())]),
        );
        let json = a.to_json();
        assert_eq!(
            String::from_utf8(json.clone()).unwrap(),
            r#"{"gw":{"Upstream/a":"v1"}}"#
        );
        assert_eq!(ReplicaReport::from_json(&json).unwrap(), a);
        let odd = ReplicaReport::from_json(br#"{"gw":{"Nope/a":"v1","Gateway/g":"v2"}}"#).unwrap();
        assert_eq!(
            odd.proxies["gw"].len(),
            1,
            "keys that name no object are left out"
        );
        a.merge(odd);
        assert_eq!(a.proxies["gw"].len(), 2);
        assert!(ReplicaReport::from_json(b"[").is_err());
    }
}

//! vmesh-layout: the KV layout and the status wire types, defined once.
//!
//! Every key vmesh reads or writes in Consul KV is built and parsed by [`Layout`], and the JSON
//! stored under the status keys is [`ObjectStatus`] (the same JSON the controller's admin
//! endpoint serves in [`ControllerStatus`]). The controller, vmeshctl, the registry and the relay
//! all use this crate, so the contract cannot drift between them; the Terraform ACL policies and
//! the web console read the same names (`docs/consul.md` lists them).
//!
//! | Key | Value | Written by |
//! |---|---|---|
//! | `<prefix>/config/<Kind>/<name>` | the config document (YAML or JSON) | users (`consul kv put`, `vmeshctl apply`) |
//! | `<prefix>/status/<Kind>/<name>` | [`ObjectStatus`] JSON | the leader replica |
//! | `<prefix>/leader` | the leader's id, locked by its session | replicas (election) |
//! | `<prefix>/replicas/<id>` | [`ReplicaReport`] JSON, under the replica's session | each replica |
//! | `<prefix>/discovery/<dc>/<node>/<replica>` | the relay's discovery record (`vmesh-relay`), under the replica's session | each replica |
//! | `<prefix>/tokens/<token-id>` | a bootstrap token record (hash only) | vmeshctl, the controller |
//! | `<prefix>/agents/<dc>/<node>` | a registered agent | the controller |
//! | `<prefix>/gateways/<dc>/<proxy>` | a registered edge gateway | the controller |
//! | `<prefix>/revoked/<dc>/<node>` | a revocation | vmeshctl, the controller |
//!
//! Times in records are whole seconds since the Unix epoch ([`unix_secs`]).
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod status;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use status::{
    ControllerStatus, ObjectStatus, ProxyCount, ProxyState, ReplicaReport, SourceState,
};
use vmesh_model::ObjectKey;

/// The default prefix of every vmesh key (`--consul-prefix`).
pub const DEFAULT_PREFIX: &str = "vmesh";

const CONFIG: &str = "config";
const STATUS: &str = "status";
const LEADER: &str = "leader";
const REPLICAS: &str = "replicas";
const DISCOVERY: &str = "discovery";
const TOKENS: &str = "tokens";
const AGENTS: &str = "agents";
const GATEWAYS: &str = "gateways";
const REVOKED: &str = "revoked";

/// Where vmesh keeps things in Consul KV under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Default for Layout {
    fn default() -> Self {
        Layout::new(DEFAULT_PREFIX)
    }
}

impl Layout {
    /// The layout under `prefix` (a trailing `/` is ignored).
    pub fn new(prefix: &str) -> Self {
        Layout {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// The prefix, without a trailing `/` (e.g. `vmesh`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn folder(&self, name: &str) -> String {
        format!("{}/{name}/", self.prefix)
    }

    // --- config and status ---------------------------------------------------------------

    /// `<prefix>/config/`
    pub fn config_prefix(&self) -> String {
        self.folder(CONFIG)
    }

    /// `<prefix>/config/<Kind>/<name>`
    pub fn config_key(&self, key: &ObjectKey) -> String {
        format!("{}{key}", self.config_prefix())
    }

    /// `<prefix>/config/<Kind>/`: every config key of one kind.
    pub fn config_kind_prefix(&self, kind: vmesh_model::Kind) -> String {
        format!("{}{kind}/", self.config_prefix())
    }

    /// The object a config key names; `None` for any other key (another folder, an unknown
    /// kind, an invalid name, a deeper path).
    pub fn parse_config_key(&self, key: &str) -> Option<ObjectKey> {
        ObjectKey::parse(key.strip_prefix(&self.config_prefix())?)
    }

    /// `<prefix>/status/`
    pub fn status_prefix(&self) -> String {
        self.folder(STATUS)
    }

    /// `<prefix>/status/<Kind>/<name>`
    pub fn status_key(&self, key: &ObjectKey) -> String {
        format!("{}{key}", self.status_prefix())
    }

    /// The object a status key is about.
    pub fn parse_status_key(&self, key: &str) -> Option<ObjectKey> {
        ObjectKey::parse(key.strip_prefix(&self.status_prefix())?)
    }

    // --- replicas ----------------------------------------------------------------------------

    /// `<prefix>/leader`: the lock the replicas elect a leader with.
    pub fn leader_key(&self) -> String {
        format!("{}/{LEADER}", self.prefix)
    }

    /// `<prefix>/replicas/`
    pub fn replicas_prefix(&self) -> String {
        self.folder(REPLICAS)
    }

    /// `<prefix>/replicas/<id>`: what the proxies connected to replica `id` hold.
    pub fn replica_key(&self, id: &str) -> String {
        format!("{}{id}", self.replicas_prefix())
    }

    /// The replica id of a report key.
    pub fn parse_replica_key<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.replicas_prefix())
            .filter(|id| !id.is_empty() && !id.contains('/'))
    }

    /// `<prefix>/discovery/`
    pub fn discovery_prefix(&self) -> String {
        self.folder(DISCOVERY)
    }

    /// `<prefix>/discovery/<dc>/<node>/<replica>`: what replica `replica` accepted from the
    /// agent of node `node`.
    pub fn discovery_key(&self, dc: &str, node: &str, replica: &str) -> String {
        format!("{}{dc}/{node}/{replica}", self.discovery_prefix())
    }

    // --- the relay's registry ------------------------------------------------------------

    /// `<prefix>/tokens/`
    pub fn tokens_prefix(&self) -> String {
        self.folder(TOKENS)
    }

    /// `<prefix>/tokens/<id>`
    pub fn token_key(&self, id: &str) -> String {
        format!("{}{id}", self.tokens_prefix())
    }

    /// The token id of a token key.
    pub fn parse_token_key<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.tokens_prefix())
    }

    /// `<prefix>/agents/`
    pub fn agents_prefix(&self) -> String {
        self.folder(AGENTS)
    }

    /// `<prefix>/agents/<dc>/<node>`
    pub fn agent_key(&self, dc: &str, node: &str) -> String {
        format!("{}{dc}/{node}", self.agents_prefix())
    }

    /// `<prefix>/gateways/`
    pub fn gateways_prefix(&self) -> String {
        self.folder(GATEWAYS)
    }

    /// `<prefix>/gateways/<dc>/<proxy>`
    pub fn gateway_key(&self, dc: &str, proxy: &str) -> String {
        format!("{}{dc}/{proxy}", self.gateways_prefix())
    }

    /// `<prefix>/revoked/`
    pub fn revoked_prefix(&self) -> String {
        self.folder(REVOKED)
    }

    /// `<prefix>/revoked/<dc>/<node>`
    pub fn revocation_key(&self, dc: &str, node: &str) -> String {
        format!("{}{dc}/{node}", self.revoked_prefix())
    }
}

/// Whole seconds since the Unix epoch (0 before it): how records in KV write times.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The time `secs` seconds after the Unix epoch; `None` if it cannot be represented.
pub fn from_unix_secs(secs: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_under_the_prefix() {
        let l = Layout::new("vmesh/");
        let k = ObjectKey::virtual_service("shop");
        assert_eq!(l.config_key(&k), "vmesh/config/VirtualService/shop");
        assert_eq!(l.status_key(&k), "vmesh/status/VirtualService/shop");
        assert_eq!(
            l.config_kind_prefix(vmesh_model::Kind::Gateway),
            "vmesh/config/Gateway/"
        );
        assert_eq!(l.leader_key(), "vmesh/leader");
        assert_eq!(l.replica_key("r1"), "vmesh/replicas/r1");
        assert_eq!(
            l.discovery_key("dc1", "vm-2", "b"),
            "vmesh/discovery/dc1/vm-2/b"
        );
        assert_eq!(l.token_key("ab"), "vmesh/tokens/ab");
        assert_eq!(l.agent_key("dc1", "vm-1"), "vmesh/agents/dc1/vm-1");
        assert_eq!(l.gateway_key("dc1", "edge"), "vmesh/gateways/dc1/edge");
        assert_eq!(l.revocation_key("dc1", "vm-1"), "vmesh/revoked/dc1/vm-1");
        assert_eq!(Layout::new("team/a").config_prefix(), "team/a/config/");
        assert_eq!(Layout::default().prefix(), "vmesh");
    }

    #[test]
    fn keys_parse_back_and_nothing_else_does() {
        let l = Layout::default();
        let k = ObjectKey::virtual_service("shop");
        assert_eq!(l.parse_config_key(&l.config_key(&k)), Some(k.clone()));
        assert_eq!(l.parse_status_key(&l.status_key(&k)), Some(k.clone()));
        assert_eq!(l.parse_config_key(&l.status_key(&k)), None);
        for bad in [
            "vmesh/config/Nope/shop",
            "vmesh/config/Upstream/a/b",
            "vmesh/config/Upstream/",
            "vmesh/config/readme",
            "other/config/Upstream/a",
        ] {
            assert_eq!(l.parse_config_key(bad), None, "{bad}");
        }
        assert_eq!(l.parse_replica_key("vmesh/replicas/r1"), Some("r1"));
        assert_eq!(l.parse_replica_key("vmesh/replicas/a/b"), None);
        assert_eq!(l.parse_replica_key("vmesh/replicas/"), None);
        assert_eq!(l.parse_token_key("vmesh/tokens/ab"), Some("ab"));
    }

    #[test]
    fn unix_seconds_round_trip() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(unix_secs(t), 1_700_000_000);
        assert_eq!(from_unix_secs(1_700_000_000), Some(t));
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(5)), 0);
    }
}

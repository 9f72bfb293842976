//! The local agent's state: services registered on the emulator's one node and their TTL checks.
//! The store holds it beside the KV data, and every change takes the next index of the same raft
//! counter (passed in), so blocking node views wake through the same machinery.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A health check's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    Passing,
    Warning,
    Critical,
}

impl CheckStatus {
    /// Consul's name for it: `passing`, `warning`, `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Passing => "passing",
            CheckStatus::Warning => "warning",
            CheckStatus::Critical => "critical",
        }
    }
}

impl std::str::FromStr for CheckStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "passing" => Ok(CheckStatus::Passing),
            "warning" => Ok(CheckStatus::Warning),
            "critical" => Ok(CheckStatus::Critical),
            _ => Err(format!("Invalid check status: {s:?}")),
        }
    }
}

/// A TTL check registered with a service (`Check: {TTL: "10s"}` in
/// `PUT /v1/agent/service/register`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRegistration {
    /// Empty: `service:<service id>` (`service:<service id>:<n>` when the service has several).
    pub id: String,
    /// Empty: `Service '<name>' check`.
    pub name: String,
    pub ttl: Duration,
    /// The initial status; `None` means `critical`, as in Consul.
    pub status: Option<CheckStatus>,
    pub notes: String,
}

impl CheckRegistration {
    /// A TTL check with the default ID and name, starting `critical`.
    pub fn ttl(ttl: Duration) -> Self {
        CheckRegistration {
            id: String::new(),
            name: String::new(),
            ttl,
            status: None,
            notes: String::new(),
        }
    }
}

/// A service definition, as `PUT /v1/agent/service/register` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRegistration {
    /// Empty: the name.
    pub id: String,
    pub name: String,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    /// Empty means "the node's address" (as in Consul).
    pub address: String,
    pub port: u16,
    /// `TaggedAddresses` as given (a JSON object), `None` when not given.
    pub tagged_addresses: Option<serde_json::Map<String, serde_json::Value>>,
    /// `(Passing, Warning)`; Consul's default is `(1, 1)`.
    pub weights: (u64, u64),
    pub enable_tag_override: bool,
    pub checks: Vec<CheckRegistration>,
}

impl ServiceRegistration {
    /// A service named `name` (ID = name) on `port`, no tags, meta, address or checks.
    pub fn new(name: &str, port: u16) -> Self {
        ServiceRegistration {
            id: String::new(),
            name: name.to_owned(),
            tags: Vec::new(),
            meta: BTreeMap::new(),
            address: String::new(),
            port,
            tagged_addresses: None,
            weights: (1, 1),
            enable_tag_override: false,
            checks: Vec::new(),
        }
    }

    pub fn with_id(mut self, id: &str) -> Self {
        self.id = id.to_owned();
        self
    }

    pub fn with_tags(mut self, tags: &[&str]) -> Self {
        self.tags = tags.iter().map(|t| (*t).to_owned()).collect();
        self
    }

    pub fn with_meta(mut self, key: &str, value: &str) -> Self {
        self.meta.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn with_address(mut self, address: &str) -> Self {
        self.address = address.to_owned();
        self
    }

    /// Adds a TTL check with the default ID (`service:<id>` if it is the only one).
    pub fn with_ttl_check(mut self, ttl: Duration) -> Self {
        self.checks.push(CheckRegistration::ttl(ttl));
        self
    }

    /// The service ID this definition registers.
    pub fn service_id(&self) -> &str {
        if self.id.is_empty() {
            &self.name
        } else {
            &self.id
        }
    }
}

/// A service registered on the agent, as the emulator keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentService {
    pub id: String,
    pub name: String,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub address: String,
    pub port: u16,
    pub tagged_addresses: Option<serde_json::Map<String, serde_json::Value>>,
    pub weights: (u64, u64),
    pub enable_tag_override: bool,
    pub create_index: u64,
    pub modify_index: u64,
}

impl AgentService {
    fn same_definition(&self, other: &AgentService) -> bool {
        self.name == other.name
            && self.tags == other.tags
            && self.meta == other.meta
            && self.address == other.address
            && self.port == other.port
            && self.tagged_addresses == other.tagged_addresses
            && self.weights == other.weights
            && self.enable_tag_override == other.enable_tag_override
    }
}

/// A TTL check on the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCheck {
    pub id: String,
    pub name: String,
    pub status: CheckStatus,
    pub notes: String,
    pub output: String,
    pub service_id: String,
    pub service_name: String,
    pub service_tags: Vec<String>,
    pub ttl: Duration,
    pub create_index: u64,
    pub modify_index: u64,
    /// When the TTL runs out (`None` once it has, until the next update).
    pub expires: Option<Instant>,
}

/// Output Consul gives a TTL check whose TTL ran out.
fn expired_output(last: &str) -> String {
    if last.is_empty() {
        "TTL expired".to_owned()
    } else {
        format!("TTL expired (last output before timeout follows): {last}")
    }
}

/// The agent's node, services and checks, as the catalog's tables hold them.
#[derive(Debug, Default)]
pub(crate) struct LocalAgent {
    /// Index at which the agent's node (and its `serfHealth` check) was registered in the
    /// catalog: 0 until the first agent write, which registers it first (as a Consul agent
    /// does when it joins).
    pub node_index: u64,
    /// Index of the last change to the agent's services (the catalog's services table).
    pub services_index: u64,
    /// Index of the last change to the agent's checks (the catalog's checks table).
    pub checks_index: u64,
    /// The agent's services by ID.
    pub services: BTreeMap<String, AgentService>,
    /// The agent's (TTL) checks by check ID.
    pub checks: BTreeMap<String, AgentCheck>,
}

/// Takes the next index of the raft counter.
fn next_index(raft: &mut u64) -> u64 {
    *raft += 1;
    *raft
}

impl LocalAgent {
    /// Registers the agent's node (and `serfHealth`) at the next index if not done yet.
    fn ensure_node(&mut self, raft: &mut u64) {
        if self.node_index == 0 {
            let idx = next_index(raft);
            self.node_index = idx;
            self.services_index = idx;
            self.checks_index = idx;
        }
    }

    /// The index of `GET /v1/catalog/node-services/<node>` (nodes and services tables).
    pub fn node_services_index(&self) -> u64 {
        self.node_index.max(self.services_index).max(1)
    }

    /// The index of `GET /v1/health/node/<node>` (checks table).
    pub fn node_checks_index(&self) -> u64 {
        self.checks_index.max(1)
    }

    /// Registers (or updates) a service and its TTL checks, all under one index. Without
    /// `replace_existing_checks`, checks of the service missing from the definition stay (as in
    /// Consul); a re-registered check keeps its status and output. Returns the service ID.
    pub fn register_service(
        &mut self,
        raft: &mut u64,
        reg: ServiceRegistration,
        replace_existing_checks: bool,
        now: Instant,
    ) -> String {
        self.ensure_node(raft);
        let id = reg.service_id().to_owned();
        let multi = reg.checks.len() > 1;
        let check_ids: Vec<String> = reg
            .checks
            .iter()
            .enumerate()
            .map(|(i, c)| match (c.id.is_empty(), multi) {
                (false, _) => c.id.clone(),
                (true, false) => format!("service:{id}"),
                (true, true) => format!("service:{id}:{}", i + 1),
            })
            .collect();
        let new_checks: Vec<AgentCheck> = reg
            .checks
            .iter()
            .zip(&check_ids)
            .map(|(c, check_id)| {
                let check_id = check_id.clone();
                let existing = self.checks.get(&check_id);
                AgentCheck {
                    name: if c.name.is_empty() {
                        format!("Service '{}' check", reg.name)
                    } else {
                        c.name.clone()
                    },
                    status: existing
                        .map(|e| e.status)
                        .or(c.status)
                        .unwrap_or(CheckStatus::Critical),
                    notes: c.notes.clone(),
                    output: existing.map(|e| e.output.clone()).unwrap_or_default(),
                    service_id: id.clone(),
                    service_name: reg.name.clone(),
                    service_tags: reg.tags.clone(),
                    ttl: c.ttl,
                    create_index: existing.map_or(0, |e| e.create_index),
                    modify_index: existing.map_or(0, |e| e.modify_index),
                    expires: Some(now + c.ttl),
                    id: check_id,
                }
            })
            .collect();
        let old_service = self.services.get(&id);
        let service = AgentService {
            id: id.clone(),
            name: reg.name,
            tags: reg.tags,
            meta: reg.meta,
            address: reg.address,
            port: reg.port,
            tagged_addresses: reg.tagged_addresses,
            weights: reg.weights,
            enable_tag_override: reg.enable_tag_override,
            create_index: old_service.map_or(0, |s| s.create_index),
            modify_index: old_service.map_or(0, |s| s.modify_index),
        };
        let service_changed = old_service.is_none_or(|s| !s.same_definition(&service));
        let removed: Vec<String> = if replace_existing_checks {
            self.checks
                .values()
                .filter(|c| c.service_id == id && !new_checks.iter().any(|n| n.id == c.id))
                .map(|c| c.id.clone())
                .collect()
        } else {
            Vec::new()
        };
        let changed_checks: Vec<AgentCheck> = new_checks
            .into_iter()
            .filter(|c| {
                self.checks.get(&c.id).is_none_or(|e| {
                    (&e.name, e.status, &e.notes, &e.output, &e.service_id)
                        != (&c.name, c.status, &c.notes, &c.output, &c.service_id)
                        || e.service_name != c.service_name
                        || e.service_tags != c.service_tags
                        || e.ttl != c.ttl
                })
            })
            .collect();
        // Unchanged checks still restart their TTL timers.
        for (c, check_id) in reg.checks.iter().zip(&check_ids) {
            if let Some(e) = self.checks.get_mut(check_id) {
                e.expires = Some(now + c.ttl);
            }
        }
        if !service_changed && removed.is_empty() && changed_checks.is_empty() {
            return id;
        }
        let idx = next_index(raft);
        if service_changed {
            let mut service = service;
            if service.create_index == 0 {
                service.create_index = idx;
            }
            service.modify_index = idx;
            self.services.insert(id.clone(), service);
            self.services_index = idx;
        }
        if !removed.is_empty() || !changed_checks.is_empty() {
            self.checks_index = idx;
        }
        for r in removed {
            self.checks.remove(&r);
        }
        for mut c in changed_checks {
            if c.create_index == 0 {
                c.create_index = idx;
            }
            c.modify_index = idx;
            self.checks.insert(c.id.clone(), c);
        }
        id
    }

    /// Removes a service and its checks; returns whether it existed.
    pub fn deregister_service(&mut self, raft: &mut u64, id: &str) -> bool {
        if !self.services.contains_key(id) {
            return false;
        }
        let idx = next_index(raft);
        self.services.remove(id);
        self.services_index = idx;
        let before = self.checks.len();
        self.checks.retain(|_, c| c.service_id != id);
        if self.checks.len() != before {
            self.checks_index = idx;
        }
        true
    }

    /// Sets a check's status and output (`PUT /v1/agent/check/pass|warn|fail/<id>?note=`) and
    /// restarts its TTL. Returns whether the check exists.
    pub fn update_check(
        &mut self,
        raft: &mut u64,
        id: &str,
        status: CheckStatus,
        output: &str,
        now: Instant,
    ) -> bool {
        let Some(c) = self.checks.get_mut(id) else {
            return false;
        };
        c.expires = Some(now + c.ttl);
        if c.status == status && c.output == output {
            return true;
        }
        let idx = next_index(raft);
        c.status = status;
        c.output = output.to_owned();
        c.modify_index = idx;
        self.checks_index = idx;
        true
    }

    /// Turns every TTL check whose TTL ran out `critical`; returns whether any changed.
    pub fn expire_checks(&mut self, raft: &mut u64, now: Instant) -> bool {
        let due: Vec<(String, String)> = self
            .checks
            .values()
            .filter(|c| c.expires.is_some_and(|e| e <= now))
            .map(|c| (c.id.clone(), expired_output(&c.output)))
            .collect();
        let mut changed = false;
        for (id, output) in due {
            let status_before = self.checks.get(&id).map(|c| (c.status, c.output.clone()));
            if status_before != Some((CheckStatus::Critical, output.clone())) {
                self.update_check(raft, &id, CheckStatus::Critical, &output, now);
                changed = true;
            }
            if let Some(c) = self.checks.get_mut(&id) {
                c.expires = None;
            }
        }
        changed
    }

    pub fn next_check_expiry(&self) -> Option<Instant> {
        self.checks.values().filter_map(|c| c.expires).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_checks_and_indexes() {
        let mut st = LocalAgent::default();
        let mut raft = 0;
        let now = Instant::now();
        let reg = ServiceRegistration::new("web", 8080)
            .with_id("web-1")
            .with_ttl_check(Duration::from_secs(10));
        assert_eq!(
            st.register_service(&mut raft, reg.clone(), false, now),
            "web-1"
        );
        // Index 1 registered the node, 2 the service.
        assert_eq!(raft, 2);
        assert_eq!(st.checks["service:web-1"].status, CheckStatus::Critical);
        // The same definition again changes nothing.
        st.register_service(&mut raft, reg.clone(), false, now);
        assert_eq!(raft, 2);
        assert!(st.update_check(&mut raft, "service:web-1", CheckStatus::Passing, "", now));
        assert_eq!((raft, st.checks_index, st.services_index), (3, 3, 2));
        assert_eq!((st.node_services_index(), st.node_checks_index()), (2, 3));
        // Re-registering keeps the status.
        st.register_service(&mut raft, reg.with_tags(&["v2"]), false, now);
        assert_eq!(st.checks["service:web-1"].status, CheckStatus::Passing);
        assert_eq!(st.checks["service:web-1"].service_tags, vec!["v2"]);
        assert!(!st.update_check(&mut raft, "nope", CheckStatus::Passing, "", now));
        let later = now + Duration::from_secs(11);
        assert!(st.expire_checks(&mut raft, later));
        assert_eq!(st.checks["service:web-1"].status, CheckStatus::Critical);
        assert_eq!(st.checks["service:web-1"].output, "TTL expired");
        assert!(!st.expire_checks(&mut raft, later));
        assert!(st.deregister_service(&mut raft, "web-1"));
        assert!(st.checks.is_empty());
        assert!(!st.deregister_service(&mut raft, "web-1"));
        let two = ServiceRegistration::new("db", 1)
            .with_ttl_check(Duration::from_secs(1))
            .with_ttl_check(Duration::from_secs(1));
        st.register_service(&mut raft, two, false, now);
        assert!(st.checks.contains_key("service:db:1") && st.checks.contains_key("service:db:2"));
        st.register_service(&mut raft, ServiceRegistration::new("db", 1), true, now);
        assert!(st.checks.is_empty(), "replace-existing-checks drops them");
    }
}

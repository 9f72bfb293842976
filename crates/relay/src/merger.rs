//! Discovery from agents, merged into the catalog the translator reads.
//!
//! Pure state: the relay's hub (`relay::hub`) feeds it what each agent's discovery
//! stream holds and publishes [`DiscoveryMerger::catalog`] into the config.
//!
//! - **Least privilege.** An agent speaks for its own node only: every instance it
//!   reports is recorded on its node and datacenter (from its certificate, never from
//!   the message), and an instance whose address is not its node's address is refused
//!   and counted, so a compromised VM cannot draw another machine's traffic.
//! - **Grace period.** The instances of an agent that disconnects are kept for a grace
//!   period (an agent restart, a controller failover, a network blip must not empty a
//!   service), then dropped.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use vmesh_model::{Catalog, Health, ServiceInstance};
use vmesh_proto::v1;

/// How long the instances of a disconnected agent keep receiving traffic.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);

/// Who an agent is, from its certificate and registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentIdentity {
    pub node: String,
    pub datacenter: String,
    /// The node's address: the only one its instances may have.
    pub address: IpAddr,
}

/// An instance an agent may not report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub node: String,
    pub instance: String,
    pub reason: String,
}

/// An instance an agent reported, with its service name.
pub type Reported = (String, ServiceInstance);

#[derive(Clone, Debug)]
struct AgentEntry {
    /// (service name, instance), sorted.
    instances: Vec<(String, ServiceInstance)>,
    /// When it disconnected; `None` while connected.
    gone_since: Option<Instant>,
}

#[derive(Clone, Debug)]
pub struct DiscoveryMerger {
    grace: Duration,
    /// By (datacenter, node).
    agents: BTreeMap<(String, String), AgentEntry>,
}

impl DiscoveryMerger {
    pub fn new(grace: Duration) -> Self {
        DiscoveryMerger {
            grace,
            agents: BTreeMap::new(),
        }
    }

    /// Replaces what an agent reports. Returns the instances refused.
    pub fn update(
        &mut self,
        agent: &AgentIdentity,
        reported: &[v1::ServiceInstance],
    ) -> Vec<Refusal> {
        let mut refused = Vec::new();
        let mut instances = Vec::with_capacity(reported.len());
        for r in reported {
            match accept(agent, r) {
                Ok(instance) => instances.push(instance),
                Err(reason) => refused.push(Refusal {
                    node: agent.node.clone(),
                    instance: r.id.clone(),
                    reason,
                }),
            }
        }
        instances.sort();
        self.agents.insert(
            key(agent),
            AgentEntry {
                instances,
                gone_since: None,
            },
        );
        refused
    }

    /// The agent's stream ended at `now`: its instances stay for the grace period.
    pub fn disconnected(&mut self, agent: &AgentIdentity, now: Instant) {
        if let Some(a) = self.agents.get_mut(&key(agent)) {
            a.gone_since.get_or_insert(now);
        }
    }

    /// The agent's certificate was revoked: its instances go at once.
    pub fn revoke(&mut self, agent: &AgentIdentity) -> bool {
        self.agents.remove(&key(agent)).is_some()
    }

    /// What the agent reported (by service) and since when it is disconnected, if counted.
    pub fn entry(&self, agent: &AgentIdentity) -> Option<(&[Reported], Option<Instant>)> {
        self.agents
            .get(&key(agent))
            .map(|a| (a.instances.as_slice(), a.gone_since))
    }

    /// Whether the agent's instances are counted.
    pub fn contains(&self, agent: &AgentIdentity) -> bool {
        self.agents.contains_key(&key(agent))
    }

    /// How many agents are counted (connected, or within their grace period).
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// Drops agents disconnected for longer than the grace period. Returns whether any went.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.agents.len();
        let grace = self.grace;
        self.agents.retain(|_, a| {
            a.gone_since
                .is_none_or(|t| now.saturating_duration_since(t) < grace)
        });
        self.agents.len() != before
    }

    /// When the next disconnected agent's grace period ends, if any.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.agents
            .values()
            .filter_map(|a| a.gone_since.map(|t| t + self.grace))
            .min()
    }

    /// Every instance of every agent still counted, by service.
    pub fn catalog(&self) -> Catalog {
        self.catalog_where(|_, _| true)
    }

    /// [`catalog`](Self::catalog) of the agents (datacenter, node) for which `keep` is true.
    pub fn catalog_where(&self, keep: impl Fn(&str, &str) -> bool) -> Catalog {
        let mut catalog = Catalog::new();
        for ((dc, node), agent) in &self.agents {
            if !keep(dc, node) {
                continue;
            }
            for (service, instance) in &agent.instances {
                catalog.insert(service.clone(), instance.clone());
            }
        }
        catalog
    }
}

fn key(agent: &AgentIdentity) -> (String, String) {
    (agent.datacenter.clone(), agent.node.clone())
}

fn accept(
    agent: &AgentIdentity,
    r: &v1::ServiceInstance,
) -> Result<(String, ServiceInstance), String> {
    if r.service.is_empty() {
        return Err("no service name".into());
    }
    let port = u16::try_from(r.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("port {} is not a TCP port", r.port))?;
    let address = if r.address.is_empty() {
        agent.address
    } else {
        r.address
            .parse::<IpAddr>()
            .map_err(|_| format!("address {:?} is not an IP address", r.address))?
    };
    if address != agent.address {
        return Err(format!(
            "address {address} is not the address of node {} ({})",
            agent.node, agent.address
        ));
    }
    let health = match v1::Health::try_from(r.health) {
        Ok(v1::Health::Passing) => Health::Passing,
        Ok(v1::Health::Warning) => Health::Warning,
        // Unknown or unspecified health never receives traffic.
        _ => Health::Critical,
    };
    let instance = ServiceInstance {
        node: agent.node.clone(),
        datacenter: agent.datacenter.clone(),
        id: r.id.clone(),
        address: address.to_string(),
        port,
        tags: r.tags.clone(),
        health,
    };
    Ok((r.service.clone(), instance))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(node: &str, ip: &str) -> AgentIdentity {
        AgentIdentity {
            node: node.into(),
            datacenter: "dc1".into(),
            address: ip.parse().unwrap(),
        }
    }

    fn reported(id: &str, service: &str, address: &str, health: v1::Health) -> v1::ServiceInstance {
        v1::ServiceInstance {
            id: id.into(),
            service: service.into(),
            tags: vec!["v1".into()],
            address: address.into(),
            port: 8080,
            health: health as i32,
            ..Default::default()
        }
    }

    #[test]
    fn instances_are_recorded_on_the_reporting_node_with_its_address() {
        let mut m = DiscoveryMerger::new(DEFAULT_GRACE);
        let a = vm("vm-a", "127.0.0.2");
        let refused = m.update(
            &a,
            &[
                reported("web-1", "web", "", v1::Health::Passing),
                reported("web-2", "web", "127.0.0.2", v1::Health::Warning),
            ],
        );
        assert!(refused.is_empty(), "{refused:?}");
        let c = m.catalog();
        let web = c.instances("web");
        assert_eq!(web.len(), 2);
        assert!(web
            .iter()
            .all(|i| i.node == "vm-a" && i.address == "127.0.0.2"));
        assert_eq!(
            web[0].tags,
            vec!["v1".to_string()],
            "tags are the service's own"
        );
        assert_eq!(web[1].health, Health::Warning);
    }

    #[test]
    fn an_agent_may_not_report_another_machines_address() {
        let mut m = DiscoveryMerger::new(DEFAULT_GRACE);
        let refused = m.update(
            &vm("vm-a", "127.0.0.2"),
            &[
                reported("steal", "web", "127.0.0.3", v1::Health::Passing),
                reported("junk", "web", "not-an-ip", v1::Health::Passing),
                reported("ok", "web", "127.0.0.2", v1::Health::Passing),
            ],
        );
        let ids: Vec<&str> = refused.iter().map(|r| r.instance.as_str()).collect();
        assert_eq!(ids, vec!["steal", "junk"]);
        assert!(
            refused[0].reason.contains("not the address of node vm-a"),
            "{refused:?}"
        );
        assert_eq!(m.catalog().instances("web").len(), 1);
    }

    #[test]
    fn unknown_health_never_receives_traffic_and_bad_ports_are_refused() {
        let mut m = DiscoveryMerger::new(DEFAULT_GRACE);
        let mut zero = reported("z", "web", "", v1::Health::Passing);
        zero.port = 0;
        let mut big = reported("b", "web", "", v1::Health::Passing);
        big.port = 70_000;
        let refused = m.update(
            &vm("vm-a", "127.0.0.2"),
            &[reported("u", "web", "", v1::Health::Unspecified), zero, big],
        );
        assert_eq!(refused.len(), 2);
        assert_eq!(m.catalog().instances("web")[0].health, Health::Critical);
    }

    #[test]
    fn a_disconnected_agent_is_kept_for_the_grace_period_then_dropped() {
        let mut m = DiscoveryMerger::new(Duration::from_secs(60));
        let t0 = Instant::now();
        m.update(
            &vm("vm-a", "127.0.0.2"),
            &[reported("w", "web", "", v1::Health::Passing)],
        );
        m.update(
            &vm("vm-b", "127.0.0.3"),
            &[reported("w", "web", "", v1::Health::Passing)],
        );
        m.disconnected(&vm("vm-a", "127.0.0.2"), t0);
        assert_eq!(m.next_expiry(), Some(t0 + Duration::from_secs(60)));
        assert!(!m.expire(t0 + Duration::from_secs(59)));
        assert_eq!(
            m.catalog().instances("web").len(),
            2,
            "kept through the grace period"
        );
        assert!(m.expire(t0 + Duration::from_secs(60)));
        let web = m.catalog();
        assert_eq!(web.instances("web").len(), 1);
        assert_eq!(web.instances("web")[0].node, "vm-b");
        assert_eq!(m.next_expiry(), None);
    }

    #[test]
    fn a_reconnect_within_the_grace_period_keeps_the_agent() {
        let mut m = DiscoveryMerger::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let a = vm("vm-a", "127.0.0.2");
        m.update(&a, &[reported("w", "web", "", v1::Health::Passing)]);
        m.disconnected(&vm("vm-a", "127.0.0.2"), t0);
        m.update(&a, &[reported("w", "web", "", v1::Health::Passing)]);
        assert!(!m.expire(t0 + Duration::from_secs(600)));
        assert_eq!(m.catalog().instances("web").len(), 1);
    }

    #[test]
    fn a_revoked_agent_is_cut_off_at_once() {
        let mut m = DiscoveryMerger::new(DEFAULT_GRACE);
        m.update(
            &vm("vm-a", "127.0.0.2"),
            &[reported("w", "web", "", v1::Health::Passing)],
        );
        assert!(m.revoke(&vm("vm-a", "127.0.0.2")));
        assert!(m.catalog().instances("web").is_empty());
    }
}

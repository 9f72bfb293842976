//! Local discovery: the services and health of this VM, read from the local Consul agent.
//!
//! Why the agent polls `/v1/agent/services` and `/v1/agent/checks` instead of running blocking
//! queries on the catalog views (`/v1/catalog/node-services/<node>`, `/v1/health/node/<node>`):
//! the catalog views are answered by the Consul servers, so they lag the local agent by an
//! anti-entropy sync and stop answering when the servers are unreachable. The local endpoints are
//! answered by the agent itself from what runs on the VM, immediately and whatever the servers
//! do. They support no blocking queries, hence the poll; an unchanged answer costs two small HTTP
//! requests on loopback and a byte comparison (the bodies are parsed again only when they differ
//! from the previous poll).
//!
//! Conversion rules ([`to_instances`]):
//! - only services without a `Kind` (Connect proxies and gateways are not reported);
//! - an empty service `Address` is the node's address;
//! - health is the worst of the service's own checks and the node's checks (`ServiceID` empty):
//!   critical, then warning, then passing; no checks is passing; the maintenance checks
//!   (`_node_maintenance`, `_service_maintenance:<id>`) are critical whatever their status says.

use std::collections::BTreeMap;

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tracing::{info, warn};
use vmesh_consul::{parse_agent_checks, parse_agent_services, Client, ConsulError};
use vmesh_runtime::Shutdown;

use crate::datadir::DataDir;
use vmesh_consul::{LocalCheck, LocalService};
use vmesh_proto::v1::{Health, ServiceInstance};

/// The check Consul registers while a node is in maintenance mode.
pub const NODE_MAINTENANCE_CHECK: &str = "_node_maintenance";
/// Prefix of the check Consul registers while a service is in maintenance mode.
pub const SERVICE_MAINTENANCE_PREFIX: &str = "_service_maintenance:";

/// Severity order: passing < warning < critical (unknown statuses count as critical).
fn severity(h: Health) -> u8 {
    match h {
        Health::Passing => 0,
        Health::Warning => 1,
        Health::Critical | Health::Unspecified => 2,
    }
}

/// The worse of two health values.
pub fn worst(a: Health, b: Health) -> Health {
    if severity(b) > severity(a) {
        b
    } else {
        a
    }
}

/// The health one check contributes.
pub fn check_health(check: &LocalCheck) -> Health {
    if check.check_id == NODE_MAINTENANCE_CHECK
        || check.check_id.starts_with(SERVICE_MAINTENANCE_PREFIX)
    {
        return Health::Critical;
    }
    match check.status.as_str() {
        "passing" => Health::Passing,
        "warning" => Health::Warning,
        // "critical", and anything Consul may add later: treat the unknown as unhealthy.
        _ => Health::Critical,
    }
}

/// The aggregate health of service `service_id`: the worst of its checks and the node's.
pub fn service_health<'a>(
    service_id: &str,
    checks: impl IntoIterator<Item = &'a LocalCheck>,
) -> Health {
    checks
        .into_iter()
        .filter(|c| c.service_id.is_empty() || c.service_id == service_id)
        .map(check_health)
        .fold(Health::Passing, worst)
}

/// The instances to report for the local agent's services and checks. Sorted by id.
pub fn to_instances(
    node_address: &str,
    services: &BTreeMap<String, LocalService>,
    checks: &BTreeMap<String, LocalCheck>,
) -> Vec<ServiceInstance> {
    services
        .iter()
        .filter(|(_, s)| s.kind.is_empty())
        .map(|(key, s)| {
            let id = if s.id.is_empty() {
                key.clone()
            } else {
                s.id.clone()
            };
            let health = service_health(&id, checks.values());
            ServiceInstance {
                service: s.service.clone(),
                tags: s.tags.clone(),
                meta: s.meta.clone(),
                address: if s.address.is_empty() {
                    node_address.to_string()
                } else {
                    s.address.clone()
                },
                port: s.port,
                health: health as i32,
                id,
            }
        })
        .collect()
}

/// Polls the local Consul agent and turns its answers into instances.
#[derive(Debug)]
pub struct LocalReader {
    client: Client,
    node_address: String,
    last_services: Option<Bytes>,
    last_checks: Option<Bytes>,
    instances: Option<Vec<ServiceInstance>>,
}

impl LocalReader {
    /// A reader of `client`'s local agent; services without an address get `node_address`.
    pub fn new(client: Client, node_address: impl Into<String>) -> Self {
        LocalReader {
            client,
            node_address: node_address.into(),
            last_services: None,
            last_checks: None,
            instances: None,
        }
    }

    /// The node address used for services without one.
    pub fn node_address(&self) -> &str {
        &self.node_address
    }

    /// Reads services and checks. `Ok(Some(instances))` when either body differs from the previous
    /// successful read (or on the first read), `Ok(None)` when both are byte-identical to it.
    pub async fn poll(&mut self) -> Result<Option<Vec<ServiceInstance>>, ConsulError> {
        let services = self.client.agent_services_raw().await?;
        let checks = self.client.agent_checks_raw().await?;
        if self.instances.is_some()
            && self.last_services.as_ref() == Some(&services)
            && self.last_checks.as_ref() == Some(&checks)
        {
            return Ok(None);
        }
        let parsed_services = parse_agent_services(&services)?;
        let parsed_checks = parse_agent_checks(&checks)?;
        let instances = to_instances(&self.node_address, &parsed_services, &parsed_checks);
        self.last_services = Some(services);
        self.last_checks = Some(checks);
        self.instances = Some(instances.clone());
        Ok(Some(instances))
    }

    /// Reads and returns the current instances, whether or not they changed.
    pub async fn read(&mut self) -> Result<Vec<ServiceInstance>, ConsulError> {
        match self.poll().await? {
            Some(instances) => Ok(instances),
            None => Ok(self.instances.clone().unwrap_or_default()),
        }
    }

    /// The instances of the last successful read.
    pub fn last(&self) -> Option<&[ServiceInstance]> {
        self.instances.as_deref()
    }
}

/// The discovery task: polls the local Consul agent every `interval`, records what changed in
/// the data dir (so a restart while the Consul agent is down reports the last discovery), and
/// hands it to the relay session. While the Consul agent does not answer, the last discovery
/// stands.
pub async fn poll(
    mut reader: LocalReader,
    data: DataDir,
    interval: Duration,
    out: watch::Sender<Option<Vec<ServiceInstance>>>,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut down = false;
    let mut stored = data.load_discovery().ok().flatten();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.requested() => return Ok(()),
        }
        vmesh_runtime::test_panic("discovery");
        match reader.poll().await {
            Ok(changed) => {
                if down {
                    info!("the local Consul agent is reachable again");
                    down = false;
                }
                let Some(instances) = changed else { continue };
                if stored.as_ref() != Some(&instances) {
                    if let Err(e) = data.store_discovery(&instances) {
                        warn!("cannot record the discovery in the data dir: {e}");
                    }
                    stored = Some(instances.clone());
                }
                if out.send(Some(instances)).is_err() {
                    // The relay session is gone; the process is stopping.
                    return Ok(());
                }
            }
            Err(e) => {
                if !down {
                    warn!(
                        "cannot read the local Consul agent ({e}); reporting the services last \
                         read until it answers again"
                    );
                    down = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn check(id: &str, service_id: &str, status: &str) -> (String, LocalCheck) {
        (
            id.to_string(),
            LocalCheck {
                check_id: id.to_string(),
                name: id.to_string(),
                status: status.to_string(),
                service_id: service_id.to_string(),
                service_name: String::new(),
            },
        )
    }

    fn service(id: &str, name: &str, address: &str, port: u32) -> (String, LocalService) {
        (
            id.to_string(),
            LocalService {
                id: id.to_string(),
                service: name.to_string(),
                tags: vec!["v1".into()],
                meta: BTreeMap::from([("zone".into(), "a".into())]),
                port,
                address: address.to_string(),
                kind: String::new(),
            },
        )
    }

    fn health_of(service_id: &str, checks: &[(String, LocalCheck)]) -> Health {
        service_health(service_id, checks.iter().map(|(_, c)| c))
    }

    #[test]
    fn health_is_the_worst_of_service_and_node_checks() {
        assert_eq!(health_of("web", &[]), Health::Passing, "no checks");
        let passing = [check("a", "web", "passing"), check("n", "", "passing")];
        assert_eq!(health_of("web", &passing), Health::Passing);
        let warn = [check("a", "web", "passing"), check("b", "web", "warning")];
        assert_eq!(health_of("web", &warn), Health::Warning);
        let crit = [
            check("a", "web", "warning"),
            check("b", "web", "critical"),
            check("c", "web", "passing"),
        ];
        assert_eq!(health_of("web", &crit), Health::Critical);
        // A node check counts for every service; another service's check does not.
        let node = [
            check("serfHealth", "", "critical"),
            check("a", "web", "passing"),
        ];
        assert_eq!(health_of("web", &node), Health::Critical);
        assert_eq!(health_of("db", &node), Health::Critical);
        let other = [check("a", "db", "critical"), check("n", "", "warning")];
        assert_eq!(health_of("web", &other), Health::Warning);
        assert_eq!(health_of("db", &other), Health::Critical);
        // Unknown statuses are not healthy.
        assert_eq!(
            health_of("web", &[check("x", "web", "bogus")]),
            Health::Critical
        );
    }

    #[test]
    fn maintenance_is_critical() {
        let node = [check(NODE_MAINTENANCE_CHECK, "", "passing")];
        assert_eq!(health_of("web", &node), Health::Critical);
        let svc = [check("_service_maintenance:web", "web", "warning")];
        assert_eq!(health_of("web", &svc), Health::Critical);
        assert_eq!(health_of("db", &svc), Health::Passing);
    }

    #[test]
    fn instances_take_the_node_address_and_skip_special_kinds() {
        let mut services: BTreeMap<_, _> = [
            service("web-1", "web", "", 8080),
            service("web-2", "web", "10.0.0.9", 8081),
        ]
        .into_iter()
        .collect();
        let (id, mut proxy) = service("web-1-sidecar-proxy", "web-sidecar-proxy", "", 21000);
        proxy.kind = "connect-proxy".into();
        services.insert(id, proxy);
        let checks: BTreeMap<_, _> = [check("service:web-2", "web-2", "warning")]
            .into_iter()
            .collect();

        let instances = to_instances("10.0.0.7", &services, &checks);
        assert_eq!(
            instances,
            vec![
                ServiceInstance {
                    id: "web-1".into(),
                    service: "web".into(),
                    tags: vec!["v1".into()],
                    meta: BTreeMap::from([("zone".into(), "a".into())]),
                    address: "10.0.0.7".into(),
                    port: 8080,
                    health: Health::Passing as i32,
                },
                ServiceInstance {
                    id: "web-2".into(),
                    service: "web".into(),
                    tags: vec!["v1".into()],
                    meta: BTreeMap::from([("zone".into(), "a".into())]),
                    address: "10.0.0.9".into(),
                    port: 8081,
                    health: Health::Warning as i32,
                },
            ]
        );
    }

    #[test]
    fn worst_orders_health() {
        assert_eq!(worst(Health::Passing, Health::Warning), Health::Warning);
        assert_eq!(worst(Health::Critical, Health::Warning), Health::Critical);
        assert_eq!(worst(Health::Passing, Health::Passing), Health::Passing);
    }
}

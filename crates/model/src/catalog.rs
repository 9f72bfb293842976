//! [`Catalog`]: the instances of Consul services that agents discovered. Not config:
//! the controller fills it from the agents' reports and sets it on
//! [`Config::catalog`](crate::Config::catalog) before translating, so translation stays
//! one pure function of one value.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Discovered instances by Consul service name. The order of the instances does not
/// matter: the translator sorts what it uses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Catalog {
    pub services: BTreeMap<String, Vec<ServiceInstance>>,
}

impl Catalog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an instance of `service`.
    pub fn insert(&mut self, service: impl Into<String>, instance: ServiceInstance) {
        self.services
            .entry(service.into())
            .or_default()
            .push(instance);
    }

    /// The instances of `service`, in no particular order.
    pub fn instances(&self, service: &str) -> &[ServiceInstance] {
        self.services.get(service).map_or(&[], Vec::as_slice)
    }
}

/// One instance of a Consul service, as registered on one node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceInstance {
    /// The Consul node the instance is registered on.
    pub node: String,
    pub datacenter: String,
    /// The Consul service id (unique per node).
    pub id: String,
    /// An IPv4 or IPv6 literal. Instances whose address is not one are left out of
    /// translation (with a warning on the upstreams that would use them).
    pub address: String,
    pub port: u16,
    #[serde(default)]
    pub tags: Vec<String>,
    /// The aggregate of the instance's checks and its node's checks.
    pub health: Health,
}

/// Health as Consul aggregates it: the worst of the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Health {
    Passing,
    Warning,
    Critical,
}

impl Health {
    /// The word Consul uses: `passing`, `warning`, `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::ConsulDiscovery;

    fn instance(dc: &str, tags: &[&str], health: Health) -> ServiceInstance {
        ServiceInstance {
            node: "n1".into(),
            datacenter: dc.into(),
            id: "web-1".into(),
            address: "10.0.0.1".into(),
            port: 80,
            tags: tags.iter().map(ToString::to_string).collect(),
            health,
        }
    }

    #[test]
    fn filters() {
        let mut c = ConsulDiscovery {
            service: "web".into(),
            tags: vec!["v2".into(), "http".into()],
            datacenters: Some(vec!["dc1".into()]),
            include_warning: false,
        };
        let ok = instance("dc1", &["http", "v2", "extra"], Health::Passing);
        assert!(c.matches("web", &ok));
        assert!(!c.matches("api", &ok));
        assert!(!c.matches("web", &instance("dc1", &["v2"], Health::Passing)));
        assert!(!c.matches("web", &instance("dc2", &["v2", "http"], Health::Passing)));
        c.datacenters = None;
        assert!(c.matches("web", &instance("dc2", &["v2", "http"], Health::Passing)));
        assert!(c.admits(Health::Passing));
        assert!(!c.admits(Health::Warning));
        assert!(!c.admits(Health::Critical));
        c.include_warning = true;
        assert!(c.admits(Health::Warning));
        assert!(!c.admits(Health::Critical));
    }

    #[test]
    fn serde_uses_consul_words() {
        let mut catalog = Catalog::new();
        catalog.insert("web", instance("dc1", &[], Health::Warning));
        let json = serde_json::to_value(&catalog).unwrap();
        assert_eq!(json["services"]["web"][0]["health"], "warning");
        let back: Catalog = serde_json::from_value(json).unwrap();
        assert_eq!(back, catalog);
        assert_eq!(catalog.instances("web").len(), 1);
        assert!(catalog.instances("api").is_empty());
        assert_eq!(Health::Critical.as_str(), "critical");
    }
}

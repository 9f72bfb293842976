//! `kind: Upstream`: a set of endpoints that routes send traffic to.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::catalog::{Health, ServiceInstance};
use crate::duration::Duration;
use crate::limits::{at_most, MAX_CONSUL_FILTERS, MAX_HOSTS};
use crate::problem::{field, index, Problem};
use crate::tls::UpstreamTls;
use crate::validate::{check_ip, Problems};

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(3600);
const MAX_WEIGHT: u32 = 128;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpstreamSpec {
    /// Discovery form `static`. Exactly one discovery form must be set.
    #[serde(rename = "static", default, skip_serializing_if = "Option::is_none")]
    pub static_hosts: Option<StaticDiscovery>,
    /// Discovery form `consul`: the instances of a Consul service, from
    /// [`Config::catalog`](crate::Config::catalog).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consul: Option<ConsulDiscovery>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    /// Connect to the hosts over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Box<UpstreamTls>>,
}

fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}

/// The discovery form an upstream uses, once validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discovery<'a> {
    Static(&'a StaticDiscovery),
    Consul(&'a ConsulDiscovery),
}

/// The instances of one Consul service, as reported by the agents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConsulDiscovery {
    /// The Consul service name.
    pub service: String,
    /// Tags an instance must all carry to be used; empty: any instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Datacenters whose instances are used; `None`: any datacenter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenters: Option<Vec<String>>,
    /// Whether instances whose health is `warning` receive traffic too. Passing
    /// instances always do, critical ones never.
    #[serde(default)]
    pub include_warning: bool,
}

impl ConsulDiscovery {
    /// Whether `instance` (of any service) is of this service, carries every required
    /// tag and is in an allowed datacenter. Health is not looked at: see [`Self::admits`].
    pub fn matches(&self, service: &str, instance: &ServiceInstance) -> bool {
        service == self.service
            && self.tags.iter().all(|t| instance.tags.contains(t))
            && self
                .datacenters
                .as_ref()
                .is_none_or(|dcs| dcs.contains(&instance.datacenter))
    }

    /// Whether an instance with this health receives traffic.
    pub fn admits(&self, health: Health) -> bool {
        match health {
            Health::Passing => true,
            Health::Warning => self.include_warning,
            Health::Critical => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StaticDiscovery {
    pub hosts: Vec<StaticHost>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StaticHost {
    /// An IPv4 or IPv6 literal.
    pub address: String,
    pub port: u16,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
}

impl UpstreamSpec {
    /// The discovery form, or `None` if the spec has not been validated and sets none.
    pub fn discovery(&self) -> Option<Discovery<'_>> {
        match (&self.static_hosts, &self.consul) {
            (Some(s), _) => Some(Discovery::Static(s)),
            (None, Some(c)) => Some(Discovery::Consul(c)),
            (None, None) => None,
        }
    }

    pub(crate) fn validate(&self, path: &str, problems: &mut Problems) {
        let forms = usize::from(self.static_hosts.is_some()) + usize::from(self.consul.is_some());
        if forms != 1 {
            problems.push(Problem::new(
                path,
                "exactly one discovery form must be set: static or consul",
            ));
        }
        if let Some(s) = &self.static_hosts {
            s.validate(&field(path, "static"), problems);
        }
        if let Some(c) = &self.consul {
            c.validate(&field(path, "consul"), problems);
        }
        let timeout_path = field(path, "connectTimeout");
        if self.connect_timeout.is_zero() {
            problems.push(Problem::new(timeout_path, "must be greater than 0s"));
        } else if self.connect_timeout > MAX_CONNECT_TIMEOUT {
            problems.push(Problem::new(timeout_path, "must be at most 1h"));
        }
        if let Some(tls) = &self.tls {
            tls.validate(&field(path, "tls"), problems);
        }
    }
}

impl StaticDiscovery {
    fn validate(&self, path: &str, problems: &mut Problems) {
        let hosts_path = field(path, "hosts");
        if self.hosts.is_empty() {
            problems.push(Problem::new(&hosts_path, "must list at least one host"));
        }
        let mut seen = BTreeSet::new();
        let hosts = at_most(&hosts_path, &self.hosts, MAX_HOSTS, problems);
        for (i, host) in hosts.iter().enumerate() {
            let p = index(&hosts_path, i);
            check_ip(&field(&p, "address"), &host.address, problems);
            if host.port == 0 {
                problems.push(Problem::new(
                    field(&p, "port"),
                    "must be between 1 and 65535",
                ));
            }
            if !(1..=MAX_WEIGHT).contains(&host.weight) {
                problems.push(Problem::new(
                    field(&p, "weight"),
                    format!("must be between 1 and {MAX_WEIGHT}"),
                ));
            }
            // Compare parsed addresses so "::1" and "0:0::1" are the same host.
            let normalized = host
                .address
                .parse::<std::net::IpAddr>()
                .map(|ip| ip.to_string())
                .unwrap_or_else(|_| host.address.clone());
            if !seen.insert((normalized, host.port)) {
                problems.push(Problem::new(
                    p,
                    format!("duplicate host {}:{}", host.address, host.port),
                ));
            }
        }
    }
}

/// Consul service names as vmesh accepts them: 1 to 255 ASCII letters, digits, `-`,
/// `_` and `.`. (Consul itself accepts more, but only letters, digits and `-` are
/// found by its DNS interface.)
pub fn is_valid_consul_service(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Consul datacenter names: lowercase letters, digits, `-` and `_` (Consul's own rule).
pub fn is_valid_consul_datacenter(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b))
}

impl ConsulDiscovery {
    fn validate(&self, path: &str, problems: &mut Problems) {
        if !is_valid_consul_service(&self.service) {
            problems.push(Problem::new(
                field(path, "service"),
                format!(
                    "invalid Consul service name {:?}: must be 1 to 255 characters of letters, \
                     digits, '-', '_' and '.'",
                    self.service
                ),
            ));
        }
        let tags_path = field(path, "tags");
        let mut seen = BTreeSet::new();
        let tags = at_most(&tags_path, &self.tags, MAX_CONSUL_FILTERS, problems);
        for (i, tag) in tags.iter().enumerate() {
            let p = index(&tags_path, i);
            if tag.is_empty() {
                problems.push(Problem::new(p, "tag must not be empty"));
            } else if tag.chars().any(char::is_control) {
                problems.push(Problem::new(
                    p,
                    format!("tag {tag:?} must not contain control characters"),
                ));
            } else if !seen.insert(tag.as_str()) {
                problems.push(Problem::new(p, format!("duplicate tag {tag:?}")));
            }
        }
        if let Some(dcs) = &self.datacenters {
            let dcs_path = field(path, "datacenters");
            if dcs.is_empty() {
                problems.push(Problem::new(
                    &dcs_path,
                    "must list at least one datacenter; leave it out to use every datacenter",
                ));
            }
            let mut seen = BTreeSet::new();
            let dcs = at_most(&dcs_path, dcs, MAX_CONSUL_FILTERS, problems);
            for (i, dc) in dcs.iter().enumerate() {
                let p = index(&dcs_path, i);
                if !is_valid_consul_datacenter(dc) {
                    problems.push(Problem::new(
                        p,
                        format!(
                            "invalid datacenter {dc:?}: must be lowercase letters, digits, '-' and '_'"
                        ),
                    ));
                } else if !seen.insert(dc.as_str()) {
                    problems.push(Problem::new(p, format!("duplicate datacenter {dc:?}")));
                }
            }
        }
    }
}

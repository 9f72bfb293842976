//! `kind: Upstream`: a set of endpoints that routes send traffic to.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::problem::{field, index, Problem};
use crate::validate::{check_ip, Problems};

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(3600);
const MAX_WEIGHT: u32 = 128;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpstreamSpec {
    /// Discovery form `static`. Exactly one discovery form must be set; today
    /// `static` is the only one (a `consul` form will join it).
    #[serde(rename = "static", default, skip_serializing_if = "Option::is_none")]
    pub static_hosts: Option<StaticDiscovery>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
}

fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}

/// The discovery form an upstream uses, once validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discovery<'a> {
    Static(&'a StaticDiscovery),
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
        self.static_hosts.as_ref().map(Discovery::Static)
    }

    pub(crate) fn validate(&self, path: &str, problems: &mut Problems) {
        let forms = usize::from(self.static_hosts.is_some());
        if forms != 1 {
            problems.push(Problem::new(
                path,
                "exactly one discovery form must be set: static",
            ));
        }
        if let Some(s) = &self.static_hosts {
            s.validate(&field(path, "static"), problems);
        }
        let timeout_path = field(path, "connectTimeout");
        if self.connect_timeout.is_zero() {
            problems.push(Problem::new(timeout_path, "must be greater than 0s"));
        } else if self.connect_timeout > MAX_CONNECT_TIMEOUT {
            problems.push(Problem::new(timeout_path, "must be at most 1h"));
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
        for (i, host) in self.hosts.iter().enumerate() {
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

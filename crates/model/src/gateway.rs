//! `kind: Gateway`: a listener on a set of proxies that serves virtual services.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::limits::{at_most, MAX_GATEWAY_VIRTUAL_SERVICES, MAX_PROXY_NAMES};
use crate::problem::{field, index, Problem};
use crate::validate::{check_ip, check_name, Problems};

pub const DEFAULT_BIND_ADDRESS: &str = "0.0.0.0";
pub const DEFAULT_PROXY_NAME: &str = "gateway-proxy";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default = "default_bind_address")]
    pub bind_address: String,
    pub bind_port: u16,
    /// Envoy node ids of the proxies that run this gateway.
    #[serde(default = "default_proxy_names")]
    pub proxy_names: Vec<String>,
    /// Virtual services served, by name; `None` serves all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_services: Option<Vec<String>>,
}

fn default_bind_address() -> String {
    DEFAULT_BIND_ADDRESS.to_string()
}

fn default_proxy_names() -> Vec<String> {
    vec![DEFAULT_PROXY_NAME.to_string()]
}

impl GatewaySpec {
    /// Whether this gateway serves the named virtual service.
    pub fn serves(&self, virtual_service: &str) -> bool {
        match &self.virtual_services {
            None => true,
            Some(names) => names.iter().any(|n| n == virtual_service),
        }
    }

    pub(crate) fn validate(&self, path: &str, problems: &mut Problems) {
        check_ip(&field(path, "bindAddress"), &self.bind_address, problems);
        if self.bind_port == 0 {
            problems.push(Problem::new(
                field(path, "bindPort"),
                "must be between 1 and 65535",
            ));
        }
        let proxies_path = field(path, "proxyNames");
        if self.proxy_names.is_empty() {
            problems.push(Problem::new(
                &proxies_path,
                "must list at least one proxy (or be omitted)",
            ));
        }
        let mut seen = BTreeSet::new();
        let proxy_names = at_most(&proxies_path, &self.proxy_names, MAX_PROXY_NAMES, problems);
        for (i, name) in proxy_names.iter().enumerate() {
            let p = index(&proxies_path, i);
            if name.trim().is_empty() {
                problems.push(Problem::new(p, "must not be empty"));
            } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                problems.push(Problem::new(
                    p,
                    format!("{name:?} must not contain whitespace"),
                ));
            } else if !seen.insert(name.as_str()) {
                problems.push(Problem::new(p, format!("duplicate proxy name {name:?}")));
            }
        }
        if let Some(names) = &self.virtual_services {
            let vs_path = field(path, "virtualServices");
            if names.is_empty() {
                problems.push(Problem::new(
                    &vs_path,
                    "must list at least one virtual service; omit it to serve all of them",
                ));
            }
            let mut seen = BTreeSet::new();
            let names = at_most(&vs_path, names, MAX_GATEWAY_VIRTUAL_SERVICES, problems);
            for (i, name) in names.iter().enumerate() {
                let p = index(&vs_path, i);
                check_name(&p, name, problems);
                if !seen.insert(name.as_str()) {
                    problems.push(Problem::new(
                        p,
                        format!("duplicate virtual service {name:?}"),
                    ));
                }
            }
        }
    }
}

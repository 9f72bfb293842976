//! A stable, readable text rendering of a translation, for golden files and for
//! tools that show what a proxy gets.
//!
//! Each resource is decoded back to its Envoy type and printed with `{:#?}`,
//! leaving out fields at their protobuf default (`None`, `0`, `false`, `""`,
//! empty lists), which are not on the wire either. The HTTP connection manager
//! inside a listener is decoded and printed below the listener.

use std::fmt::Write as _;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use prost::Message;
use vmesh_xds::resource::{short_type, CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, SECRET};
use vmesh_xds::Resource;

use crate::{ProxyOutput, Translation};

/// Renders every proxy's resources and every report.
pub fn render_translation(translation: &Translation) -> String {
    let mut out = String::new();
    for (proxy, output) in &translation.proxies {
        let _ = writeln!(out, "=== proxy {proxy}");
        out.push_str(&render_proxy(output));
    }
    let _ = writeln!(out, "=== reports");
    for (key, report) in &translation.reports {
        let _ = writeln!(
            out,
            "{key}: {:?} (source {}, version {}{})",
            report.state,
            report.source,
            report.version,
            if report.serving_last_good {
                ", serving last good"
            } else {
                ""
            }
        );
        for e in &report.errors {
            let _ = writeln!(out, "  error: {e}");
        }
        for w in &report.warnings {
            let _ = writeln!(out, "  warning: {w}");
        }
    }
    out
}

/// Renders one proxy's resources in push order.
pub fn render_proxy(output: &ProxyOutput) -> String {
    let mut out = String::new();
    for type_url in PUSH_ORDER {
        let Some(resources) = output.snapshot.of_type(type_url) else {
            continue;
        };
        for resource in resources.values() {
            let _ = writeln!(
                out,
                "--- {} {} version={}",
                short_type(type_url),
                resource.name,
                resource.version
            );
            for r in &resource.refs {
                let _ = writeln!(out, "ref: {} {}", short_type(r.type_url), r.name);
            }
            if let Some(origins) = output.origins.get(&(type_url, resource.name.clone())) {
                let names: Vec<String> = origins.iter().map(ToString::to_string).collect();
                let _ = writeln!(out, "from: {}", names.join(", "));
            }
            out.push_str(&render_body(resource));
        }
    }
    out
}

fn render_body(resource: &Resource) -> String {
    let bytes = resource.body.value.as_slice();
    let text = match resource.type_url {
        CLUSTER => Cluster::decode(bytes).map(|m| format!("{m:#?}")),
        ENDPOINT => ClusterLoadAssignment::decode(bytes).map(|m| format!("{m:#?}")),
        ROUTE => RouteConfiguration::decode(bytes).map(|m| format!("{m:#?}")),
        LISTENER => Listener::decode(bytes).map(|mut listener| {
            let mut managers = Vec::new();
            for chain in &mut listener.filter_chains {
                for f in &mut chain.filters {
                    if let Some(filter::ConfigType::TypedConfig(any)) = &mut f.config_type {
                        if let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice()) {
                            managers.push(format!("{hcm:#?}"));
                            any.value.clear();
                        }
                    }
                }
            }
            let mut text = format!("{listener:#?}");
            for m in managers {
                text.push_str("\nhttp_connection_manager: ");
                text.push_str(&m);
            }
            text
        }),
        SECRET => Ok(crate::tls::redacted_secret(bytes)
            .map_or_else(|| "undecodable Secret".to_string(), |m| format!("{m:#?}"))),
        _ => Ok(format!("{} bytes", bytes.len())),
    };
    let text = text.unwrap_or_else(|e| format!("undecodable: {e}"));
    let mut out = String::new();
    for line in text.lines() {
        if is_default_field(line) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn is_default_field(line: &str) -> bool {
    let t = line.trim();
    t.ends_with(": None,")
        || t.ends_with(": [],")
        || t.ends_with(": {},")
        || t.ends_with(": 0,")
        || t.ends_with(": false,")
        || t.ends_with(": \"\",")
}

//! Upstream → EDS Cluster + ClusterLoadAssignment, both named after the upstream.
//!
//! The cluster depends on the spec only; the endpoints of a `consul` upstream come
//! from [`Config::catalog`]. So a change of the discovered instances changes the
//! ClusterLoadAssignment's version and never the Cluster's: Envoy gets new endpoints
//! without re-warming the cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy},
    Cluster,
};
use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use vmesh_model::{
    Catalog, Config, ConsulDiscovery, Discovery, LoadBalancer, ObjectKey, UpstreamSpec,
};
use vmesh_xds::resource::{CLUSTER, ENDPOINT, SECRET};
use vmesh_xds::{Resource, ResourceRef};

use crate::{ads_config_source, pb_duration, Reports};

/// The memory one connection (to a client or an upstream) may hold in buffers, each way
/// (Envoy's default is 1 MiB).
pub(crate) const CONNECTION_BUFFER_BYTES: u32 = 32 * 1024;

/// The cluster and its endpoints for one upstream.
pub(crate) struct UpstreamResources {
    pub cluster: Arc<Resource>,
    pub endpoints: Arc<Resource>,
    /// The SDS secrets the cluster refers to (the CA of an upstream with TLS).
    pub secrets: Vec<Arc<Resource>>,
}

/// Every upstream of the effective config, by name.
pub(crate) fn translate_all(
    config: &Config,
    reports: &mut Reports,
) -> BTreeMap<String, UpstreamResources> {
    config
        .upstreams
        .iter()
        .map(|(name, spec)| {
            (
                name.clone(),
                translate_upstream(name, spec, config, reports),
            )
        })
        .collect()
}

pub(crate) fn translate_upstream(
    name: &str,
    spec: &UpstreamSpec,
    config: &Config,
    reports: &mut Reports,
) -> UpstreamResources {
    let catalog = &config.catalog;
    // TLS to the hosts, or, when it cannot be verified, no hosts at all: never plaintext
    // instead.
    let tls = spec
        .tls
        .as_ref()
        .map(|tls| crate::tls::upstream(&ObjectKey::upstream(name), tls, &config.secrets, reports));
    let mut secrets = Vec::new();
    let mut cluster_refs = vec![ResourceRef::new(ENDPOINT, name)];
    let lb_policy = match spec.load_balancer {
        LoadBalancer::RoundRobin => LbPolicy::RoundRobin,
        LoadBalancer::LeastRequest => LbPolicy::LeastRequest,
        LoadBalancer::Random => LbPolicy::Random,
    };
    let cluster = Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads_config_source()),
            service_name: String::new(),
        }),
        connect_timeout: Some(pb_duration(spec.connect_timeout.get())),
        lb_policy: lb_policy as i32,
        per_connection_buffer_limit_bytes: Some(UInt32Value {
            value: CONNECTION_BUFFER_BYTES,
        }),
        ..Default::default()
    };
    let mut cluster = cluster;
    if let Some(Some((socket, ca))) = &tls {
        cluster.transport_socket = Some(socket.clone());
        cluster_refs.push(ResourceRef::new(SECRET, ca.name.clone()));
        secrets.push(ca.clone());
    }
    let lb_endpoints = match spec.discovery() {
        Some(Discovery::Static(s)) => s
            .hosts
            .iter()
            .map(|host| LbEndpoint {
                host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                    address: Some(socket_address(&host.address, host.port)),
                    ..Default::default()
                })),
                load_balancing_weight: Some(UInt32Value { value: host.weight }),
                ..Default::default()
            })
            .collect(),
        Some(Discovery::Consul(c)) => consul_endpoints(name, c, catalog, reports),
        None => vec![],
    };
    let lb_endpoints = if matches!(tls, Some(None)) {
        vec![]
    } else {
        lb_endpoints
    };
    // A consul upstream without instances gets no locality at all: Envoy then answers
    // 503 "no healthy upstream".
    let endpoints = if lb_endpoints.is_empty() {
        vec![]
    } else {
        vec![LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }]
    };
    let assignment = ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints,
        ..Default::default()
    };
    UpstreamResources {
        cluster: Arc::new(Resource::new(CLUSTER, name, &cluster, cluster_refs)),
        endpoints: Arc::new(Resource::new(ENDPOINT, name, &assignment, vec![])),
        secrets,
    }
}

/// The cluster of the traffic of upstreams that are not available (not defined, or rejected
/// with no accepted version): it has no endpoints, so Envoy answers 503 "no healthy upstream"
/// (response flag `UH`) without naming anything internal. `:` cannot be in an upstream's name.
pub const UNAVAILABLE_CLUSTER: &str = "vmesh:unavailable";

/// [`UNAVAILABLE_CLUSTER`]: static, and empty.
pub(crate) fn unavailable_cluster() -> Arc<Resource> {
    let cluster = Cluster {
        name: UNAVAILABLE_CLUSTER.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(pb_duration(std::time::Duration::from_secs(1))),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: UNAVAILABLE_CLUSTER.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    };
    Arc::new(Resource::new(
        CLUSTER,
        UNAVAILABLE_CLUSTER,
        &cluster,
        vec![],
    ))
}

pub(crate) fn socket_address(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// The endpoints of a `consul` upstream: the instances of its service that carry every
/// tag, are in an allowed datacenter and whose health is admitted, in address order and
/// without duplicate addresses. Warns on the upstream when none is left.
fn consul_endpoints(
    name: &str,
    consul: &ConsulDiscovery,
    catalog: &Catalog,
    reports: &mut Reports,
) -> Vec<LbEndpoint> {
    let key = ObjectKey::upstream(name);
    // Sorted and without duplicates, so the result does not depend on the order the
    // instances were reported in.
    let mut selected: BTreeSet<(IpAddr, u16)> = BTreeSet::new();
    let mut invalid: Vec<String> = Vec::new();
    for instance in catalog.instances(&consul.service) {
        if !consul.matches(&consul.service, instance) || !consul.admits(instance.health) {
            continue;
        }
        match instance.address.parse::<IpAddr>() {
            Ok(ip) if instance.port != 0 => {
                selected.insert((ip, instance.port));
            }
            _ => invalid.push(format!(
                "instance {:?} on node {:?} has an invalid address {:?} or port {}; left out",
                instance.id, instance.node, instance.address, instance.port
            )),
        }
    }
    invalid.sort();
    for message in invalid {
        reports.warn(key.clone(), "spec.consul", message);
    }
    if selected.is_empty() {
        reports.warn(key, "spec.consul", no_instance_message(consul));
    }
    selected
        .into_iter()
        .map(|(ip, port)| LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(socket_address(&ip.to_string(), port)),
                ..Default::default()
            })),
            health_status: HealthStatus::Healthy as i32,
            ..Default::default()
        })
        .collect()
}

/// `no passing instance of service "web" with tags ["v2"] in datacenters ["dc1"]`.
fn no_instance_message(consul: &ConsulDiscovery) -> String {
    let health = if consul.include_warning {
        "passing or warning"
    } else {
        "passing"
    };
    let mut message = format!("no {health} instance of service {:?}", consul.service);
    if !consul.tags.is_empty() {
        message.push_str(&format!(" with tags {:?}", consul.tags));
    }
    if let Some(dcs) = &consul.datacenters {
        message.push_str(&format!(" in datacenters {dcs:?}"));
    }
    message.push_str("; the upstream has no endpoints and its routes answer 503");
    message
}

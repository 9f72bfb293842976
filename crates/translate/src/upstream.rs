//! Upstream → EDS Cluster + ClusterLoadAssignment, both named after the upstream.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy},
    Cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use vmesh_model::{Config, Discovery, LoadBalancer, UpstreamSpec};
use vmesh_xds::resource::{CLUSTER, ENDPOINT};
use vmesh_xds::{Resource, ResourceRef};

use crate::{ads_config_source, pb_duration};

/// The cluster and its endpoints for one upstream.
pub(crate) struct UpstreamResources {
    pub cluster: Arc<Resource>,
    pub endpoints: Arc<Resource>,
}

/// Every upstream of the effective config, by name.
pub(crate) fn translate_all(config: &Config) -> BTreeMap<String, UpstreamResources> {
    config
        .upstreams
        .iter()
        .map(|(name, spec)| (name.clone(), translate_upstream(name, spec)))
        .collect()
}

pub(crate) fn translate_upstream(name: &str, spec: &UpstreamSpec) -> UpstreamResources {
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
        ..Default::default()
    };
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
        None => vec![],
    };
    let assignment = ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    };
    UpstreamResources {
        cluster: Arc::new(Resource::new(
            CLUSTER,
            name,
            &cluster,
            vec![ResourceRef::new(ENDPOINT, name)],
        )),
        endpoints: Arc::new(Resource::new(ENDPOINT, name, &assignment, vec![])),
    }
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

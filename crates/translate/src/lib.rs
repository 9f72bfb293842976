//! vmesh-translate: a pure function from the effective config to per-proxy
//! Envoy resources, plus a report per config object.
//!
//! - Gateway `G` on proxy `P` → Listener `gw-G` (HTTP connection manager, RDS over
//!   ADS) and RouteConfiguration `gw-G-routes` with one virtual host per served
//!   virtual service ([`gateway`]).
//! - VirtualService routes → Envoy routes ([`routes`]).
//! - Upstream `U` → EDS Cluster `U` and ClusterLoadAssignment `U` ([`upstream`]),
//!   only on the proxies whose routes use it. A `consul` upstream's endpoints are the
//!   admitted instances of its service in [`Config::catalog`](vmesh_model::Config).
//!
//! Output is deterministic: everything iterates in name order, versions are
//! content hashes, and nothing depends on the order objects were loaded in.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use vmesh_model::{Config, ObjectKey, ObjectReport, Problem, State};
use vmesh_xds::ProxySnapshot;

mod access_log;
mod gateway;
pub mod render;
mod routes;
mod tls;
mod upstream;

pub use gateway::{listener_name, route_config_name};
pub use tls::{ca_secret_name, certificate_secret_name, redacted_secret, REDACTED};
pub use upstream::UNAVAILABLE_CLUSTER;

/// What the translator produces.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translation {
    /// By proxy name (the Envoy node id). Every proxy named by a gateway has an entry.
    pub proxies: BTreeMap<String, ProxyOutput>,
    /// Parse-level reports merged with translation-level problems.
    pub reports: BTreeMap<ObjectKey, ObjectReport>,
}

/// The resources of one proxy, and which config objects produced each.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyOutput {
    pub snapshot: ProxySnapshot,
    /// (type URL, resource name) → the config objects that produced it, so a NACK
    /// can be reported on them.
    pub origins: BTreeMap<(&'static str, String), BTreeSet<ObjectKey>>,
}

impl ProxyOutput {
    /// Adds a resource; resources are shared between proxies, never copied.
    fn insert(&mut self, resource: &Arc<vmesh_xds::Resource>, origins: BTreeSet<ObjectKey>) {
        self.origins
            .entry((resource.type_url, resource.name.clone()))
            .or_default()
            .extend(origins);
        self.snapshot.insert_shared(resource.clone());
    }
}

/// Translates the effective config into per-proxy resources and reports.
pub fn translate(config: &Config) -> Translation {
    let mut reports = Reports::new(config);
    let upstreams = upstream::translate_all(config, &mut reports);
    let virtual_services = routes::translate_all(config, &mut reports);
    let proxies = gateway::translate_all(config, &virtual_services, &upstreams, &mut reports);
    Translation {
        proxies,
        reports: reports.into_inner(),
    }
}

/// The reports under construction.
pub(crate) struct Reports {
    reports: BTreeMap<ObjectKey, ObjectReport>,
}

impl Reports {
    fn new(config: &Config) -> Self {
        Self {
            reports: config.reports.clone(),
        }
    }

    fn entry(&mut self, key: ObjectKey) -> &mut ObjectReport {
        // A hand-built Config may lack a report; never drop a problem for that.
        self.reports.entry(key).or_insert_with(|| ObjectReport {
            state: State::Accepted,
            errors: vec![],
            warnings: vec![],
            source: String::new(),
            version: String::new(),
            serving_last_good: false,
            serving_version: None,
            certificates: vec![],
        })
    }

    pub(crate) fn warn(
        &mut self,
        key: ObjectKey,
        path: impl Into<String>,
        message: impl Into<String>,
    ) {
        let problem = Problem::new(path, message);
        let report = self.entry(key);
        if !report.warnings.contains(&problem) {
            report.add_warning(problem);
        }
    }

    pub(crate) fn error(
        &mut self,
        key: ObjectKey,
        path: impl Into<String>,
        message: impl Into<String>,
    ) {
        let problem = Problem::new(path, message);
        let report = self.entry(key);
        if !report.errors.contains(&problem) {
            report.add_error(problem);
        }
    }

    /// The certificates a gateway serves, for its status.
    pub(crate) fn certificates(
        &mut self,
        key: ObjectKey,
        infos: Vec<vmesh_model::CertificateInfo>,
    ) {
        self.entry(key).certificates = infos;
    }

    /// Why an object of `key` is not in the effective config.
    pub(crate) fn unavailable_reason(&self, key: &ObjectKey) -> &'static str {
        if self.reports.contains_key(key) {
            "is rejected and has no accepted version"
        } else {
            "does not exist"
        }
    }

    fn into_inner(self) -> BTreeMap<ObjectKey, ObjectReport> {
        self.reports
    }
}

/// Protobuf duration from a std duration.
pub(crate) fn pb_duration(d: std::time::Duration) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// `ConfigSource { ads: {}, resource_api_version: V3, initial_fetch_timeout: 0s }`: everything
/// comes over the one ADS stream, and Envoy waits for it rather than serving with part of it.
pub(crate) fn ads_config_source() -> envoy_types::pb::envoy::config::core::v3::ConfigSource {
    use envoy_types::pb::envoy::config::core::v3::{
        config_source::ConfigSourceSpecifier, AggregatedConfigSource, ApiVersion, ConfigSource,
    };
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        initial_fetch_timeout: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 0,
            nanos: 0,
        }),
        ..Default::default()
    }
}

//! The controller's metrics. Names follow one rule: `vmesh_<subsystem>_<name>[_<unit>][_total]`,
//! base units (seconds), bounded labels (resource type, stream mode, object kind and state; never
//! proxy names, object names or error text).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use vmesh_model::{Kind, State};
use vmesh_translate::Translation;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub kind: &'static str,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretRequestLabels {
    /// `metadata` (a poll) or `data` (a read of a new version), or `file` (a secrets dir).
    pub request: &'static str,
    /// `ok`, `not_found`, `denied` or `unreachable`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

pub struct Metrics {
    pub streams: Family<ModeLabel, Gauge>,
    pub pushes: Family<TypeLabel, Counter>,
    pub acks: Family<TypeLabel, Counter>,
    pub nacks: Family<TypeLabel, Counter>,
    pub stale_nonces: Family<TypeLabel, Counter>,
    pub translations: Counter,
    pub translation_seconds: Histogram,
    pub objects: Family<ObjectLabels, Gauge>,
    pub proxies: Gauge,
    pub source_up: Gauge,
    pub source_errors: Counter,
    pub secret_source_up: Gauge,
    pub secret_requests: Family<SecretRequestLabels, Counter>,
    pub relay_refused: Family<ReasonLabel, Counter>,
    pub xds_refused: Family<ReasonLabel, Counter>,
    pub relay_registrations: Counter,
    pub relay_renewals: Counter,
    pub relay_agents_connected: Gauge,
    pub relay_agents_known: Gauge,
    pub relay_instances_refused: Counter,
    pub relay_resyncs: Counter,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            streams: Family::default(),
            pushes: Family::default(),
            acks: Family::default(),
            nacks: Family::default(),
            stale_nonces: Family::default(),
            translations: Counter::default(),
            translation_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            objects: Family::default(),
            proxies: Gauge::default(),
            source_up: Gauge::default(),
            source_errors: Counter::default(),
            secret_source_up: Gauge::default(),
            secret_requests: Family::default(),
            relay_refused: Family::default(),
            xds_refused: Family::default(),
            relay_registrations: Counter::default(),
            relay_renewals: Counter::default(),
            relay_agents_connected: Gauge::default(),
            relay_agents_known: Gauge::default(),
            relay_instances_refused: Counter::default(),
            relay_resyncs: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("vmesh");
        r.register("xds_streams", "Connected ADS streams", m.streams.clone());
        r.register("xds_pushes", "xDS responses sent", m.pushes.clone());
        r.register(
            "xds_acks",
            "xDS responses acknowledged by a proxy",
            m.acks.clone(),
        );
        r.register(
            "xds_nacks",
            "xDS responses rejected by a proxy",
            m.nacks.clone(),
        );
        r.register(
            "xds_stale_nonces",
            "Requests ignored because they answered a superseded response",
            m.stale_nonces.clone(),
        );
        r.register(
            "translations",
            "Translations of the whole config",
            m.translations.clone(),
        );
        r.register(
            "translation_duration_seconds",
            "Time to translate the whole config",
            m.translation_seconds.clone(),
        );
        r.register(
            "config_objects",
            "Config objects by kind and state",
            m.objects.clone(),
        );
        r.register(
            "proxies",
            "Proxies that some gateway applies to",
            m.proxies.clone(),
        );
        r.register(
            "config_source_up",
            "1 when the config source was read successfully last time, 0 while it fails",
            m.source_up.clone(),
        );
        r.register(
            "config_source_errors",
            "Failed reads of the config source",
            m.source_errors.clone(),
        );
        r.register(
            "secret_source_up",
            "1 while the secret source (Vault or the secrets directory) answers, 0 while it cannot be reached",
            m.secret_source_up.clone(),
        );
        r.register(
            "secret_requests",
            "Requests to the secret source, by request and result",
            m.secret_requests.clone(),
        );
        r.register(
            "relay_refused",
            "Relay handshakes, registrations, renewals and streams refused, by reason",
            m.relay_refused.clone(),
        );
        r.register(
            "xds_refused",
            "xDS handshakes and streams refused (no or a foreign certificate, a node id that is not the certificate's proxy), by reason",
            m.xds_refused.clone(),
        );
        r.register(
            "relay_registrations",
            "Agents registered with a bootstrap token",
            m.relay_registrations.clone(),
        );
        r.register(
            "relay_renewals",
            "Agent certificates renewed",
            m.relay_renewals.clone(),
        );
        r.register(
            "relay_agents_connected",
            "Agents with an open discovery stream",
            m.relay_agents_connected.clone(),
        );
        r.register(
            "relay_agents_known",
            "Agents whose services are counted (connected, or within the grace period)",
            m.relay_agents_known.clone(),
        );
        r.register(
            "relay_instances_refused",
            "Service instances refused because an agent may not report them (another node's address, bad port)",
            m.relay_instances_refused.clone(),
        );
        r.register(
            "relay_resyncs",
            "Full discovery snapshots asked of agents after a gap in their changes",
            m.relay_resyncs.clone(),
        );
        m
    }

    /// Counts a refusal by the relay.
    pub fn refused(&self, reason: &'static str) {
        self.relay_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn translated(&self, took: Duration, translation: &Translation) {
        self.translations.inc();
        self.translation_seconds.observe(took.as_secs_f64());
        self.proxies.set(translation.proxies.len() as i64);
        for kind in Kind::ALL {
            for state in [State::Accepted, State::Warning, State::Rejected] {
                let n = translation
                    .reports
                    .iter()
                    .filter(|(k, r)| k.kind == kind && r.state == state)
                    .count();
                self.objects
                    .get_or_create(&ObjectLabels {
                        kind: kind.as_str(),
                        state: state.as_str(),
                    })
                    .set(n as i64);
            }
        }
    }
}

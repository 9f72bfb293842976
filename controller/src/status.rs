//! The reporter: what each config object's state is, and how many of the proxies it
//! affects hold its current version. Computed on demand from the latest
//! translation, the connected streams and the NACKs proxies sent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use vmesh_layout::{ObjectStatus, ProxyCount, ReplicaReport};
use vmesh_model::{ObjectKey, Problem, State};
use vmesh_xds::resource::short_type;
use vmesh_xds::server::{Connection, Observer, StreamInfo};
use vmesh_xds::stream::{Event, Response};

use crate::index::{Published, PublishedRx};
use crate::metrics::{Metrics, ModeLabel, TypeLabel};

/// The last NACK a proxy sent about each object's current version.
#[derive(Default)]
pub struct NackLog {
    inner: Mutex<BTreeMap<ObjectKey, NackRecord>>,
}

#[derive(Clone, Debug)]
pub struct NackRecord {
    pub proxy: String,
    pub resource: String,
    pub message: String,
    /// The object version the refused resource was translated from.
    pub object_version: String,
}

impl NackLog {
    fn record(&self, key: ObjectKey, record: NackRecord) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, record);
    }

    fn get(&self, key: &ObjectKey) -> Option<NackRecord> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }
}

/// Feeds metrics and the NACK log from the xDS streams.
pub struct ControllerObserver {
    pub metrics: Arc<Metrics>,
    pub nacks: Arc<NackLog>,
    pub published: PublishedRx,
}

impl Observer for ControllerObserver {
    fn opened(&self, stream: &StreamInfo) {
        self.metrics
            .streams
            .get_or_create(&ModeLabel {
                mode: stream.mode.as_str(),
            })
            .inc();
    }

    fn closed(&self, stream: &StreamInfo) {
        self.metrics
            .streams
            .get_or_create(&ModeLabel {
                mode: stream.mode.as_str(),
            })
            .dec();
    }

    fn sent(&self, _stream: &StreamInfo, response: &Response) {
        self.metrics
            .pushes
            .get_or_create(&type_label(response.type_url()))
            .inc();
    }

    fn event(&self, stream: &StreamInfo, event: &Event) {
        match event {
            Event::Ack { type_url, .. } => {
                self.metrics.acks.get_or_create(&type_label(type_url)).inc();
            }
            Event::StaleNonce { type_url } => {
                self.metrics
                    .stale_nonces
                    .get_or_create(&type_label(type_url))
                    .inc();
            }
            Event::Nack {
                type_url,
                rejected,
                parts,
                trying,
                message,
            } => {
                self.metrics
                    .nacks
                    .get_or_create(&type_label(type_url))
                    .inc();
                let Some(published) = self.published.borrow().clone() else {
                    return;
                };
                let Some(proxy) = published.translation.proxies.get(&stream.node) else {
                    return;
                };
                // Envoy's message ends with a newline; status lines do not.
                let message = message.trim_end();
                let record = |key: &ObjectKey, resource: String| {
                    if let Some(report) = published.translation.reports.get(key) {
                        self.nacks.record(
                            key.clone(),
                            NackRecord {
                                proxy: stream.node.clone(),
                                resource,
                                message: message.to_string(),
                                object_version: report.version.clone(),
                            },
                        );
                    }
                };
                // The parts found at fault are blamed alone.
                for (name, part) in parts {
                    if let Some(key) = ObjectKey::parse(part) {
                        record(&key, format!("{} {name} ({part})", short_type(type_url)));
                    }
                }
                // A resource refused as a whole is blamed on everything it came from; one
                // whose parts are being tried one by one on nobody yet.
                let whole = rejected.iter().filter(|(name, _)| {
                    !trying.contains(name) && !parts.iter().any(|(n, _)| n == name)
                });
                for (name, _) in whole {
                    let origins = proxy
                        .origins
                        .get(&(type_url_static(type_url), name.clone()));
                    for key in origins.into_iter().flatten() {
                        record(key, format!("{} {}", short_type(type_url), name));
                    }
                }
            }
        }
    }
}

fn type_label(type_url: &str) -> TypeLabel {
    TypeLabel {
        r#type: short_type(type_url),
    }
}

fn type_url_static(type_url: &str) -> &'static str {
    vmesh_xds::resource::PUSH_ORDER
        .iter()
        .find(|t| **t == type_url)
        .copied()
        .unwrap_or("")
}

/// The version of an object that is being served (its last good one when rejected).
fn served_version(published: &Published, key: &ObjectKey) -> Option<String> {
    let report = published.translation.reports.get(key)?;
    Some(
        report
            .serving_version
            .clone()
            .unwrap_or_else(|| report.version.clone()),
    )
}

/// What the proxies connected to this replica hold: per proxy, the objects whose current
/// resources it holds, each with the version of the object they were translated from. Replicas
/// publish it; the leader merges every replica's into the status it writes.
pub fn local_acks(published: &Published, connections: &[Connection]) -> ReplicaReport {
    let mut acks = ReplicaReport::default();
    for (proxy, output) in &published.translation.proxies {
        let streams: Vec<&Connection> = connections.iter().filter(|c| &c.node == proxy).collect();
        if streams.is_empty() {
            continue;
        }
        let mut affected: BTreeSet<&ObjectKey> = BTreeSet::new();
        let mut behind: BTreeSet<&ObjectKey> = BTreeSet::new();
        for ((type_url, name), objects) in &output.origins {
            affected.extend(objects.iter());
            let target = output.snapshot.get(type_url, name);
            let key = (type_url.to_string(), name.clone());
            let held = streams.iter().any(|c| {
                c.acked.get(&key).map(String::as_str) == target.map(|r| r.version.as_str())
            });
            if held {
                continue;
            }
            // Of a composed resource, each part's objects are up to date when the proxy holds
            // that part as the target has it.
            let parts = target.map(|r| r.parts.as_slice()).unwrap_or_default();
            let part_of = |object: &ObjectKey| {
                let text = object.to_string();
                parts.iter().find(|p| p.key == text)
            };
            for object in objects {
                let part_held = part_of(object).is_some_and(|part| {
                    streams.iter().any(|c| {
                        c.acked_parts.get(&key).and_then(|m| m.get(&part.key))
                            == Some(&part.version)
                    })
                });
                if !part_held {
                    behind.insert(object);
                }
            }
        }
        let held: BTreeMap<ObjectKey, String> = affected
            .into_iter()
            .filter(|k| !behind.contains(k))
            .filter_map(|k| Some((k.clone(), served_version(published, k)?)))
            .collect();
        acks.proxies.insert(proxy.clone(), held);
    }
    acks
}

/// Every object's status, sorted by kind and name.
pub fn object_statuses(
    published: &Published,
    acks: &ReplicaReport,
    nacks: &NackLog,
) -> Vec<ObjectStatus> {
    let mut counts: BTreeMap<&ObjectKey, ProxyCount> = BTreeMap::new();
    for (proxy, output) in &published.translation.proxies {
        let affected: BTreeSet<&ObjectKey> = output.origins.values().flatten().collect();
        for key in affected {
            let c = counts.entry(key).or_default();
            c.total += 1;
            let held = acks.proxies.get(proxy).and_then(|m| m.get(key));
            if held.is_some() && held.cloned() == served_version(published, key) {
                c.acked += 1;
            }
        }
    }
    published
        .translation
        .reports
        .iter()
        .map(|(key, report)| {
            let mut status = ObjectStatus {
                kind: key.kind.as_str().to_string(),
                name: key.name.clone(),
                state: report.state,
                // Long lists are summarised: a status stays small enough for any KV value.
                errors: vmesh_model::limits::shown(&report.errors),
                warnings: vmesh_model::limits::shown(&report.warnings),
                source: report.source.clone(),
                version: report.version.clone(),
                serving_last_good: report.serving_last_good,
                serving_version: report.serving_version.clone(),
                certificates: report.certificates.clone(),
                config_modify_index: published.revisions.get(&report.source).copied(),
                proxies: counts.get(key).copied().unwrap_or_default(),
            };
            if let Some(nack) = nacks.get(key) {
                if nack.object_version == report.version {
                    status.state = State::Rejected;
                    status.errors.push(Problem::new(
                        "",
                        format!(
                            "proxy {} rejected {}: {}",
                            nack.proxy, nack.resource, nack.message
                        ),
                    ));
                }
            }
            status
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;
    use vmesh_model::{ConfigSet, SourceMode};
    use vmesh_xds::stream::Mode;

    const CONFIG: &str = "kind: Gateway\nname: edge\nspec:\n  bindPort: 10000\n  proxyNames: [gw]\n---\nkind: Upstream\nname: a\nspec:\n  static:\n    hosts:\n      - address: 127.0.0.1\n        port: 8081\n---\nkind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - upstream: a\n";

    fn published(text: &str) -> Published {
        let mut set = ConfigSet::new();
        set.upsert_source("all.yaml", text, SourceMode::MultiDoc);
        let config = set.snapshot();
        Published {
            generation: 1,
            source_errors: config.source_errors.clone(),
            translation: vmesh_translate::translate(&config),
            revisions: BTreeMap::from([("all.yaml".to_string(), 7)]),
            took: Duration::ZERO,
        }
    }

    /// A stream of proxy `gw` holding every resource of `published`, except `missing`
    /// (type URL, name), which it holds at an older version.
    fn connection(published: &Published, missing: Option<&str>) -> Connection {
        let mut acked = HashMap::new();
        for (type_url, by_name) in &published.translation.proxies["gw"].snapshot.resources {
            for (name, r) in by_name {
                let version = if missing == Some(short_type(type_url)) {
                    "old".to_string()
                } else {
                    r.version.clone()
                };
                acked.insert((type_url.to_string(), name.clone()), version);
            }
        }
        Connection {
            node: "gw".into(),
            mode: Mode::Delta,
            acked,
            acked_parts: HashMap::new(),
            in_sync: missing.is_none(),
        }
    }

    fn by_name(statuses: &[ObjectStatus]) -> BTreeMap<String, &ObjectStatus> {
        statuses
            .iter()
            .map(|s| (format!("{}/{}", s.kind, s.name), s))
            .collect()
    }

    #[test]
    fn objects_count_the_proxies_they_affect_and_those_that_hold_them() {
        let p = published(CONFIG);
        let nacks = NackLog::default();
        let none = object_statuses(&p, &local_acks(&p, &[]), &nacks);
        assert_eq!(none.len(), 3);
        for s in &none {
            assert_eq!(s.proxies, ProxyCount { total: 1, acked: 0 }, "{}", s.name);
            assert_eq!(s.state, State::Accepted);
            assert_eq!(s.config_modify_index, Some(7));
        }

        let all = object_statuses(&p, &local_acks(&p, &[connection(&p, None)]), &nacks);
        assert!(all.iter().all(|s| s.proxies.acked == 1), "{all:?}");

        // The proxy holds the new clusters but not the new routes yet: the upstream counts as
        // held, the virtual service (which produced the route) does not.
        let partial = object_statuses(
            &p,
            &local_acks(&p, &[connection(&p, Some("route"))]),
            &nacks,
        );
        let s = by_name(&partial);
        assert_eq!(s["Upstream/a"].proxies.acked, 1);
        assert_eq!(s["VirtualService/web"].proxies.acked, 0);
    }

    #[test]
    fn another_replicas_report_counts_for_its_proxies() {
        let p = published(CONFIG);
        let mut acks = local_acks(&p, &[]);
        let theirs = local_acks(&p, &[connection(&p, None)]);
        // What the other replica wrote to KV, read back.
        let theirs = ReplicaReport::from_json(&theirs.to_json()).unwrap();
        acks.merge(theirs);
        let statuses = object_statuses(&p, &acks, &NackLog::default());
        assert!(
            statuses.iter().all(|s| s.proxies.acked == 1),
            "{statuses:?}"
        );
    }

    #[test]
    fn a_nack_of_the_current_version_rejects_the_object_that_produced_it() {
        let p = published(CONFIG);
        let nacks = NackLog::default();
        let web = ObjectKey::virtual_service("web");
        let current = p.translation.reports[&web].version.clone();
        nacks.record(
            web.clone(),
            NackRecord {
                proxy: "gw".into(),
                resource: "RouteConfiguration edge-10000".into(),
                message: "domains: value must contain at least 1 item(s)".into(),
                object_version: current,
            },
        );
        let statuses = object_statuses(&p, &ReplicaReport::default(), &nacks);
        let s = by_name(&statuses);
        let vs = s["VirtualService/web"];
        assert_eq!(vs.state, State::Rejected);
        assert_eq!(
            vs.errors[0].message,
            "proxy gw rejected RouteConfiguration edge-10000: domains: value must contain at least 1 item(s)"
        );
        assert_eq!(s["Upstream/a"].state, State::Accepted);

        // A NACK of an older version of the object no longer counts.
        nacks.record(
            web.clone(),
            NackRecord {
                proxy: "gw".into(),
                resource: "RouteConfiguration edge-10000".into(),
                message: "old".into(),
                object_version: "an-older-version".into(),
            },
        );
        let statuses = object_statuses(&p, &ReplicaReport::default(), &nacks);
        assert_eq!(
            by_name(&statuses)["VirtualService/web"].state,
            State::Accepted
        );
    }

    #[test]
    fn a_rejected_object_counts_proxies_holding_its_last_good_version() {
        let p1 = published(CONFIG);
        let held = local_acks(&p1, &[connection(&p1, None)]);
        // The virtual service is broken now: the last good version is served.
        let mut set = ConfigSet::new();
        set.upsert_source("all.yaml", CONFIG, SourceMode::MultiDoc);
        set.upsert_source(
            "all.yaml",
            &CONFIG.replace("upstream: a", "upstream: a\n      nope: 1"),
            SourceMode::MultiDoc,
        );
        let config = set.snapshot();
        let p2 = Published {
            generation: 2,
            source_errors: BTreeMap::new(),
            translation: vmesh_translate::translate(&config),
            revisions: BTreeMap::new(),
            took: Duration::ZERO,
        };
        let statuses = object_statuses(&p2, &held, &NackLog::default());
        let vs = by_name(&statuses)["VirtualService/web"].clone();
        assert_eq!(vs.state, State::Rejected);
        assert!(vs.serving_last_good);
        assert_eq!(
            vs.proxies.acked, 1,
            "the proxy holds the version being served"
        );
    }
}

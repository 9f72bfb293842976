//! The reporter: what each config object's state is, and how many of the proxies it
//! affects hold its current version. Computed on demand from the latest
//! translation, the connected streams and the NACKs proxies sent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use serde::Serialize;
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
                for (name, _) in rejected {
                    let Some(origins) = proxy
                        .origins
                        .get(&(type_url_static(type_url), name.clone()))
                    else {
                        continue;
                    };
                    for key in origins {
                        let Some(report) = published.translation.reports.get(key) else {
                            continue;
                        };
                        self.nacks.record(
                            key.clone(),
                            NackRecord {
                                proxy: stream.node.clone(),
                                resource: format!("{} {}", short_type(type_url), name),
                                message: message.clone(),
                                object_version: report.version.clone(),
                            },
                        );
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

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStatus {
    pub kind: String,
    pub name: String,
    pub state: State,
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
    pub source: String,
    pub version: String,
    pub serving_last_good: bool,
    pub serving_version: Option<String>,
    /// The Consul ModifyIndex of the config value that was judged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_modify_index: Option<u64>,
    pub proxies: ProxyCount,
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ProxyCount {
    /// Proxies whose config this object contributes to.
    pub total: usize,
    /// Of those, the ones that acknowledged everything it contributes at the current version.
    pub acked: usize,
}

/// Per proxy, the objects whose current resources it holds, each with the version of the
/// object they were translated from. Replicas compute it for the proxies connected to
/// them; the leader merges every replica's into the status it writes.
pub type Acks = BTreeMap<String, BTreeMap<ObjectKey, String>>;

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

/// What the proxies connected to this replica hold.
pub fn local_acks(published: &Published, connections: &[Connection]) -> Acks {
    let mut acks = Acks::new();
    for (proxy, output) in &published.translation.proxies {
        let streams: Vec<&Connection> = connections.iter().filter(|c| &c.node == proxy).collect();
        if streams.is_empty() {
            continue;
        }
        let mut affected: BTreeSet<&ObjectKey> = BTreeSet::new();
        let mut behind: BTreeSet<&ObjectKey> = BTreeSet::new();
        for ((type_url, name), objects) in &output.origins {
            affected.extend(objects.iter());
            let want = output
                .snapshot
                .get(type_url, name)
                .map(|r| r.version.as_str());
            let key = (type_url.to_string(), name.clone());
            let held = streams
                .iter()
                .any(|c| c.acked.get(&key).map(String::as_str) == want);
            if !held {
                behind.extend(objects.iter());
            }
        }
        let held: BTreeMap<ObjectKey, String> = affected
            .into_iter()
            .filter(|k| !behind.contains(k))
            .filter_map(|k| Some((k.clone(), served_version(published, k)?)))
            .collect();
        acks.insert(proxy.clone(), held);
    }
    acks
}

/// Adds what `other` says proxies hold.
pub fn merge_acks(into: &mut Acks, other: Acks) {
    for (proxy, objects) in other {
        into.entry(proxy).or_default().extend(objects);
    }
}

/// Every object's status, sorted by kind and name.
pub fn object_statuses(published: &Published, acks: &Acks, nacks: &NackLog) -> Vec<ObjectStatus> {
    let mut counts: BTreeMap<&ObjectKey, ProxyCount> = BTreeMap::new();
    for (proxy, output) in &published.translation.proxies {
        let affected: BTreeSet<&ObjectKey> = output.origins.values().flatten().collect();
        for key in affected {
            let c = counts.entry(key).or_default();
            c.total += 1;
            let held = acks.get(proxy).and_then(|m| m.get(key));
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
                errors: report.errors.clone(),
                warnings: report.warnings.clone(),
                source: report.source.clone(),
                version: report.version.clone(),
                serving_last_good: report.serving_last_good,
                serving_version: report.serving_version.clone(),
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

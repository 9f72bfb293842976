//! The relay's hub: what every agent reported, which stream speaks for it, who is revoked, and
//! the catalog that results.
//!
//! One lock guards it all; every call does a little pure work under it (the discovery state
//! machine, the merger) and returns. The catalog is published by [`publish`]: a change only
//! marks it dirty, so a burst of agent messages becomes one catalog for the index.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch, Notify};
use tonic::Status;
use tracing::{info, warn};
use vmesh_proto::relay::ControllerDiscovery;
use vmesh_proto::v1::{AgentMessage, ControllerMessage};
use vmesh_tls::{DenyList, SpiffeId};

use super::shared::{DiscoveryRecord, RemoteView, SharedInstance};
use crate::discovery::{AgentIdentity, DiscoveryMerger};
use crate::metrics::Metrics;
use crate::source::{Change, SourceEvent};

/// One open `Connect` stream.
#[derive(Debug)]
struct StreamEntry {
    serial: String,
    /// Ends the stream with this status when set.
    cancel: watch::Sender<Option<Status>>,
}

#[derive(Debug)]
struct Agent {
    identity: AgentIdentity,
    discovery: ControllerDiscovery,
    /// The stream whose messages count; a newer stream of the same agent (after a renewal, or a
    /// reconnect before the old connection timed out) takes over.
    current: Option<u64>,
    streams: HashMap<u64, StreamEntry>,
    /// When the current (or last) stream opened, for the shared record.
    connected_unix: u64,
}

#[derive(Debug)]
struct Inner {
    merger: DiscoveryMerger,
    agents: HashMap<SpiffeId, Agent>,
    deny: DenyList,
    next_stream: u64,
    /// Agents expected to report after a start; the first catalog waits for them (or the
    /// warm-up deadline).
    awaiting: Option<Vec<SpiffeId>>,
    /// Other replicas' agents (`shared.rs`).
    remote: RemoteView,
    /// Agents whose shared record must be written (or deleted) again.
    records_dirty: BTreeSet<SpiffeId>,
}

/// A stream attached to the hub.
pub struct Attached {
    pub stream: u64,
    /// Becomes `Some(status)` when the controller cuts the stream off (revocation).
    pub cancel: watch::Receiver<Option<Status>>,
}

pub struct Hub {
    inner: Mutex<Inner>,
    /// The catalog changed.
    dirty: Notify,
    /// A shared record must be written.
    records: Notify,
    replica: String,
    metrics: Arc<Metrics>,
}

impl Hub {
    /// A hub for replica `replica` (its `--id`).
    pub fn new(grace: Duration, replica: &str, metrics: Arc<Metrics>) -> Self {
        Hub {
            inner: Mutex::new(Inner {
                merger: DiscoveryMerger::new(grace),
                agents: HashMap::new(),
                deny: DenyList::new(),
                next_stream: 0,
                awaiting: None,
                remote: RemoteView::new(replica, grace),
                records_dirty: BTreeSet::new(),
            }),
            dirty: Notify::new(),
            records: Notify::new(),
            replica: replica.to_owned(),
            metrics,
        }
    }

    fn record_changed(&self, inner: &mut Inner, id: &SpiffeId) {
        inner.records_dirty.insert(id.clone());
        self.records.notify_one();
    }

    /// Every agent's shared record must be written again (e.g. under a new session).
    pub fn rewrite_records(&self) {
        let mut inner = self.lock();
        let ids: Vec<SpiffeId> = inner.agents.keys().cloned().collect();
        inner.records_dirty.extend(ids);
        self.records.notify_one();
    }

    /// Waits until some shared record must be written.
    pub async fn records_changed(&self) {
        self.records.notified().await;
    }

    /// The shared records to write (`Some`) or delete (`None`), clearing the list. A caller that
    /// fails to write them gives them back with [`Hub::retry_records`].
    pub fn take_records(&self) -> Vec<(SpiffeId, Option<DiscoveryRecord>)> {
        let mut inner = self.lock();
        let dirty = std::mem::take(&mut inner.records_dirty);
        let now = Instant::now();
        let wall = SystemTime::now();
        dirty
            .into_iter()
            .map(|id| {
                let record = inner.agents.get(&id).and_then(|agent| {
                    let (instances, gone_since) = inner.merger.entry(&agent.identity)?;
                    let disconnected_unix = gone_since.map(|t| {
                        unix(wall).saturating_sub(now.saturating_duration_since(t).as_secs())
                    });
                    Some(DiscoveryRecord {
                        spiffe_id: id.clone(),
                        replica: self.replica.clone(),
                        connected_unix: agent.connected_unix,
                        disconnected_unix,
                        instances: instances
                            .iter()
                            .map(|(service, instance)| SharedInstance {
                                service: service.clone(),
                                instance: instance.clone(),
                            })
                            .collect(),
                    })
                });
                (id, record)
            })
            .collect()
    }

    /// Records that could not be written, to try again.
    pub fn retry_records(&self, ids: impl IntoIterator<Item = SpiffeId>) {
        let mut inner = self.lock();
        inner.records_dirty.extend(ids);
    }

    /// Every replica's records as now in Consul KV.
    pub fn set_remote(&self, records: Vec<DiscoveryRecord>) {
        let mut inner = self.lock();
        if inner.remote.set(records, Instant::now()) {
            self.update_gauges(&inner);
            self.dirty.notify_one();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first catalog waits until these agents have reported (see [`publish`]).
    pub fn await_agents(&self, agents: Vec<SpiffeId>) {
        let mut inner = self.lock();
        inner.awaiting = Some(agents);
        self.dirty.notify_one();
    }

    /// Whether an agent's certificate is revoked.
    pub fn is_revoked(&self, id: &SpiffeId, serial: &str) -> bool {
        self.lock().deny.is_revoked(id, serial)
    }

    /// A new `Connect` stream from `id` (certificate `serial`), from `address`.
    pub fn attach(&self, id: &SpiffeId, serial: &str, address: IpAddr) -> Result<Attached, Status> {
        let mut inner = self.lock();
        if inner.deny.is_revoked(id, serial) {
            return Err(Status::permission_denied(format!(
                "agent {id} is revoked; re-admit it with `vmeshctl agent allow` and a new bootstrap token"
            )));
        }
        let node = id.agent_node().unwrap_or_default().to_owned();
        let identity = AgentIdentity {
            node,
            datacenter: id.dc().to_owned(),
            address,
        };
        inner.next_stream += 1;
        let stream = inner.next_stream;
        let (cancel_tx, cancel) = watch::channel(None);
        let agent = inner.agents.entry(id.clone()).or_insert_with(|| Agent {
            identity: identity.clone(),
            discovery: ControllerDiscovery::new(),
            current: None,
            streams: HashMap::new(),
            connected_unix: 0,
        });
        agent.connected_unix = unix(SystemTime::now());
        if agent.identity.address != identity.address {
            info!(agent = %id, old = %agent.identity.address, new = %identity.address, "agent's address changed");
        }
        agent.identity = identity;
        agent.current = Some(stream);
        agent.streams.insert(
            stream,
            StreamEntry {
                serial: serial.to_owned(),
                cancel: cancel_tx,
            },
        );
        self.update_gauges(&inner);
        Ok(Attached { stream, cancel })
    }

    /// A message on stream `stream` of `id`. Returns the reply, if any. Messages of a stream that
    /// another one replaced are ignored.
    pub fn on_message(
        &self,
        id: &SpiffeId,
        stream: u64,
        message: &AgentMessage,
    ) -> Option<ControllerMessage> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let agent = inner.agents.get_mut(id)?;
        if agent.current != Some(stream) {
            return None;
        }
        let step = agent.discovery.on_agent(message);
        if matches!(
            step.reply,
            Some(ControllerMessage {
                message: Some(vmesh_proto::v1::controller_message::Message::Resync(_))
            })
        ) {
            self.metrics.relay_resyncs.inc();
            info!(agent = %id, "asked the agent for a full snapshot");
        }
        let first_report = agent.discovery.applied_seq().is_some()
            && inner
                .awaiting
                .as_mut()
                .is_some_and(|a| a.iter().any(|x| x == id));
        if step.changed || first_report {
            let instances: Vec<_> = agent.discovery.instances().cloned().collect();
            let refused = inner.merger.update(&agent.identity, &instances);
            for r in &refused {
                self.metrics.relay_instances_refused.inc();
                warn!(agent = %id, instance = %r.instance, reason = %r.reason, "service instance refused");
            }
            if let Some(awaiting) = inner.awaiting.as_mut() {
                awaiting.retain(|x| x != id);
            }
            self.record_changed(inner, id);
            self.update_gauges(inner);
            self.dirty.notify_one();
        }
        step.reply
    }

    /// Stream `stream` of `id` ended. If it was the agent's current stream, the agent's
    /// instances enter their grace period.
    pub fn detach(&self, id: &SpiffeId, stream: u64, now: Instant) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(agent) = inner.agents.get_mut(id) else {
            return;
        };
        agent.streams.remove(&stream);
        if agent.current == Some(stream) {
            agent.current = None;
            inner.merger.disconnected(&agent.identity, now);
            self.record_changed(inner, id);
            self.dirty.notify_one();
        }
        self.update_gauges(inner);
    }

    /// A new deny list: streams of revoked agents are cut off and their instances go at once.
    pub fn set_deny(&self, deny: DenyList) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut cut = Vec::new();
        for (id, agent) in &mut inner.agents {
            let revoked: Vec<u64> = agent
                .streams
                .iter()
                .filter(|(_, s)| deny.is_revoked(id, &s.serial))
                .map(|(n, _)| *n)
                .collect();
            let whole_agent = deny.ids().any(|d| d == id);
            for n in &revoked {
                if let Some(s) = agent.streams.remove(n) {
                    let _ = s.cancel.send(Some(Status::permission_denied(format!(
                        "agent {id} has been revoked"
                    ))));
                }
                if agent.current == Some(*n) {
                    agent.current = None;
                }
            }
            if whole_agent || !revoked.is_empty() {
                cut.push(id.clone());
            }
        }
        for id in cut {
            if let Some(agent) = inner.agents.remove(&id) {
                inner.merger.revoke(&agent.identity);
                self.record_changed(inner, &id);
                self.metrics.refused("revoked");
                warn!(agent = %id, "agent revoked: stream closed and its services removed");
            }
        }
        inner
            .remote
            .expire(&deny, Instant::now(), SystemTime::now());
        inner.deny = deny;
        self.update_gauges(inner);
        self.dirty.notify_one();
    }

    fn update_gauges(&self, inner: &Inner) {
        let connected = inner
            .agents
            .values()
            .filter(|a| a.current.is_some())
            .count();
        self.metrics.relay_agents_connected.set(connected as i64);
        self.metrics
            .relay_agents_known
            .set((inner.merger.len() + inner.remote.agents()) as i64);
    }

    /// The agents known to the hub: (id, connected, instances reported).
    pub fn agents(&self) -> Vec<(SpiffeId, bool, usize)> {
        let inner = self.lock();
        let mut out: Vec<_> = inner
            .agents
            .iter()
            .map(|(id, a)| {
                (
                    id.clone(),
                    a.current.is_some(),
                    a.discovery.instances().len(),
                )
            })
            .collect();
        out.sort();
        out
    }
}

/// Publishes the catalog to the index whenever it changed, and drops agents whose grace period
/// ended. The first catalog waits until the agents given to [`Hub::await_agents`] reported, or
/// `warmup` passed.
pub async fn publish(
    hub: Arc<Hub>,
    events: mpsc::Sender<SourceEvent>,
    warmup: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let warm_by = Instant::now() + warmup;
    let mut first = true;
    loop {
        let (next_expiry, waiting) = {
            let inner = hub.lock();
            let waiting = inner.awaiting.as_ref().is_none_or(|a| !a.is_empty());
            let remote = inner.remote.next_expiry(Instant::now(), SystemTime::now());
            let next = match (inner.merger.next_expiry(), remote) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            (next, first && waiting)
        };
        let wake = match (next_expiry, waiting) {
            (Some(t), true) => Some(t.min(warm_by)),
            (Some(t), false) => Some(t),
            (None, true) => Some(warm_by),
            (None, false) => None,
        };
        let expiry = async {
            match wake {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = hub.dirty.notified() => {}
            () = expiry => {}
            _ = shutdown.changed() => return,
        }
        let catalog = {
            let mut inner = hub.lock();
            let now = Instant::now();
            if inner.merger.expire(now) {
                info!("agents' grace period ended: their services are removed");
                let Inner {
                    agents,
                    merger,
                    records_dirty,
                    ..
                } = &mut *inner;
                agents.retain(|id, a| {
                    let keep = a.current.is_some() || merger.contains(&a.identity);
                    if !keep {
                        records_dirty.insert(id.clone());
                    }
                    keep
                });
                hub.records.notify_one();
                hub.update_gauges(&inner);
            }
            let Inner { remote, deny, .. } = &mut *inner;
            if remote.expire(deny, now, SystemTime::now()) {
                info!("another replica's agents' grace period ended: their services are removed");
                hub.update_gauges(&inner);
            }
            let still_waiting = inner.awaiting.as_ref().is_none_or(|a| !a.is_empty());
            if first && still_waiting && now < warm_by {
                continue;
            }
            if first {
                if let Some(missing) = inner.awaiting.as_ref().filter(|a| !a.is_empty()) {
                    warn!(
                        missing = missing.len(),
                        "discovery warm-up ended before every registered agent reported"
                    );
                }
                inner.awaiting = Some(Vec::new());
            }
            let mut catalog = inner.merger.catalog();
            let Inner {
                agents,
                merger,
                remote,
                ..
            } = &*inner;
            let local =
                |id: &SpiffeId| agents.get(id).is_some_and(|a| merger.contains(&a.identity));
            remote.add_to(&mut catalog, local, now, SystemTime::now());
            catalog
        };
        first = false;
        if events
            .send(SourceEvent {
                changes: vec![Change::Catalog(catalog)],
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

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
use vmesh_registry::unix_secs;

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
    /// The current stream has not had a snapshot applied yet: its first one must reach the
    /// merger even if it equals what the agent reported before (that ends a grace period and
    /// re-checks the addresses against the stream's).
    fresh: bool,
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
                        unix_secs(wall).saturating_sub(now.saturating_duration_since(t).as_secs())
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
        let inner = &mut *inner;
        if inner.remote.set(records, Instant::now(), SystemTime::now()) {
            // Agents that stream to another replica are not waited for after a start.
            if let Some(awaiting) = inner.awaiting.as_mut() {
                awaiting.retain(|id| !inner.remote.has_open(id));
            }
            self.update_gauges(inner);
            self.dirty.notify_one();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first catalog waits until these agents have reported (see [`publish`]).
    pub fn await_agents(&self, mut agents: Vec<SpiffeId>) {
        let mut inner = self.lock();
        agents.retain(|id| !inner.deny.ids().any(|d| d == id) && !inner.remote.has_open(id));
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
            fresh: true,
        });
        agent.connected_unix = unix_secs(SystemTime::now());
        agent.fresh = true;
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
        let first_snapshot = agent.fresh
            && matches!(
                message.message,
                Some(vmesh_proto::v1::agent_message::Message::Snapshot(_))
            );
        if first_snapshot {
            agent.fresh = false;
        }
        if step.changed || first_snapshot {
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
            // An agent that never reported anything has nothing to keep for a grace period.
            if agent.streams.is_empty() && !inner.merger.contains(&agent.identity) {
                inner.agents.remove(id);
            }
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
        inner.remote.expire(&deny, Instant::now());
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
            let remote = inner.remote.next_expiry();
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
            if remote.expire(deny, now) {
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
            let Inner {
                agents,
                merger,
                remote,
                ..
            } = &*inner;
            // This replica speaks for the agents it counts, unless one has moved: then its open
            // stream on another replica wins over the copy kept here for the grace period.
            let moved: BTreeSet<(String, String)> = agents
                .iter()
                .filter(|(id, a)| a.current.is_none() && remote.has_open(id))
                .map(|(_, a)| (a.identity.datacenter.clone(), a.identity.node.clone()))
                .collect();
            let mut catalog =
                merger.catalog_where(|dc, node| !moved.contains(&(dc.to_owned(), node.to_owned())));
            let local = |id: &SpiffeId| {
                agents.get(id).is_some_and(|a| {
                    merger.contains(&a.identity) && (a.current.is_some() || !remote.has_open(id))
                })
            };
            remote.add_to(&mut catalog, local, now);
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

#[cfg(test)]
mod tests {
    use super::*;
    use vmesh_proto::v1::{agent_message, DiscoverySnapshot, Hello, ServiceInstance};

    fn hub() -> Hub {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::register(&mut registry));
        Hub::new(Duration::from_secs(60), "r1", metrics)
    }

    fn hello() -> AgentMessage {
        AgentMessage {
            message: Some(agent_message::Message::Hello(Hello::default())),
        }
    }

    fn snapshot(seq: u64) -> AgentMessage {
        AgentMessage {
            message: Some(agent_message::Message::Snapshot(DiscoverySnapshot {
                seq,
                instances: vec![ServiceInstance {
                    id: "web-1".into(),
                    service: "web".into(),
                    address: "10.0.0.7".into(),
                    port: 8080,
                    health: vmesh_proto::v1::Health::Passing as i32,
                    ..Default::default()
                }],
            })),
        }
    }

    #[test]
    fn an_agent_that_reconnects_with_the_same_services_leaves_its_grace_period() {
        let hub = hub();
        let id = SpiffeId::agent("vmesh", "dc1", "vm-1").unwrap();
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let first = hub.attach(&id, "01", ip).unwrap();
        hub.on_message(&id, first.stream, &hello());
        hub.on_message(&id, first.stream, &snapshot(1));
        hub.detach(&id, first.stream, Instant::now());
        assert!(
            hub.lock().merger.next_expiry().is_some(),
            "in its grace period"
        );

        // The agent reconnects and reports exactly what it reported before.
        let second = hub.attach(&id, "01", ip).unwrap();
        hub.on_message(&id, second.stream, &hello());
        hub.on_message(&id, second.stream, &snapshot(2));
        assert_eq!(
            hub.lock().merger.next_expiry(),
            None,
            "connected again: no grace period may run out"
        );
        let records = hub.take_records();
        assert_eq!(records.len(), 1);
        let record = records[0].1.as_ref().unwrap();
        assert_eq!(
            record.disconnected_unix, None,
            "the shared record says connected"
        );
    }

    #[test]
    fn messages_of_a_replaced_stream_are_ignored() {
        let hub = hub();
        let id = SpiffeId::agent("vmesh", "dc1", "vm-1").unwrap();
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let old = hub.attach(&id, "01", ip).unwrap();
        let new = hub.attach(&id, "02", ip).unwrap();
        assert!(hub.on_message(&id, old.stream, &snapshot(1)).is_none());
        assert!(hub.on_message(&id, new.stream, &snapshot(1)).is_some());
        // The old stream ending does not start a grace period: the new one is current.
        hub.detach(&id, old.stream, Instant::now());
        assert_eq!(hub.lock().merger.next_expiry(), None);
    }

    #[test]
    fn a_revoked_agent_is_cut_off_and_refused() {
        let hub = hub();
        let id = SpiffeId::agent("vmesh", "dc1", "vm-1").unwrap();
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let attached = hub.attach(&id, "01", ip).unwrap();
        hub.on_message(&id, attached.stream, &snapshot(1));
        let mut deny = DenyList::new();
        deny.deny_id(id.clone());
        hub.set_deny(deny);
        assert!(
            attached.cancel.borrow().is_some(),
            "the stream is told to end"
        );
        assert_eq!(hub.lock().merger.len(), 0, "its services go at once");
        assert!(hub.attach(&id, "01", ip).is_err());
        assert!(
            hub.take_records().iter().all(|(_, r)| r.is_none()),
            "its record is deleted"
        );
    }
}

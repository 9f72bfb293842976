//! The hub task's shell around [`HubState`]: the relay's stream tasks, the revocation watch and
//! the replicas' records call into it; it keeps each stream's cancel channel, turns the hub's
//! observations into log lines and metrics, and publishes the catalog.
//!
//! Every call takes the lock for a little synchronous work on [`HubState`] (which holds the
//! rules and is tested there) and returns; [`Hub::publish`] is the task that wakes when the
//! catalog may have changed or a grace period or the warm-up ends, and sends the catalog to the
//! index.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use tokio::sync::{mpsc, watch, Notify};
use tracing::{info, warn};
use vmesh_proto::v1::{AgentMessage, ControllerMessage};
use vmesh_relay::hub::StreamId;
use vmesh_relay::{AgentSummary, DiscoveryRecord, HubState, Observation, Refusal, RefusalKind};
use vmesh_runtime::{Component, Shutdown};
use vmesh_tls::{DenyList, SpiffeId};

use crate::metrics::Metrics;
use crate::source::{Change, SourceEvent};

/// A stream attached to the hub.
pub struct Attached {
    pub stream: StreamId,
    /// Becomes `Some(refusal)` when the controller cuts the stream off (revocation).
    pub cancel: watch::Receiver<Option<Refusal>>,
}

struct Inner {
    state: HubState,
    cancels: HashMap<StreamId, watch::Sender<Option<Refusal>>>,
}

pub struct Hub {
    inner: Mutex<Inner>,
    /// The catalog may have changed.
    changed: Notify,
    /// A shared record must be written.
    records: Notify,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(state: HubState, metrics: Arc<Metrics>) -> Self {
        Hub {
            inner: Mutex::new(Inner {
                state,
                cancels: HashMap::new(),
            }),
            changed: Notify::new(),
            records: Notify::new(),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After a change: log and count what the hub noticed, wake the record writer and the
    /// publisher (which updates the gauges).
    fn after(&self, inner: &mut Inner) {
        self.observe(inner);
        self.changed.notify_one();
    }

    /// Logs and counts what the hub noticed, closes the streams of forgotten agents, wakes the
    /// record writer.
    fn observe(&self, inner: &mut Inner) {
        for observation in inner.state.take_observations() {
            match observation {
                Observation::AddressChanged { agent, old, new } => {
                    info!(%agent, %old, %new, "agent's address changed");
                }
                Observation::InstanceRefused {
                    agent,
                    instance,
                    reason,
                } => {
                    self.metrics.relay_instances_refused.inc();
                    warn!(%agent, %instance, %reason, "service instance refused");
                }
                Observation::ResyncRequested { agent } => {
                    self.metrics.relay_resyncs.inc();
                    info!(%agent, "asked the agent for a full snapshot");
                }
                Observation::AgentRevoked { agent } => {
                    self.metrics.refused("revoked");
                    warn!(%agent, "agent revoked: stream closed and its services removed");
                }
                Observation::GraceEnded => {
                    info!("agents' grace period ended: their services are removed");
                }
                Observation::RemoteGraceEnded => {
                    info!(
                        "another replica's agents' grace period ended: their services are removed"
                    );
                }
                Observation::WarmupIncomplete { missing } => {
                    warn!(
                        missing,
                        "discovery warm-up ended before every registered agent reported"
                    );
                }
            }
        }
        for stream in inner.state.take_forgotten_streams() {
            // Dropping its cancel sender ends the stream ("closed by the controller").
            inner.cancels.remove(&stream);
        }
        if inner.state.has_records() {
            self.records.notify_one();
        }
    }

    /// Sets the agent gauges (counting takes a pass over every agent, so the publisher does it
    /// once per wake-up, not every stream on every message).
    fn gauges(&self, inner: &Inner) {
        self.metrics
            .relay_agents_connected
            .set(inner.state.connected() as i64);
        self.metrics
            .relay_agents_known
            .set(inner.state.known() as i64);
    }

    /// Ends every agent's stream: the controller is stopping (the agents reconnect, to another
    /// replica or to this one restarted), so the relay server can drain.
    fn close_all(&self) {
        let mut inner = self.lock();
        let stopping = Refusal::new(
            RefusalKind::Unavailable,
            "stopping",
            "the controller is stopping",
        );
        for (_, cancel) in inner.cancels.drain() {
            let _ = cancel.send(Some(stopping.clone()));
        }
    }

    /// The first catalog waits until these agents have reported.
    pub fn await_agents(&self, agents: Vec<SpiffeId>) {
        let mut inner = self.lock();
        inner.state.await_agents(agents);
        self.after(&mut inner);
    }

    /// Whether this certificate of `id` is revoked (`serial` empty: the identity itself).
    pub fn is_revoked(&self, id: &SpiffeId, serial: &str) -> bool {
        self.lock().state.is_revoked(id, serial)
    }

    /// A new `Connect` stream from `id` (certificate `serial`), from `address`.
    pub fn attach(
        &self,
        id: &SpiffeId,
        serial: &str,
        address: IpAddr,
    ) -> Result<Attached, Refusal> {
        let mut inner = self.lock();
        let stream = inner.state.attach(id, serial, address, SystemTime::now())?;
        let (cancel_tx, cancel) = watch::channel(None);
        inner.cancels.insert(stream, cancel_tx);
        self.after(&mut inner);
        Ok(Attached { stream, cancel })
    }

    /// A message on stream `stream` of `id`; returns the reply.
    pub fn on_message(
        &self,
        id: &SpiffeId,
        stream: StreamId,
        message: &AgentMessage,
    ) -> Option<ControllerMessage> {
        let mut inner = self.lock();
        let reply = inner.state.on_message(id, stream, message);
        self.after(&mut inner);
        reply
    }

    /// Stream `stream` of `id` ended.
    pub fn detach(&self, id: &SpiffeId, stream: StreamId) {
        let mut inner = self.lock();
        inner.cancels.remove(&stream);
        inner.state.detach(id, stream, Instant::now());
        self.after(&mut inner);
    }

    /// A new deny list: revoked agents' streams are told to end.
    pub fn set_deny(&self, deny: DenyList) {
        let mut inner = self.lock();
        for (stream, refusal) in inner.state.set_deny(deny, Instant::now()) {
            if let Some(cancel) = inner.cancels.remove(&stream) {
                let _ = cancel.send(Some(refusal));
            }
        }
        self.after(&mut inner);
    }

    /// Every replica's discovery records as now in Consul KV.
    pub fn set_remote(&self, records: Vec<DiscoveryRecord>) {
        let mut inner = self.lock();
        inner
            .state
            .set_remote(records, Instant::now(), SystemTime::now());
        self.after(&mut inner);
    }

    /// The shared records to write (`Some`) or delete (`None`).
    pub fn take_records(&self) -> Vec<(SpiffeId, Option<DiscoveryRecord>)> {
        self.lock()
            .state
            .take_records(Instant::now(), SystemTime::now())
    }

    /// Records that could not be written, to write again.
    pub fn retry_records(&self, ids: Vec<SpiffeId>) {
        self.lock().state.retry_records(ids);
    }

    /// Every record must be written again (under a new session).
    pub fn rewrite_records(&self) {
        let mut inner = self.lock();
        inner.state.rewrite_records();
        self.after(&mut inner);
    }

    /// Waits until some shared record must be written.
    pub async fn records_changed(&self) {
        self.records.notified().await;
    }

    /// The agents of this replica, for `/agents`.
    pub fn agents(&self) -> Vec<AgentSummary> {
        self.lock().state.agents()
    }

    /// Publishes the catalog to the index whenever it changed, and ends grace periods and the
    /// warm-up on time. `component` is ready once the first catalog is out. On shutdown it ends
    /// every agent's stream.
    pub async fn publish(
        self: Arc<Self>,
        events: mpsc::Sender<SourceEvent>,
        component: Component,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let result = self
            .clone()
            .publish_until(events, component, shutdown)
            .await;
        self.close_all();
        result
    }

    async fn publish_until(
        self: Arc<Self>,
        events: mpsc::Sender<SourceEvent>,
        component: Component,
        mut shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        component.starting("waiting for the registered agents to report (discovery warm-up)");
        loop {
            vmesh_runtime::test_panic("discovery");
            let poll = {
                let mut inner = self.lock();
                let poll = inner.state.poll(Instant::now());
                self.observe(&mut inner);
                self.gauges(&inner);
                poll
            };
            if let Some(catalog) = poll.catalog {
                component.ready();
                let sent = events.send(SourceEvent {
                    changes: vec![Change::Catalog(catalog)],
                });
                tokio::select! {
                    r = sent => if r.is_err() { return Ok(()) },
                    () = shutdown.requested() => return Ok(()),
                }
            }
            let wake = async {
                match poll.next_wake {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.changed.notified() => {}
                () = wake => {}
                () = shutdown.requested() => return Ok(()),
            }
        }
    }
}

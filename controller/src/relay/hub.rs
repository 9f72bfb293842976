//! The relay's hub: what every agent reported, which stream speaks for it, who is revoked, and
//! the catalog that results.
//!
//! One lock guards it all; every call does a little pure work under it (the discovery state
//! machine, the merger) and returns. The catalog is published by [`publish`]: a change only
//! marks it dirty, so a burst of agent messages becomes one catalog for the index.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use tonic::Status;
use tracing::{info, warn};
use vmesh_proto::relay::ControllerDiscovery;
use vmesh_proto::v1::{AgentMessage, ControllerMessage};
use vmesh_tls::{DenyList, SpiffeId};

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
}

/// A stream attached to the hub.
pub struct Attached {
    pub stream: u64,
    /// Becomes `Some(status)` when the controller cuts the stream off (revocation).
    pub cancel: watch::Receiver<Option<Status>>,
}

pub struct Hub {
    inner: Mutex<Inner>,
    dirty: Notify,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(grace: Duration, metrics: Arc<Metrics>) -> Self {
        Hub {
            inner: Mutex::new(Inner {
                merger: DiscoveryMerger::new(grace),
                agents: HashMap::new(),
                deny: DenyList::new(),
                next_stream: 0,
                awaiting: None,
            }),
            dirty: Notify::new(),
            metrics,
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
        });
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
                self.metrics.refused("revoked");
                warn!(agent = %id, "agent revoked: stream closed and its services removed");
            }
        }
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
            .set(inner.merger.len() as i64);
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
            (inner.merger.next_expiry(), first && waiting)
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
                let Inner { agents, merger, .. } = &mut *inner;
                agents.retain(|_, a| a.current.is_some() || merger.contains(&a.identity));
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
            inner.merger.catalog()
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

//! The hub's rules, without IO: which stream speaks for each agent, who is revoked, what every
//! agent reported, when the first catalog may be published, which replica's view of an agent
//! counts, and which shared records must be written.
//!
//! The controller's relay tasks feed [`HubState`] what happens (a stream opens, a message
//! arrives, a stream ends, a new deny list, other replicas' records, time passing) with the time
//! it happened, and carry out what it returns: replies to send, streams to cut, a catalog to
//! publish, records to write. What it noticed along the way (an instance refused, a grace period
//! over) comes out as [`Observation`]s for the log and the metrics.
//!
//! The rules:
//! - **One stream speaks for an agent**: the newest. A newer stream of the same agent (after a
//!   renewal, or a reconnect before the old connection timed out) takes over; the old one's
//!   messages are ignored, and its end starts no grace period.
//! - **A new stream's first snapshot always counts**, even if it equals what the agent reported
//!   before: it ends a grace period and checks the addresses against the new connection's.
//! - **Grace**: the instances of an agent whose current stream ended are kept for the grace
//!   period, then dropped; an agent that reported nothing is forgotten at once.
//! - **Revocation** cuts the agent's streams and drops its instances at once, here and in what
//!   other replicas shared.
//! - **Warm-up**: after a start, no catalog is published until the agents registered before the
//!   start have reported (those streaming to another replica are not waited for), or the warm-up
//!   deadline passed, so a restart never serves a Consul service without its endpoints.
//! - **Local vs remote**: this replica speaks for the agents it counts, unless one has moved: then
//!   its open stream on another replica wins over the copy kept here for the grace period. Other
//!   replicas' agents count as [`RemoteView`] says.
//!
//! Room for the sidecar work: the per-proxy config that flows down the same stream (proxy config
//! versions and their acks) will live beside `discovery` in [`Agent`], fed by the same calls.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use vmesh_model::Catalog;
use vmesh_proto::v1::{agent_message, controller_message, AgentMessage, ControllerMessage};
use vmesh_tls::{DenyList, SpiffeId};

use crate::discovery::ControllerDiscovery;
use crate::merger::{AgentIdentity, DiscoveryMerger};
use crate::refusal::Refusal;
use crate::replicas::{DiscoveryRecord, RemoteView, SharedInstance};

/// One `Relay.Connect` stream, numbered by the hub.
pub type StreamId = u64;

/// What the hub noticed, for the log and the metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// An agent's current stream changed address.
    AddressChanged {
        agent: SpiffeId,
        old: IpAddr,
        new: IpAddr,
    },
    /// An instance the agent may not report (another machine's address, a bad port, ...).
    InstanceRefused {
        agent: SpiffeId,
        instance: String,
        reason: String,
    },
    /// The hub asked the agent for a full snapshot (it missed a delta).
    ResyncRequested { agent: SpiffeId },
    /// A connected or remembered agent was revoked: its streams are cut, its services gone.
    AgentRevoked { agent: SpiffeId },
    /// Disconnected agents' grace periods ended: their services are removed.
    GraceEnded,
    /// Other replicas' agents' grace periods ended.
    RemoteGraceEnded,
    /// The warm-up ended before every registered agent reported.
    WarmupIncomplete { missing: usize },
}

#[derive(Debug)]
struct Agent {
    identity: AgentIdentity,
    discovery: ControllerDiscovery,
    /// The stream whose messages count.
    current: Option<StreamId>,
    /// Open streams, with the serial of the certificate each was opened with.
    streams: BTreeMap<StreamId, String>,
    /// When the current (or last) stream opened, for the shared record.
    connected_unix: u64,
    /// The current stream has not had a snapshot applied yet.
    fresh: bool,
}

#[derive(Debug)]
struct Warmup {
    length: Duration,
    /// When it ends: set by the first [`HubState::poll`], i.e. once the relay serves, not while
    /// the start-up reads ran.
    until: Option<Instant>,
    /// The agents still expected; `None` until the list of registered agents is known (then the
    /// whole warm-up is waited).
    awaiting: Option<BTreeSet<SpiffeId>>,
}

/// What [`HubState::poll`] returns.
#[derive(Debug, Default)]
pub struct Poll {
    /// The catalog to publish, when it changed (or for the first time).
    pub catalog: Option<Catalog>,
    /// When to poll again at the latest (a grace period or the warm-up ending).
    pub next_wake: Option<Instant>,
}

/// A summary of one agent, for `/agents`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AgentSummary {
    pub id: SpiffeId,
    pub connected: bool,
    pub instances: usize,
}

/// Everything the relay knows of agents, on one replica.
#[derive(Debug)]
pub struct HubState {
    replica: String,
    merger: DiscoveryMerger,
    agents: HashMap<SpiffeId, Agent>,
    deny: DenyList,
    next_stream: StreamId,
    /// Until the first catalog is published.
    warmup: Option<Warmup>,
    remote: RemoteView,
    /// Agents whose shared record must be written (or deleted) again.
    records_dirty: BTreeSet<SpiffeId>,
    /// The catalog may have changed since the last poll.
    catalog_dirty: bool,
    observations: Vec<Observation>,
    /// Streams of agents the hub forgot (their grace period ended while an older, replaced
    /// stream was still open): to be closed.
    forgotten_streams: Vec<StreamId>,
}

impl HubState {
    /// The hub of replica `replica` (its `--id`): the first catalog waits at most `warmup` from
    /// the first [`poll`](Self::poll).
    pub fn new(replica: &str, grace: Duration, warmup: Duration) -> Self {
        HubState {
            replica: replica.to_owned(),
            merger: DiscoveryMerger::new(grace),
            agents: HashMap::new(),
            deny: DenyList::new(),
            next_stream: 0,
            warmup: Some(Warmup {
                length: warmup,
                until: None,
                awaiting: None,
            }),
            remote: RemoteView::new(replica, grace),
            records_dirty: BTreeSet::new(),
            catalog_dirty: true,
            observations: Vec::new(),
            forgotten_streams: Vec::new(),
        }
    }

    /// Streams of agents the hub no longer knows, to close (none of them speaks for its agent).
    pub fn take_forgotten_streams(&mut self) -> Vec<StreamId> {
        std::mem::take(&mut self.forgotten_streams)
    }

    /// What the hub noticed since the last call.
    pub fn take_observations(&mut self) -> Vec<Observation> {
        std::mem::take(&mut self.observations)
    }

    /// The agents registered before the start: the first catalog waits until each has reported
    /// (here or to another replica), or the warm-up ends.
    pub fn await_agents(&mut self, agents: impl IntoIterator<Item = SpiffeId>) {
        let Some(warmup) = self.warmup.as_mut() else {
            return;
        };
        let awaiting = agents
            .into_iter()
            .filter(|id| {
                !self.deny.ids().any(|d| d == id)
                    && !self.remote.has_open(id)
                    && self.agents.get(id).is_none_or(|a| a.fresh)
            })
            .collect();
        warmup.awaiting = Some(awaiting);
        self.catalog_dirty = true;
    }

    /// Whether this certificate of `id` is revoked (`serial` empty: the identity itself).
    pub fn is_revoked(&self, id: &SpiffeId, serial: &str) -> bool {
        self.deny.is_revoked(id, serial)
    }

    /// A new `Connect` stream from agent `id` (certificate `serial`) at `address`, opened at
    /// `wall`.
    pub fn attach(
        &mut self,
        id: &SpiffeId,
        serial: &str,
        address: IpAddr,
        wall: SystemTime,
    ) -> Result<StreamId, Refusal> {
        if self.deny.is_revoked(id, serial) {
            return Err(Refusal::revoked(id));
        }
        let identity = AgentIdentity {
            node: id.agent_node().unwrap_or_default().to_owned(),
            datacenter: id.dc().to_owned(),
            address,
        };
        self.next_stream += 1;
        let stream = self.next_stream;
        let agent = self.agents.entry(id.clone()).or_insert_with(|| Agent {
            identity: identity.clone(),
            discovery: ControllerDiscovery::new(),
            current: None,
            streams: BTreeMap::new(),
            connected_unix: 0,
            fresh: true,
        });
        agent.connected_unix = vmesh_layout::unix_secs(wall);
        agent.fresh = true;
        if agent.identity.address != identity.address {
            self.observations.push(Observation::AddressChanged {
                agent: id.clone(),
                old: agent.identity.address,
                new: identity.address,
            });
        }
        agent.identity = identity;
        agent.current = Some(stream);
        agent.streams.insert(stream, serial.to_owned());
        Ok(stream)
    }

    /// A message on stream `stream` of `id`. Returns the reply to send on that stream, if any.
    /// Messages of a stream that another one replaced are ignored.
    pub fn on_message(
        &mut self,
        id: &SpiffeId,
        stream: StreamId,
        message: &AgentMessage,
    ) -> Option<ControllerMessage> {
        let agent = self.agents.get_mut(id)?;
        if agent.current != Some(stream) {
            return None;
        }
        let step = agent.discovery.on_agent(message);
        if matches!(
            step.reply,
            Some(ControllerMessage {
                message: Some(controller_message::Message::Resync(_))
            })
        ) {
            self.observations
                .push(Observation::ResyncRequested { agent: id.clone() });
        }
        let first_snapshot =
            agent.fresh && matches!(message.message, Some(agent_message::Message::Snapshot(_)));
        if first_snapshot {
            agent.fresh = false;
        }
        if step.changed || first_snapshot {
            let instances: Vec<_> = agent.discovery.instances().cloned().collect();
            for r in self.merger.update(&agent.identity, &instances) {
                self.observations.push(Observation::InstanceRefused {
                    agent: id.clone(),
                    instance: r.instance,
                    reason: r.reason,
                });
            }
            if let Some(awaiting) = self.warmup.as_mut().and_then(|w| w.awaiting.as_mut()) {
                awaiting.remove(id);
            }
            self.records_dirty.insert(id.clone());
            self.catalog_dirty = true;
        }
        step.reply
    }

    /// Stream `stream` of `id` ended at `now`. If it was the agent's current stream, the agent's
    /// instances enter their grace period.
    pub fn detach(&mut self, id: &SpiffeId, stream: StreamId, now: Instant) {
        let Some(agent) = self.agents.get_mut(id) else {
            return;
        };
        agent.streams.remove(&stream);
        if agent.current != Some(stream) {
            return;
        }
        agent.current = None;
        self.merger.disconnected(&agent.identity, now);
        // An agent that never reported anything has nothing to keep for a grace period.
        if agent.streams.is_empty() && !self.merger.contains(&agent.identity) {
            self.agents.remove(id);
        }
        self.records_dirty.insert(id.clone());
        self.catalog_dirty = true;
    }

    /// A new deny list, at `now`: returns the streams to cut, each with its refusal. The
    /// instances of revoked agents go at once, here and in other replicas' records.
    pub fn set_deny(&mut self, deny: DenyList, now: Instant) -> Vec<(StreamId, Refusal)> {
        let mut cut_streams = Vec::new();
        let mut cut_agents = Vec::new();
        for (id, agent) in &mut self.agents {
            let revoked: Vec<StreamId> = agent
                .streams
                .iter()
                .filter(|(_, serial)| deny.is_revoked(id, serial))
                .map(|(n, _)| *n)
                .collect();
            for n in &revoked {
                agent.streams.remove(n);
                if agent.current == Some(*n) {
                    agent.current = None;
                }
                cut_streams.push((*n, Refusal::revoked_while_connected(id)));
            }
            if !revoked.is_empty() || deny.ids().any(|d| d == id) {
                cut_agents.push(id.clone());
            }
        }
        for id in cut_agents {
            if let Some(agent) = self.agents.remove(&id) {
                // Every stream of a revoked agent ends, whichever certificate it came with.
                for stream in agent.streams.keys() {
                    cut_streams.push((*stream, Refusal::revoked_while_connected(&id)));
                }
                self.merger.revoke(&agent.identity);
                self.records_dirty.insert(id.clone());
                self.observations
                    .push(Observation::AgentRevoked { agent: id });
            }
        }
        self.remote.expire(&deny, now);
        if let Some(awaiting) = self.warmup.as_mut().and_then(|w| w.awaiting.as_mut()) {
            awaiting.retain(|id| !deny.ids().any(|d| d == id));
        }
        self.deny = deny;
        self.catalog_dirty = true;
        cut_streams
    }

    /// Every replica's discovery records as now in Consul KV, read at `now` (`wall` on this
    /// machine's clock).
    pub fn set_remote(&mut self, records: Vec<DiscoveryRecord>, now: Instant, wall: SystemTime) {
        if self.remote.set(records, now, wall) {
            // Agents that stream to another replica are not waited for after a start.
            if let Some(awaiting) = self.warmup.as_mut().and_then(|w| w.awaiting.as_mut()) {
                awaiting.retain(|id| !self.remote.has_open(id));
            }
            self.catalog_dirty = true;
        }
    }

    /// Expires grace periods and the warm-up at `now`, and returns the catalog to publish if it
    /// changed, and when to poll again at the latest.
    pub fn poll(&mut self, now: Instant) -> Poll {
        if self.merger.expire(now) {
            self.observations.push(Observation::GraceEnded);
            let merger = &self.merger;
            let dirty = &mut self.records_dirty;
            let forgotten = &mut self.forgotten_streams;
            self.agents.retain(|id, a| {
                let keep = a.current.is_some() || merger.contains(&a.identity);
                if !keep {
                    dirty.insert(id.clone());
                    forgotten.extend(a.streams.keys());
                }
                keep
            });
            self.catalog_dirty = true;
        }
        if self.remote.expire(&self.deny, now) {
            self.observations.push(Observation::RemoteGraceEnded);
            self.catalog_dirty = true;
        }
        if let Some(warmup) = &mut self.warmup {
            let until = *warmup.until.get_or_insert(now + warmup.length);
            let waiting = warmup.awaiting.as_ref().is_none_or(|a| !a.is_empty());
            if waiting && now < until {
                return Poll {
                    catalog: None,
                    next_wake: self
                        .next_expiry()
                        .map_or(Some(until), |t| Some(t.min(until))),
                };
            }
            if let Some(missing) = warmup.awaiting.as_ref().filter(|a| !a.is_empty()) {
                self.observations.push(Observation::WarmupIncomplete {
                    missing: missing.len(),
                });
            }
            self.warmup = None;
            self.catalog_dirty = true;
        }
        let catalog = std::mem::take(&mut self.catalog_dirty).then(|| self.catalog(now));
        Poll {
            catalog,
            next_wake: self.next_expiry(),
        }
    }

    /// Whether the first catalog has been published (the warm-up is over).
    pub fn is_warm(&self) -> bool {
        self.warmup.is_none()
    }

    fn next_expiry(&self) -> Option<Instant> {
        match (self.merger.next_expiry(), self.remote.next_expiry()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The catalog: this replica's agents, and other replicas' where they speak for an agent.
    fn catalog(&self, now: Instant) -> Catalog {
        let moved: BTreeSet<(&str, &str)> = self
            .agents
            .iter()
            .filter(|(id, a)| a.current.is_none() && self.remote.has_open(id))
            .map(|(_, a)| (a.identity.datacenter.as_str(), a.identity.node.as_str()))
            .collect();
        let mut catalog = self
            .merger
            .catalog_where(|dc, node| !moved.contains(&(dc, node)));
        let local = |id: &SpiffeId| {
            self.agents.get(id).is_some_and(|a| {
                self.merger.contains(&a.identity)
                    && (a.current.is_some() || !self.remote.has_open(id))
            })
        };
        self.remote.add_to(&mut catalog, local, now);
        catalog
    }

    /// The shared records to write (`Some`) or delete (`None`), as of `now` (`wall` on this
    /// machine's clock), clearing the list. Records that could not be written go back with
    /// [`HubState::retry_records`].
    pub fn take_records(
        &mut self,
        now: Instant,
        wall: SystemTime,
    ) -> Vec<(SpiffeId, Option<DiscoveryRecord>)> {
        let dirty = std::mem::take(&mut self.records_dirty);
        dirty
            .into_iter()
            .map(|id| {
                let record = self.agents.get(&id).and_then(|agent| {
                    let (instances, gone_since) = self.merger.entry(&agent.identity)?;
                    let disconnected_unix = gone_since.map(|t| {
                        vmesh_layout::unix_secs(wall)
                            .saturating_sub(now.saturating_duration_since(t).as_secs())
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

    /// Records that could not be written, to write again.
    pub fn retry_records(&mut self, ids: impl IntoIterator<Item = SpiffeId>) {
        self.records_dirty.extend(ids);
    }

    /// Every agent's record must be written again (under a new session).
    pub fn rewrite_records(&mut self) {
        self.records_dirty.extend(self.agents.keys().cloned());
    }

    /// Whether some record must be written.
    pub fn has_records(&self) -> bool {
        !self.records_dirty.is_empty()
    }

    /// Agents with an open stream to this replica.
    pub fn connected(&self) -> usize {
        self.agents.values().filter(|a| a.current.is_some()).count()
    }

    /// Agents counted: this replica's (connected or within their grace period) and other
    /// replicas'.
    pub fn known(&self) -> usize {
        self.merger.len() + self.remote.agents()
    }

    /// This replica's agents, sorted.
    pub fn agents(&self) -> Vec<AgentSummary> {
        let mut out: Vec<_> = self
            .agents
            .iter()
            .map(|(id, a)| AgentSummary {
                id: id.clone(),
                connected: a.current.is_some(),
                instances: a.discovery.instances().len(),
            })
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmesh_model::{Health, ServiceInstance};
    use vmesh_proto::v1::{self, DiscoverySnapshot, Hello};

    const GRACE: Duration = Duration::from_secs(60);
    const WARMUP: Duration = Duration::from_secs(10);

    fn id(node: &str) -> SpiffeId {
        SpiffeId::agent("vmesh", "dc1", node).unwrap()
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn wall() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
    }

    fn hello() -> AgentMessage {
        AgentMessage {
            message: Some(agent_message::Message::Hello(Hello::default())),
        }
    }

    fn snapshot(seq: u64, address: IpAddr) -> AgentMessage {
        AgentMessage {
            message: Some(agent_message::Message::Snapshot(DiscoverySnapshot {
                seq,
                instances: vec![v1::ServiceInstance {
                    id: "web-1".into(),
                    service: "web".into(),
                    address: address.to_string(),
                    port: 8080,
                    health: v1::Health::Passing as i32,
                    ..Default::default()
                }],
            })),
        }
    }

    /// A hub past its warm-up (no agents were registered before the start).
    fn warm_hub(t0: Instant) -> HubState {
        let mut hub = HubState::new("r1", GRACE, WARMUP);
        hub.await_agents([]);
        assert!(hub.poll(t0).catalog.is_some(), "the first catalog, empty");
        hub
    }

    /// Connects `node` at `ip(n)` and reports one `web` instance.
    fn report(hub: &mut HubState, node: &str, n: u8) -> StreamId {
        let s = hub.attach(&id(node), "01", ip(n), wall()).unwrap();
        hub.on_message(&id(node), s, &hello());
        hub.on_message(&id(node), s, &snapshot(1, ip(n)));
        s
    }

    fn web(catalog: &Catalog) -> Vec<String> {
        catalog
            .instances("web")
            .iter()
            .map(|i| format!("{}@{}", i.node, i.address))
            .collect()
    }

    fn remote_record(node: &str, replica: &str, n: u8, closed: Option<u64>) -> DiscoveryRecord {
        DiscoveryRecord {
            spiffe_id: id(node),
            replica: replica.into(),
            connected_unix: 100,
            disconnected_unix: closed,
            instances: vec![SharedInstance {
                service: "web".into(),
                instance: ServiceInstance {
                    node: node.into(),
                    datacenter: "dc1".into(),
                    id: "web-1".into(),
                    address: ip(n).to_string(),
                    port: 8080,
                    tags: vec![],
                    health: Health::Passing,
                },
            }],
        }
    }

    #[test]
    fn an_agent_that_reconnects_with_the_same_services_leaves_its_grace_period() {
        let t0 = Instant::now();
        let mut hub = warm_hub(t0);
        let first = report(&mut hub, "vm-1", 7);
        hub.detach(&id("vm-1"), first, t0);
        assert_eq!(
            hub.poll(t0).next_wake,
            Some(t0 + GRACE),
            "in its grace period"
        );

        // The agent reconnects and reports exactly what it reported before.
        report(&mut hub, "vm-1", 7);
        assert_eq!(
            hub.poll(t0).next_wake,
            None,
            "connected again: no grace period may run out"
        );
        let records = hub.take_records(t0, wall());
        assert_eq!(records.len(), 1);
        let record = records[0].1.as_ref().unwrap();
        assert_eq!(
            record.disconnected_unix, None,
            "the shared record says connected"
        );
        assert_eq!(record.replica, "r1");
    }

    #[test]
    fn messages_of_a_replaced_stream_are_ignored() {
        let t0 = Instant::now();
        let mut hub = warm_hub(t0);
        let old = hub.attach(&id("vm-1"), "01", ip(7), wall()).unwrap();
        let new = hub.attach(&id("vm-1"), "02", ip(7), wall()).unwrap();
        assert!(hub
            .on_message(&id("vm-1"), old, &snapshot(1, ip(7)))
            .is_none());
        assert!(hub
            .on_message(&id("vm-1"), new, &snapshot(1, ip(7)))
            .is_some());
        // The old stream ending does not start a grace period: the new one is current.
        hub.detach(&id("vm-1"), old, t0);
        assert_eq!(hub.poll(t0).next_wake, None);
        assert_eq!(hub.connected(), 1);
    }

    #[test]
    fn a_revoked_agent_is_cut_off_and_refused_and_its_record_deleted() {
        let t0 = Instant::now();
        let mut hub = warm_hub(t0);
        let stream = report(&mut hub, "vm-1", 7);
        hub.take_records(t0, wall());
        let mut deny = DenyList::new();
        deny.deny_id(id("vm-1"));
        let cut = hub.set_deny(deny, t0);
        assert_eq!(cut.len(), 1);
        assert_eq!(cut[0].0, stream);
        assert_eq!(cut[0].1.reason, "revoked");
        assert_eq!(
            hub.take_observations().last(),
            Some(&Observation::AgentRevoked { agent: id("vm-1") })
        );
        assert!(
            web(&hub.poll(t0).catalog.unwrap()).is_empty(),
            "its services go at once"
        );
        let refused = hub.attach(&id("vm-1"), "01", ip(7), wall()).unwrap_err();
        assert!(
            refused.message.contains("vmeshctl agent allow"),
            "{refused}"
        );
        let records = hub.take_records(t0, wall());
        assert!(
            records.iter().all(|(_, r)| r.is_none()) && !records.is_empty(),
            "its record is deleted"
        );
    }

    #[test]
    fn the_first_catalog_waits_for_the_registered_agents() {
        let t0 = Instant::now();
        let mut hub = HubState::new("r1", GRACE, WARMUP);
        // Until the list of registered agents is read, the whole warm-up is waited; it runs from
        // the first poll (the relay serving), not from when the hub was made.
        assert!(hub.poll(t0).catalog.is_none());
        hub.await_agents([id("vm-1"), id("vm-2")]);
        report(&mut hub, "vm-1", 1);
        let p = hub.poll(t0 + Duration::from_secs(1));
        assert!(p.catalog.is_none(), "vm-2 has not reported");
        assert_eq!(p.next_wake, Some(t0 + WARMUP));
        report(&mut hub, "vm-2", 2);
        let catalog = hub.poll(t0 + Duration::from_secs(2)).catalog.unwrap();
        assert_eq!(web(&catalog), ["vm-1@10.0.0.1", "vm-2@10.0.0.2"]);
        assert!(hub.is_warm());
        assert!(hub.take_observations().is_empty());
    }

    #[test]
    fn the_warm_up_ends_at_its_deadline_and_says_who_was_missing() {
        let t0 = Instant::now();
        let mut hub = HubState::new("r1", GRACE, WARMUP);
        hub.await_agents([id("vm-1"), id("vm-2")]);
        assert!(hub.poll(t0).catalog.is_none(), "the warm-up starts");
        report(&mut hub, "vm-1", 1);
        assert!(hub
            .poll(t0 + WARMUP - Duration::from_millis(1))
            .catalog
            .is_none());
        let catalog = hub.poll(t0 + WARMUP).catalog.unwrap();
        assert_eq!(web(&catalog), ["vm-1@10.0.0.1"]);
        assert_eq!(
            hub.take_observations(),
            [Observation::WarmupIncomplete { missing: 1 }]
        );
    }

    #[test]
    fn agents_streaming_to_another_replica_or_revoked_are_not_waited_for() {
        let t0 = Instant::now();
        let mut hub = HubState::new("r1", GRACE, WARMUP);
        hub.set_remote(vec![remote_record("vm-2", "r2", 2, None)], t0, wall());
        let mut deny = DenyList::new();
        deny.deny_id(id("vm-3"));
        hub.set_deny(deny, t0);
        hub.await_agents([id("vm-2"), id("vm-3")]);
        let catalog = hub.poll(t0).catalog.expect("nobody left to wait for");
        assert_eq!(
            web(&catalog),
            ["vm-2@10.0.0.2"],
            "the other replica's agent counts"
        );
    }

    #[test]
    fn a_disconnected_agent_is_dropped_when_its_grace_period_ends() {
        let t0 = Instant::now();
        let mut hub = warm_hub(t0);
        let s = report(&mut hub, "vm-1", 1);
        report(&mut hub, "vm-2", 2);
        hub.poll(t0);
        hub.detach(&id("vm-1"), s, t0);
        let p = hub.poll(t0 + Duration::from_secs(1));
        assert_eq!(
            web(&p.catalog.unwrap()).len(),
            2,
            "kept through the grace period"
        );
        assert_eq!(p.next_wake, Some(t0 + GRACE));
        hub.take_records(t0, wall());
        let p = hub.poll(t0 + GRACE);
        assert_eq!(web(&p.catalog.unwrap()), ["vm-2@10.0.0.2"]);
        assert_eq!(hub.take_observations(), [Observation::GraceEnded]);
        assert_eq!(hub.take_records(t0 + GRACE, wall()), [(id("vm-1"), None)]);
        assert_eq!(hub.agents().len(), 1, "forgotten");
    }

    #[test]
    fn an_agent_that_moved_to_another_replica_is_served_from_there() {
        let t0 = Instant::now();
        let mut hub = warm_hub(t0);
        let s = report(&mut hub, "vm-1", 1);
        hub.detach(&id("vm-1"), s, t0);
        // The agent reconnected to r2 with a new address: r2's open stream wins over the copy
        // kept here for the grace period.
        hub.set_remote(vec![remote_record("vm-1", "r2", 9, None)], t0, wall());
        assert_eq!(web(&hub.poll(t0).catalog.unwrap()), ["vm-1@10.0.0.9"]);
        // While it streams here, this replica's view wins.
        report(&mut hub, "vm-1", 1);
        assert_eq!(web(&hub.poll(t0).catalog.unwrap()), ["vm-1@10.0.0.1"]);
    }

    #[test]
    fn refused_instances_and_resyncs_are_observed() {
        let t0 = Instant::now();
        let mut hub = warm_hub(t0);
        let s = hub.attach(&id("vm-1"), "01", ip(1), wall()).unwrap();
        hub.on_message(&id("vm-1"), s, &snapshot(1, ip(2)));
        let delta = AgentMessage {
            message: Some(agent_message::Message::Delta(v1::DiscoveryDelta {
                seq: 9,
                base_seq: 8,
                ..Default::default()
            })),
        };
        let reply = hub.on_message(&id("vm-1"), s, &delta).unwrap();
        assert!(matches!(
            reply.message,
            Some(controller_message::Message::Resync(_))
        ));
        let seen = hub.take_observations();
        assert!(
            matches!(&seen[0], Observation::InstanceRefused { instance, reason, .. }
                if instance == "web-1" && reason.contains("not the address of node vm-1")),
            "{seen:?}"
        );
        assert_eq!(seen[1], Observation::ResyncRequested { agent: id("vm-1") });
        assert!(web(&hub.poll(t0).catalog.unwrap()).is_empty());
    }

    #[test]
    fn streams_of_a_forgotten_or_revoked_agent_are_closed() {
        let t0 = Instant::now();
        let mut hub = warm_hub(t0);
        // An old stream lingers after a newer one replaced it; the newer one ends.
        let old = report(&mut hub, "vm-1", 1);
        let new = report(&mut hub, "vm-1", 1);
        hub.detach(&id("vm-1"), new, t0);
        hub.poll(t0 + GRACE);
        assert_eq!(hub.take_forgotten_streams(), [old], "closed with its agent");
        // A revoked agent: all its streams are cut, whatever certificate opened them.
        let a = hub.attach(&id("vm-2"), "01", ip(2), wall()).unwrap();
        let b = hub.attach(&id("vm-2"), "02", ip(2), wall()).unwrap();
        let mut deny = DenyList::new();
        deny.deny_id(id("vm-2"));
        let mut cut: Vec<StreamId> = hub.set_deny(deny, t0).into_iter().map(|(s, _)| s).collect();
        cut.sort_unstable();
        cut.dedup();
        assert_eq!(cut, [a, b]);
    }

    #[test]
    fn an_agent_that_never_reported_is_forgotten_when_it_disconnects() {
        let t0 = Instant::now();
        let mut hub = warm_hub(t0);
        let s = hub.attach(&id("vm-1"), "01", ip(1), wall()).unwrap();
        hub.detach(&id("vm-1"), s, t0);
        assert!(hub.agents().is_empty());
        assert_eq!(hub.poll(t0).next_wake, None);
    }
}

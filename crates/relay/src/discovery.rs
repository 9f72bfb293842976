//! The discovery half of the `Relay.Connect` stream, as two state machines without IO:
//! [`AgentDiscovery`] on the agent and [`ControllerDiscovery`] on the controller (one per agent).
//! The async tasks around them only move messages between the machine and the gRPC stream.
//!
//! The protocol (also described on `Relay.Connect` in the .proto):
//! - every message the agent sends carries a sequence number one higher than the previous one it
//!   sent (for the lifetime of the agent process, across reconnects);
//! - on every connect the agent sends `Hello` and a full snapshot, which replaces whatever the
//!   controller held for it (the controller may have restarted, or this may be another replica);
//! - later changes are deltas against the previous message sent (`base_seq`);
//! - the controller acks each message it applied; a delta that does not follow the last applied one
//!   is not applied and answered with one `ResyncRequest`, which the agent answers with a snapshot;
//! - a message whose `seq` was already applied is acked again and changes nothing.

use std::collections::BTreeMap;

use vmesh_proto::v1::{
    agent_message, controller_message, AgentMessage, ControllerMessage, DiscoveryAck,
    DiscoveryDelta, DiscoverySnapshot, Hello, ResyncRequest, ServiceInstance,
};

/// Instances keyed by id. A map, so deltas come out in a stable order and duplicates collapse.
type Instances = BTreeMap<String, ServiceInstance>;

fn index(instances: impl IntoIterator<Item = ServiceInstance>) -> Instances {
    // A later instance with the same id replaces an earlier one.
    instances.into_iter().map(|i| (i.id.clone(), i)).collect()
}

fn agent_message(message: agent_message::Message) -> AgentMessage {
    AgentMessage {
        message: Some(message),
    }
}

fn controller_message(message: controller_message::Message) -> ControllerMessage {
    ControllerMessage {
        message: Some(message),
    }
}

/// The agent's end of discovery.
///
/// The agent feeds it the instances of its local Consul agent with [`on_local`](Self::on_local),
/// tells it when a stream starts and ends, and hands it every message from the controller; it
/// sends whatever the machine returns, in order.
#[derive(Debug, Clone)]
pub struct AgentDiscovery {
    agent_version: String,
    /// What the local Consul agent reports now.
    local: Instances,
    /// The view as of the last message sent (`last_sent_seq`): what deltas are computed against.
    sent: Instances,
    /// Sequence number of the last message sent; 0 before the first.
    last_sent_seq: u64,
    /// Highest sequence number the controller acknowledged; 0 if none.
    last_acked_seq: u64,
    /// Whether a stream is open. While none is, local changes are only recorded; the snapshot sent
    /// on the next connect carries them.
    connected: bool,
}

impl AgentDiscovery {
    /// A machine with no local instances and no stream.
    pub fn new(agent_version: impl Into<String>) -> Self {
        Self {
            agent_version: agent_version.into(),
            local: Instances::new(),
            sent: Instances::new(),
            last_sent_seq: 0,
            last_acked_seq: 0,
            connected: false,
        }
    }

    /// The local instances changed (or were re-read). Returns the delta to send, or nothing if they
    /// equal what was last sent or no stream is open.
    pub fn on_local(
        &mut self,
        instances: impl IntoIterator<Item = ServiceInstance>,
    ) -> Option<AgentMessage> {
        self.local = index(instances);
        if !self.connected {
            return None;
        }
        let removed_ids: Vec<String> = self
            .sent
            .keys()
            .filter(|id| !self.local.contains_key(*id))
            .cloned()
            .collect();
        let upserts: Vec<ServiceInstance> = self
            .local
            .iter()
            .filter(|(id, instance)| self.sent.get(*id) != Some(instance))
            .map(|(_, instance)| instance.clone())
            .collect();
        if removed_ids.is_empty() && upserts.is_empty() {
            return None;
        }
        let base_seq = self.last_sent_seq;
        let seq = self.next_seq();
        self.sent = self.local.clone();
        Some(agent_message(agent_message::Message::Delta(
            DiscoveryDelta {
                seq,
                base_seq,
                upserts,
                removed_ids,
            },
        )))
    }

    /// A stream was opened. Returns `Hello` and a full snapshot of the local instances.
    ///
    /// `config_versions` is what the agent holds per local proxy (see `Hello.config_versions`); it
    /// belongs to the config side and is passed through.
    pub fn on_connect(&mut self, config_versions: BTreeMap<String, String>) -> Vec<AgentMessage> {
        self.connected = true;
        let hello = agent_message(agent_message::Message::Hello(Hello {
            agent_version: self.agent_version.clone(),
            last_acked_discovery_seq: self.last_acked_seq,
            config_versions,
        }));
        vec![hello, self.snapshot()]
    }

    /// The stream ended. Unacked messages need no replay: the next connect sends a snapshot.
    pub fn on_disconnect(&mut self) {
        self.connected = false;
    }

    /// A message from the controller. Returns what to send in reply (a snapshot on
    /// `ResyncRequest`, otherwise nothing). `ProxyConfig` is not discovery's business and is
    /// ignored here.
    pub fn on_controller(&mut self, message: &ControllerMessage) -> Vec<AgentMessage> {
        match &message.message {
            Some(controller_message::Message::DiscoveryAck(ack)) => {
                // An ack beyond what was sent is bogus; an older one is stale. Neither moves it.
                if ack.seq <= self.last_sent_seq && ack.seq > self.last_acked_seq {
                    self.last_acked_seq = ack.seq;
                }
                Vec::new()
            }
            Some(controller_message::Message::Resync(_)) if self.connected => {
                vec![self.snapshot()]
            }
            Some(controller_message::Message::Resync(_))
            | Some(controller_message::Message::ProxyConfig(_))
            | None => Vec::new(),
        }
    }

    /// Sequence number of the last message sent; 0 before the first.
    pub fn last_sent_seq(&self) -> u64 {
        self.last_sent_seq
    }

    /// Highest sequence number the controller acknowledged; 0 if none.
    pub fn last_acked_seq(&self) -> u64 {
        self.last_acked_seq
    }

    /// Whether the controller has acknowledged everything sent.
    pub fn in_sync(&self) -> bool {
        self.last_acked_seq == self.last_sent_seq
    }

    fn snapshot(&mut self) -> AgentMessage {
        let seq = self.next_seq();
        self.sent = self.local.clone();
        agent_message(agent_message::Message::Snapshot(DiscoverySnapshot {
            seq,
            instances: self.sent.values().cloned().collect(),
        }))
    }

    fn next_seq(&mut self) -> u64 {
        self.last_sent_seq += 1;
        self.last_sent_seq
    }
}

/// What [`ControllerDiscovery`] did with one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// What to send to the agent: a `DiscoveryAck` or a `ResyncRequest`, or nothing.
    pub reply: Option<ControllerMessage>,
    /// Whether the agent's instances changed, i.e. whether endpoints must be recomputed.
    pub changed: bool,
}

impl Step {
    fn nothing() -> Self {
        Self {
            reply: None,
            changed: false,
        }
    }

    fn ack(seq: u64, changed: bool) -> Self {
        Self {
            reply: Some(controller_message(
                controller_message::Message::DiscoveryAck(DiscoveryAck { seq }),
            )),
            changed,
        }
    }
}

/// The controller's end of discovery for one agent: the agent's current instances.
///
/// It outlives streams: after a disconnect the controller keeps the instances (for the grace
/// period) and the next stream's snapshot replaces them.
#[derive(Debug, Clone, Default)]
pub struct ControllerDiscovery {
    instances: Instances,
    /// Sequence number of the last applied message; `None` until the first snapshot.
    applied_seq: Option<u64>,
    /// A `ResyncRequest` was sent and no snapshot has arrived since: later deltas are dropped
    /// without asking again.
    resync_pending: bool,
}

impl ControllerDiscovery {
    /// A machine that holds nothing for its agent yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A message from the agent. `Hello` and `ConfigAck` do not change discovery.
    pub fn on_agent(&mut self, message: &AgentMessage) -> Step {
        match &message.message {
            Some(agent_message::Message::Hello(hello)) => self.on_hello(hello),
            Some(agent_message::Message::Snapshot(snapshot)) => self.on_snapshot(snapshot),
            Some(agent_message::Message::Delta(delta)) => self.on_delta(delta),
            Some(agent_message::Message::ConfigAck(_)) | None => Step::nothing(),
        }
    }

    /// A new stream started. A resync asked for on an earlier stream is void: the agent sends a
    /// snapshot after every `Hello` anyway.
    pub fn on_hello(&mut self, _hello: &Hello) -> Step {
        self.resync_pending = false;
        Step::nothing()
    }

    /// A full snapshot: replaces every instance, whatever its `seq`. The agent sends one only on
    /// connect or when asked; after an agent restart its `seq` starts again from 1, and that
    /// snapshot must win. Re-delivery is harmless: it replaces the state with the same state.
    pub fn on_snapshot(&mut self, snapshot: &DiscoverySnapshot) -> Step {
        self.resync_pending = false;
        let instances = index(snapshot.instances.iter().cloned());
        let changed = instances != self.instances;
        self.instances = instances;
        self.applied_seq = Some(snapshot.seq);
        Step::ack(snapshot.seq, changed)
    }

    /// A delta: applied only if it follows the last applied message.
    pub fn on_delta(&mut self, delta: &DiscoveryDelta) -> Step {
        let Some(applied) = self.applied_seq else {
            return self.resync(format!(
                "delta {} (base {}) before any snapshot",
                delta.seq, delta.base_seq
            ));
        };
        if delta.base_seq != applied {
            if delta.seq <= applied {
                // Re-delivery of a message already applied (everything up to `applied` is).
                return Step::ack(applied, false);
            }
            return self.resync(format!(
                "delta {} is based on {}, but the last applied is {}",
                delta.seq, delta.base_seq, applied
            ));
        }
        if delta.seq <= delta.base_seq {
            return self.resync(format!(
                "delta {} is not after its base {}",
                delta.seq, delta.base_seq
            ));
        }
        let mut changed = false;
        for id in &delta.removed_ids {
            changed |= self.instances.remove(id).is_some();
        }
        for instance in &delta.upserts {
            let old = self.instances.insert(instance.id.clone(), instance.clone());
            changed |= old.as_ref() != Some(instance);
        }
        self.applied_seq = Some(delta.seq);
        Step::ack(delta.seq, changed)
    }

    /// The agent's instances, by id.
    pub fn instances(&self) -> impl ExactSizeIterator<Item = &ServiceInstance> {
        self.instances.values()
    }

    /// The instance with this id, if the agent reported it.
    pub fn instance(&self, id: &str) -> Option<&ServiceInstance> {
        self.instances.get(id)
    }

    /// Sequence number of the last applied message; `None` until the first snapshot.
    pub fn applied_seq(&self) -> Option<u64> {
        self.applied_seq
    }

    fn resync(&mut self, reason: String) -> Step {
        if self.resync_pending {
            return Step::nothing();
        }
        self.resync_pending = true;
        Step {
            reply: Some(controller_message(controller_message::Message::Resync(
                ResyncRequest { reason },
            ))),
            changed: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmesh_proto::v1::{ConfigAck, Health, ProxyConfig};

    fn instance(id: &str, port: u32, health: Health) -> ServiceInstance {
        ServiceInstance {
            id: id.to_string(),
            service: id.split('-').next().unwrap().to_string(),
            tags: vec!["v1".to_string()],
            meta: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            address: "10.0.0.7".to_string(),
            port,
            health: health as i32,
        }
    }

    fn web(n: u32) -> ServiceInstance {
        instance(&format!("web-{n}"), 8000 + n, Health::Passing)
    }

    fn ack(seq: u64) -> ControllerMessage {
        controller_message(controller_message::Message::DiscoveryAck(DiscoveryAck {
            seq,
        }))
    }

    fn ids(controller: &ControllerDiscovery) -> Vec<&str> {
        controller.instances().map(|i| i.id.as_str()).collect()
    }

    fn delta(message: &AgentMessage) -> &DiscoveryDelta {
        match &message.message {
            Some(agent_message::Message::Delta(d)) => d,
            other => panic!("expected a delta, got {other:?}"),
        }
    }

    fn snapshot(message: &AgentMessage) -> &DiscoverySnapshot {
        match &message.message {
            Some(agent_message::Message::Snapshot(s)) => s,
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }

    fn is_resync(reply: &Option<ControllerMessage>) -> bool {
        matches!(
            reply,
            Some(ControllerMessage {
                message: Some(controller_message::Message::Resync(_))
            })
        )
    }

    /// Delivers agent messages to the controller and the controller's replies back to the agent,
    /// until neither side has anything left to say.
    fn exchange(
        agent: &mut AgentDiscovery,
        controller: &mut ControllerDiscovery,
        messages: Vec<AgentMessage>,
    ) {
        let mut pending = messages;
        while !pending.is_empty() {
            let mut next = Vec::new();
            for message in pending {
                if let Some(reply) = controller.on_agent(&message).reply {
                    next.extend(agent.on_controller(&reply));
                }
            }
            pending = next;
        }
    }

    fn connected(instances: Vec<ServiceInstance>) -> (AgentDiscovery, ControllerDiscovery) {
        let mut agent = AgentDiscovery::new("test");
        let mut controller = ControllerDiscovery::new();
        assert_eq!(agent.on_local(instances), None, "no stream yet");
        let hello = agent.on_connect(BTreeMap::new());
        exchange(&mut agent, &mut controller, hello);
        (agent, controller)
    }

    #[test]
    fn connect_sends_hello_then_snapshot() {
        let mut agent = AgentDiscovery::new("1.2.3");
        agent.on_local(vec![web(2), web(1)]);
        let versions = BTreeMap::from([("web-sidecar".to_string(), "abc".to_string())]);
        let sent = agent.on_connect(versions.clone());
        assert_eq!(sent.len(), 2);
        let Some(agent_message::Message::Hello(hello)) = &sent[0].message else {
            panic!("expected hello, got {:?}", sent[0]);
        };
        assert_eq!(hello.agent_version, "1.2.3");
        assert_eq!(hello.last_acked_discovery_seq, 0);
        assert_eq!(hello.config_versions, versions);
        let snap = snapshot(&sent[1]);
        assert_eq!(snap.seq, 1);
        // Sorted by id, whatever order the local agent gave.
        assert_eq!(snap.instances, vec![web(1), web(2)]);
    }

    #[test]
    fn snapshot_then_deltas_are_applied_and_acked() {
        let (mut agent, mut controller) = connected(vec![web(1), web(2)]);
        assert_eq!(ids(&controller), ["web-1", "web-2"]);
        assert_eq!(controller.applied_seq(), Some(1));
        assert_eq!(agent.last_acked_seq(), 1);
        assert!(agent.in_sync());

        // Add one, remove one, flip the health of the third.
        let critical = instance("web-1", 8001, Health::Critical);
        let message = agent.on_local(vec![critical.clone(), web(3)]).unwrap();
        let d = delta(&message);
        assert_eq!((d.seq, d.base_seq), (2, 1));
        assert_eq!(d.upserts, vec![critical.clone(), web(3)]);
        assert_eq!(d.removed_ids, vec!["web-2".to_string()]);
        assert!(!agent.in_sync());

        let step = controller.on_agent(&message);
        assert_eq!(step, Step::ack(2, true));
        assert_eq!(ids(&controller), ["web-1", "web-3"]);
        assert_eq!(controller.instance("web-1"), Some(&critical));

        agent.on_controller(&step.reply.unwrap());
        assert_eq!(agent.last_acked_seq(), 2);
        assert!(agent.in_sync());
    }

    #[test]
    fn deltas_may_be_pipelined_before_their_acks() {
        let (mut agent, mut controller) = connected(vec![web(1)]);
        let first = agent.on_local(vec![web(1), web(2)]).unwrap();
        let second = agent.on_local(vec![web(2)]).unwrap();
        assert_eq!(delta(&second).base_seq, delta(&first).seq);
        let acks: Vec<_> = [first, second]
            .iter()
            .map(|m| controller.on_agent(m).reply.unwrap())
            .collect();
        assert_eq!(ids(&controller), ["web-2"]);
        for a in &acks {
            assert!(agent.on_controller(a).is_empty());
        }
        assert_eq!(agent.last_acked_seq(), 3);
    }

    #[test]
    fn stale_and_bogus_acks_are_ignored() {
        let (mut agent, _controller) = connected(vec![web(1)]);
        agent.on_local(vec![web(2)]).unwrap();
        agent.on_controller(&ack(2));
        assert_eq!(agent.last_acked_seq(), 2);
        // An older ack arriving late does not move it back.
        agent.on_controller(&ack(1));
        assert_eq!(agent.last_acked_seq(), 2);
        // An ack for something never sent is ignored.
        agent.on_controller(&ack(99));
        assert_eq!(agent.last_acked_seq(), 2);
        assert!(agent.in_sync());
    }

    #[test]
    fn unchanged_local_state_sends_nothing() {
        let (mut agent, _controller) = connected(vec![web(1), web(2)]);
        assert_eq!(agent.on_local(vec![web(1), web(2)]), None);
        // Order and duplicates do not matter.
        assert_eq!(agent.on_local(vec![web(2), web(1), web(1)]), None);
        assert_eq!(agent.last_sent_seq(), 1);
        // A real change to any field does.
        let mut tagged = web(2);
        tagged.tags.push("canary".to_string());
        let message = agent.on_local(vec![web(1), tagged.clone()]).unwrap();
        assert_eq!(delta(&message).upserts, vec![tagged]);
        assert!(delta(&message).removed_ids.is_empty());
    }

    #[test]
    fn local_changes_while_disconnected_go_in_the_next_snapshot() {
        let (mut agent, mut controller) = connected(vec![web(1)]);
        agent.on_disconnect();
        assert_eq!(agent.on_local(vec![web(2)]), None);
        assert_eq!(agent.on_local(vec![web(3)]), None);
        let sent = agent.on_connect(BTreeMap::new());
        let Some(agent_message::Message::Hello(hello)) = &sent[0].message else {
            panic!("expected hello, got {:?}", sent[0]);
        };
        assert_eq!(hello.last_acked_discovery_seq, 1);
        assert_eq!(snapshot(&sent[1]).seq, 2);
        exchange(&mut agent, &mut controller, sent);
        assert_eq!(ids(&controller), ["web-3"]);
        assert!(agent.in_sync());
        // Deltas now follow the new snapshot.
        let next = agent.on_local(vec![web(3), web(4)]).unwrap();
        assert_eq!((delta(&next).seq, delta(&next).base_seq), (3, 2));
        assert_eq!(controller.on_agent(&next), Step::ack(3, true));
    }

    #[test]
    fn reconnect_snapshot_replaces_everything() {
        let (mut agent, mut controller) = connected(vec![web(1), web(2)]);
        // A delta lost with the old stream: the controller never saw it.
        let lost = agent.on_local(vec![web(3)]).unwrap();
        assert_eq!(delta(&lost).seq, 2);
        agent.on_disconnect();
        assert_eq!(agent.last_acked_seq(), 1);

        let sent = agent.on_connect(BTreeMap::new());
        let step = controller.on_agent(&sent[1]);
        assert_eq!(step, Step::ack(3, true));
        assert_eq!(ids(&controller), ["web-3"]);
    }

    #[test]
    fn controller_restart_is_recovered_by_the_connect_snapshot() {
        let (mut agent, _old) = connected(vec![web(1)]);
        agent.on_local(vec![web(1), web(2)]).unwrap();
        agent.on_disconnect();
        let mut controller = ControllerDiscovery::new();
        let sent = agent.on_connect(BTreeMap::new());
        exchange(&mut agent, &mut controller, sent);
        assert_eq!(ids(&controller), ["web-1", "web-2"]);
        assert!(agent.in_sync());
    }

    #[test]
    fn agent_restart_snapshot_wins_even_with_a_lower_seq() {
        let (mut agent, mut controller) = connected(vec![web(1)]);
        for n in 2..5 {
            let m = agent.on_local(vec![web(n)]).unwrap();
            controller.on_agent(&m);
        }
        assert_eq!(controller.applied_seq(), Some(4));

        // The agent process restarts: sequence numbers start again.
        let mut agent = AgentDiscovery::new("test");
        agent.on_local(vec![web(9)]);
        let sent = agent.on_connect(BTreeMap::new());
        exchange(&mut agent, &mut controller, sent);
        assert_eq!(controller.applied_seq(), Some(1));
        assert_eq!(ids(&controller), ["web-9"]);
        let next = agent.on_local(vec![]).unwrap();
        assert_eq!(controller.on_agent(&next), Step::ack(2, true));
        assert_eq!(controller.instances().len(), 0);
    }

    #[test]
    fn missed_delta_asks_for_one_resync_and_the_snapshot_recovers() {
        let (mut agent, mut controller) = connected(vec![web(1)]);
        let _dropped = agent.on_local(vec![web(1), web(2)]).unwrap();
        let after = agent.on_local(vec![web(1), web(2), web(3)]).unwrap();
        let more = agent.on_local(vec![web(2), web(3)]).unwrap();

        let step = controller.on_agent(&after);
        assert!(is_resync(&step.reply), "{step:?}");
        assert!(!step.changed);
        assert_eq!(ids(&controller), ["web-1"], "nothing applied");
        // Deltas already in flight are dropped without asking again.
        assert_eq!(controller.on_agent(&more), Step::nothing());
        assert_eq!(controller.applied_seq(), Some(1));

        let replies = agent.on_controller(&step.reply.unwrap());
        assert_eq!(replies.len(), 1);
        assert_eq!(snapshot(&replies[0]).seq, 5);
        exchange(&mut agent, &mut controller, replies);
        assert_eq!(ids(&controller), ["web-2", "web-3"]);
        assert!(agent.in_sync());
    }

    #[test]
    fn delta_before_any_snapshot_asks_for_a_resync() {
        let mut controller = ControllerDiscovery::new();
        let d = AgentMessage {
            message: Some(agent_message::Message::Delta(DiscoveryDelta {
                seq: 8,
                base_seq: 7,
                upserts: vec![web(1)],
                removed_ids: vec![],
            })),
        };
        assert!(is_resync(&controller.on_agent(&d).reply));
        assert_eq!(controller.instances().len(), 0);
        assert_eq!(controller.applied_seq(), None);
    }

    #[test]
    fn malformed_delta_is_not_applied() {
        let (_agent, mut controller) = connected(vec![web(1)]);
        let d = DiscoveryDelta {
            seq: 1,
            base_seq: 1,
            upserts: vec![web(2)],
            removed_ids: vec![],
        };
        assert!(is_resync(&controller.on_delta(&d).reply));
        assert_eq!(ids(&controller), ["web-1"]);
    }

    #[test]
    fn a_new_stream_clears_a_pending_resync() {
        let (mut agent, mut controller) = connected(vec![web(1)]);
        let _dropped = agent.on_local(vec![web(2)]).unwrap();
        let after = agent.on_local(vec![web(3)]).unwrap();
        assert!(is_resync(&controller.on_agent(&after).reply));
        // The resync was lost with the stream; the next stream starts with Hello and a snapshot,
        // and a later gap must be able to ask again.
        agent.on_disconnect();
        let sent = agent.on_connect(BTreeMap::new());
        exchange(&mut agent, &mut controller, sent);
        assert_eq!(ids(&controller), ["web-3"]);
        let _dropped = agent.on_local(vec![web(4)]).unwrap();
        let after = agent.on_local(vec![web(5)]).unwrap();
        assert!(is_resync(&controller.on_agent(&after).reply));
    }

    #[test]
    fn redelivered_messages_are_acked_and_change_nothing() {
        let (mut agent, mut controller) = connected(vec![web(1)]);
        let first_snapshot = agent.on_connect(BTreeMap::new()).remove(1);
        controller.on_agent(&first_snapshot);
        let d1 = agent.on_local(vec![web(1), web(2)]).unwrap();
        let d2 = agent.on_local(vec![web(2)]).unwrap();
        assert_eq!(controller.on_agent(&d1), Step::ack(3, true));
        assert_eq!(controller.on_agent(&d2), Step::ack(4, true));

        // The same delta again: acked with what is applied, nothing changes.
        assert_eq!(controller.on_agent(&d1), Step::ack(4, false));
        assert_eq!(controller.on_agent(&d2), Step::ack(4, false));
        assert_eq!(ids(&controller), ["web-2"]);
        assert_eq!(controller.applied_seq(), Some(4));

        // The same snapshot twice in a row: the second changes nothing.
        let again = agent.on_connect(BTreeMap::new()).remove(1);
        assert_eq!(controller.on_agent(&again), Step::ack(5, false));
        assert_eq!(controller.on_agent(&again), Step::ack(5, false));
        assert_eq!(ids(&controller), ["web-2"]);
    }

    #[test]
    fn messages_of_the_config_side_are_ignored() {
        let (mut agent, mut controller) = connected(vec![web(1)]);
        let config = controller_message(controller_message::Message::ProxyConfig(ProxyConfig {
            proxy: "web-sidecar".to_string(),
            version: "v1".to_string(),
            resources: vec![],
        }));
        assert!(agent.on_controller(&config).is_empty());
        let config_ack = agent_message(agent_message::Message::ConfigAck(ConfigAck {
            proxy: "web-sidecar".to_string(),
            version: "v1".to_string(),
            error: String::new(),
        }));
        assert_eq!(controller.on_agent(&config_ack), Step::nothing());
        assert_eq!(
            controller.on_agent(&AgentMessage { message: None }),
            Step::nothing()
        );
        assert!(agent
            .on_controller(&ControllerMessage { message: None })
            .is_empty());
        assert_eq!(ids(&controller), ["web-1"]);
    }

    #[test]
    fn resync_without_a_stream_sends_nothing() {
        let (mut agent, _controller) = connected(vec![web(1)]);
        agent.on_disconnect();
        let resync = controller_message(controller_message::Message::Resync(ResyncRequest {
            reason: "late".to_string(),
        }));
        assert!(agent.on_controller(&resync).is_empty());
        assert_eq!(agent.last_sent_seq(), 1);
    }
}

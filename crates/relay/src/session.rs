//! The agent's session with the controller, without IO: which streams are open, what to send on
//! them, when to reconnect, when to renew the certificate, and what to do when it expired or the
//! agent was revoked.
//!
//! The agent's relay task feeds [`Session`] what happened (local discovery changed, a message or
//! the end of a stream, a timer, the outcome of an action) with the time, and carries out the
//! [`Action`]s it returns (open a stream and send its first messages, send, close, renew,
//! register again), reporting each outcome back. [`Note`]s say what happened, for the log. It
//! reads no clock: `now` (monotonic, for timers) and `wall` (for certificate validity) are passed
//! in.
//!
//! The rules:
//! - **Discovery** goes on the active stream ([`AgentDiscovery`]): a snapshot after every
//!   `Hello`, then deltas, acknowledged; a resync request is answered with a snapshot.
//! - **Reconnects** back off (200 ms doubling to 30 s, full jitter) and start over from the base
//!   once the controller acknowledged discovery on the new stream. A stream the controller ended
//!   because the agent is revoked is retried at the cap, so `vmeshctl agent allow` takes effect
//!   without a restart.
//! - **Renewal** at the certificate's renewal time, make-before-break: a new stream is opened with
//!   the new certificate; the old one is closed only once the controller acknowledged the new
//!   stream's snapshot. If the new stream fails first, the old stream gets a full snapshot (what
//!   the new one carried may never have arrived) and the switch is retried with backoff.
//! - **Expiry**: a certificate that expired before it could be renewed is replaced by
//!   registering again with the bootstrap token, if the agent has one; without one the agent
//!   says so once and keeps trying to connect (an operator may restart it with a token).
//! - **Proxy config** coming down the stream is answered by [`ProxyConfigs`]; until the agent
//!   serves local xDS it refuses every config (the sidecar work fills this in).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use vmesh_proto::v1::{
    agent_message, controller_message, AgentMessage, ConfigAck, ControllerMessage, ProxyConfig,
    ResyncRequest, ServiceInstance,
};
use vmesh_retry::Backoff;

use crate::discovery::AgentDiscovery;

/// One stream, numbered by the session.
pub type StreamId = u64;

/// First delay of the reconnect and renewal backoff.
pub const RETRY_BASE: Duration = Duration::from_millis(200);
/// Longest delay of the reconnect and renewal backoff.
pub const RETRY_CAP: Duration = Duration::from_secs(30);
/// What the agent answers to `ProxyConfig` until it serves local xDS.
pub const NO_SIDECARS: &str = "sidecar proxies are not supported by this agent yet";

/// The agent's certificate, as far as the session's rules need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    /// Tells certificates apart (the SHA-256 of the chain).
    pub id: String,
    /// When to renew it (half-life).
    pub renew_at: SystemTime,
    pub not_after: SystemTime,
}

impl Credential {
    pub fn is_expired(&self, wall: SystemTime) -> bool {
        wall >= self.not_after
    }
}

/// How a stream ended or failed to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    /// The controller refused the agent (gRPC `PERMISSION_DENIED`): revoked.
    pub revoked: bool,
    /// Why, for the log.
    pub reason: String,
}

impl Ended {
    pub fn closed() -> Self {
        Ended {
            revoked: false,
            reason: "stream closed".into(),
        }
    }

    pub fn failed(reason: impl Into<String>) -> Self {
        Ended {
            revoked: false,
            reason: reason.into(),
        }
    }

    pub fn revoked(reason: impl Into<String>) -> Self {
        Ended {
            revoked: true,
            reason: reason.into(),
        }
    }
}

/// What the relay task must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Open stream `id` with the current certificate and send `messages` first (`Hello` and a
    /// snapshot); report with [`Session::on_opened`].
    Open {
        id: StreamId,
        messages: Vec<AgentMessage>,
    },
    /// Queue messages on stream `id`; if they cannot be queued (gone, or stuck), report
    /// [`Session::on_ended`].
    Send {
        id: StreamId,
        messages: Vec<AgentMessage>,
    },
    /// Close stream `id` (replaced by a renewed one).
    Close { id: StreamId },
    /// Renew the certificate; report with [`Session::on_renewed`].
    Renew,
    /// Register again with the bootstrap token (the certificate expired); report with
    /// [`Session::on_registered`].
    Register,
}

/// What happened, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    Connected,
    /// Could not open a stream; retrying in `retry_in`.
    ConnectFailed {
        reason: String,
        retry_in: Duration,
    },
    /// The current stream ended; reconnecting in `retry_in`.
    Disconnected {
        reason: String,
        retry_in: Duration,
    },
    /// The controller refused the agent as revoked; retrying in `retry_in`.
    Revoked {
        reason: String,
        retry_in: Duration,
    },
    /// The controller asked for a full snapshot.
    ResyncRequested {
        reason: String,
    },
    Renewed,
    RenewFailed {
        reason: String,
        retry_in: Duration,
    },
    /// A stream with the renewed certificate is open.
    SwitchOpened,
    /// The renewed stream was acknowledged: the old one is closed.
    Switched,
    /// The renewed stream failed before it was acknowledged; retrying later.
    SwitchFailed {
        reason: String,
    },
    /// The old stream ended while the renewed one was being set up: carrying on with that one.
    OldStreamEnded {
        reason: String,
    },
    /// The certificate expired and there is no bootstrap token to register again (said once).
    ExpiredWithoutToken,
    /// The certificate expired: registering again with the bootstrap token.
    Reregistering,
}

/// The config side of the stream: what the agent holds per local proxy, and its answer to
/// `ProxyConfig`. Until the agent serves local xDS it holds nothing and refuses every config.
#[derive(Clone, Debug, Default)]
pub struct ProxyConfigs {
    versions: BTreeMap<String, String>,
}

impl ProxyConfigs {
    /// What the agent holds per proxy, for `Hello.config_versions`.
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.versions.clone()
    }

    /// The answer to one `ProxyConfig`.
    pub fn on_config(&mut self, config: &ProxyConfig) -> ConfigAck {
        ConfigAck {
            proxy: config.proxy.clone(),
            version: config.version.clone(),
            error: NO_SIDECARS.to_string(),
        }
    }
}

/// The agent's session: its streams, timers and certificate.
#[derive(Debug)]
pub struct Session {
    discovery: AgentDiscovery,
    configs: ProxyConfigs,
    credential: Credential,
    has_token: bool,
    /// The stream discovery goes on, and the certificate it was opened with.
    current: Option<(StreamId, String)>,
    /// A stream opened with a renewed certificate, the seq of its snapshot and the certificate:
    /// it replaces `current` once the controller acknowledged that snapshot.
    pending: Option<(StreamId, u64, String)>,
    /// A stream being opened, whether it is the renewed one, and the certificate it is opened
    /// with.
    opening: Option<(StreamId, bool, String)>,
    next_stream: StreamId,
    connect_backoff: Backoff,
    renew_backoff: Backoff,
    next_connect: Instant,
    next_renew: Instant,
    expired_said: bool,
    notes: Vec<Note>,
}

/// `t` on the wall clock as an instant, given that `now` is `wall`.
fn deadline_for(t: SystemTime, now: Instant, wall: SystemTime) -> Instant {
    match t.duration_since(wall) {
        Ok(d) => now + d.min(Duration::from_secs(365 * 24 * 3600)),
        Err(_) => now,
    }
}

fn resync(reason: &str) -> ControllerMessage {
    ControllerMessage {
        message: Some(controller_message::Message::Resync(ResyncRequest {
            reason: reason.to_string(),
        })),
    }
}

impl Session {
    /// A session with a valid `credential`, the discovery last recorded (reported on the first
    /// stream until the local Consul agent answers), and whether a bootstrap token is at hand.
    /// `seed` spreads the backoff of many agents apart.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        agent_version: &str,
        credential: Credential,
        has_token: bool,
        last_discovery: Option<Vec<ServiceInstance>>,
        now: Instant,
        wall: SystemTime,
        seed: u64,
    ) -> Self {
        let mut discovery = AgentDiscovery::new(agent_version);
        if let Some(instances) = last_discovery {
            discovery.on_local(instances);
        }
        let next_renew = deadline_for(credential.renew_at, now, wall);
        Session {
            discovery,
            configs: ProxyConfigs::default(),
            credential,
            has_token,
            current: None,
            pending: None,
            opening: None,
            next_stream: 0,
            connect_backoff: Backoff::with_seed(RETRY_BASE, RETRY_CAP, seed),
            renew_backoff: Backoff::with_seed(RETRY_BASE, RETRY_CAP, seed.rotate_left(17)),
            next_connect: now,
            next_renew,
            expired_said: false,
            notes: Vec::new(),
        }
    }

    /// What happened since the last call, for the log.
    pub fn take_notes(&mut self) -> Vec<Note> {
        std::mem::take(&mut self.notes)
    }

    /// The stream discovery goes on now.
    pub fn current(&self) -> Option<StreamId> {
        self.current.as_ref().map(|(id, _)| *id)
    }

    /// The renewed stream waiting to be acknowledged.
    pub fn pending(&self) -> Option<StreamId> {
        self.pending.as_ref().map(|(id, _, _)| *id)
    }

    /// When [`Session::on_tick`] has something to do.
    pub fn next_deadline(&self) -> Instant {
        if self.current.is_none() && self.opening.is_none() {
            self.next_renew.min(self.next_connect)
        } else {
            self.next_renew
        }
    }

    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// Whether the controller acknowledged everything sent.
    pub fn in_sync(&self) -> bool {
        self.discovery.in_sync()
    }

    /// The local Consul agent's instances (re-)read.
    pub fn on_local(&mut self, instances: Vec<ServiceInstance>) -> Vec<Action> {
        let Some(message) = self.discovery.on_local(instances) else {
            return Vec::new();
        };
        match self.pending().or(self.current()) {
            Some(id) => vec![Action::Send {
                id,
                messages: vec![message],
            }],
            None => Vec::new(),
        }
    }

    /// Time passed: connect, renew or register when due.
    pub fn on_tick(&mut self, now: Instant, wall: SystemTime) -> Vec<Action> {
        let mut actions = Vec::new();
        if now >= self.next_renew {
            actions.extend(self.renew_due(now, wall));
        }
        if self.current.is_none()
            && self.opening.is_none()
            && now >= self.next_connect
            && !actions.contains(&Action::Register)
        {
            actions.extend(self.connect(now, wall));
        }
        actions
    }

    fn connect(&mut self, now: Instant, wall: SystemTime) -> Vec<Action> {
        if self.credential.is_expired(wall) {
            return match self.reregister() {
                Some(action) => vec![action],
                None => {
                    self.next_connect = now + self.connect_backoff.cap();
                    Vec::new()
                }
            };
        }
        vec![self.open(false)]
    }

    fn open(&mut self, renewed: bool) -> Action {
        self.next_stream += 1;
        let id = self.next_stream;
        self.opening = Some((id, renewed, self.credential.id.clone()));
        let messages = self.discovery.on_connect(self.configs.versions());
        Action::Open { id, messages }
    }

    /// The outcome of [`Action::Open`].
    pub fn on_opened(
        &mut self,
        id: StreamId,
        result: Result<(), Ended>,
        now: Instant,
    ) -> Vec<Action> {
        let Some((opening, renewed, credential)) = self.opening.take().filter(|(o, _, _)| *o == id)
        else {
            return Vec::new();
        };
        match (result, renewed) {
            (Ok(()), false) => {
                self.current = Some((opening, credential));
                self.notes.push(Note::Connected);
                Vec::new()
            }
            (Ok(()), true) => {
                self.pending = Some((opening, self.discovery.last_sent_seq(), credential));
                self.notes.push(Note::SwitchOpened);
                Vec::new()
            }
            (Err(ended), false) => {
                self.lost(ended, now, |reason, retry_in| Note::ConnectFailed {
                    reason,
                    retry_in,
                });
                Vec::new()
            }
            (Err(ended), true) => {
                self.notes.push(Note::SwitchFailed {
                    reason: ended.reason,
                });
                self.after_failed_switch(now)
            }
        }
    }

    fn retry_delay(&mut self, ended: &Ended) -> Duration {
        if ended.revoked {
            self.connect_backoff.cap()
        } else {
            self.connect_backoff.next_delay()
        }
    }

    /// A message from the controller on stream `id`.
    pub fn on_message(&mut self, id: StreamId, message: &ControllerMessage) -> Vec<Action> {
        let from_current = self.current() == Some(id);
        let from_pending = self.pending() == Some(id);
        if !from_current && !from_pending {
            return Vec::new();
        }
        let mut replies = Vec::new();
        match &message.message {
            Some(controller_message::Message::ProxyConfig(config)) => {
                replies.push(AgentMessage {
                    message: Some(agent_message::Message::ConfigAck(
                        self.configs.on_config(config),
                    )),
                });
            }
            Some(controller_message::Message::Resync(r)) => {
                self.notes.push(Note::ResyncRequested {
                    reason: r.reason.clone(),
                });
            }
            // The stream works end to end.
            Some(controller_message::Message::DiscoveryAck(_)) => self.connect_backoff.reset(),
            None => {}
        }
        replies.extend(self.discovery.on_controller(message));
        let mut actions = Vec::new();
        if !replies.is_empty() {
            actions.push(Action::Send {
                id,
                messages: replies,
            });
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|(_, seq, _)| self.discovery.last_acked_seq() >= *seq)
        {
            if let Some((pending, _, credential)) = self.pending.take() {
                let outdated = credential != self.credential.id;
                if let Some((old, _)) = self.current.replace((pending, credential)) {
                    actions.push(Action::Close { id: old });
                }
                self.notes.push(Note::Switched);
                // Renewed again while this switch was under way: switch once more.
                if outdated && self.opening.is_none() {
                    actions.push(self.open(true));
                }
            }
        }
        actions
    }

    /// Stream `id` ended (or could not take a message).
    pub fn on_ended(&mut self, id: StreamId, ended: Ended, now: Instant) -> Vec<Action> {
        if self.pending() == Some(id) {
            self.pending = None;
            self.notes.push(Note::SwitchFailed {
                reason: ended.reason,
            });
            return self.after_failed_switch(now);
        }
        if self.current() != Some(id) {
            return Vec::new();
        }
        self.current = None;
        if let Some((pending, _, credential)) = self.pending.take() {
            self.notes.push(Note::OldStreamEnded {
                reason: ended.reason,
            });
            self.current = Some((pending, credential));
            return Vec::new();
        }
        self.lost(ended, now, |reason, retry_in| Note::Disconnected {
            reason,
            retry_in,
        });
        Vec::new()
    }

    /// No stream any more (one ended, or none could be opened): reconnect after a backoff (at
    /// its cap when revoked), saying why with `note` (or as revoked).
    fn lost(&mut self, ended: Ended, now: Instant, note: impl FnOnce(String, Duration) -> Note) {
        self.discovery.on_disconnect();
        let retry_in = self.retry_delay(&ended);
        self.notes.push(if ended.revoked {
            Note::Revoked {
                reason: ended.reason,
                retry_in,
            }
        } else {
            note(ended.reason, retry_in)
        });
        self.next_connect = now + retry_in;
    }

    /// A renewed stream failed after it sent its snapshot: what it carried may never have reached
    /// the controller, so the current stream gets a full snapshot, and the switch is retried.
    fn after_failed_switch(&mut self, now: Instant) -> Vec<Action> {
        let snapshot = self
            .discovery
            .on_controller(&resync("the renewed stream failed"));
        self.next_renew = now + self.renew_backoff.next_delay();
        match self.current() {
            Some(id) => vec![Action::Send {
                id,
                messages: snapshot,
            }],
            None => {
                self.discovery.on_disconnect();
                Vec::new()
            }
        }
    }

    fn renew_due(&mut self, now: Instant, wall: SystemTime) -> Vec<Action> {
        if wall < self.credential.renew_at {
            // Not due: a failed switch to the renewed certificate is being retried.
            let stale = self
                .current
                .as_ref()
                .is_some_and(|(_, credential)| *credential != self.credential.id);
            if stale && self.pending.is_none() && self.opening.is_none() {
                // Until it succeeds, retried with backoff (after_failed_switch).
                self.next_renew = deadline_for(self.credential.renew_at, now, wall);
                return vec![self.open(true)];
            }
            self.next_renew = deadline_for(self.credential.renew_at, now, wall);
            return Vec::new();
        }
        if self.credential.is_expired(wall) {
            if self.current.is_some() || self.pending.is_some() {
                // The controller closes such a stream; the reconnect registers again.
                self.next_renew = now + self.renew_backoff.next_delay();
                return Vec::new();
            }
            return match self.reregister() {
                Some(action) => vec![action],
                None => {
                    self.next_renew = now + self.renew_backoff.cap();
                    Vec::new()
                }
            };
        }
        // Until the outcome is reported.
        self.next_renew = now + RETRY_CAP;
        vec![Action::Renew]
    }

    fn reregister(&mut self) -> Option<Action> {
        if !self.has_token {
            if !self.expired_said {
                self.notes.push(Note::ExpiredWithoutToken);
                self.expired_said = true;
            }
            return None;
        }
        self.notes.push(Note::Reregistering);
        Some(Action::Register)
    }

    /// The outcome of [`Action::Renew`]: the new certificate (already stored), or why not.
    pub fn on_renewed(
        &mut self,
        result: Result<Credential, String>,
        now: Instant,
        wall: SystemTime,
    ) -> Vec<Action> {
        match result {
            Ok(credential) => {
                self.notes.push(Note::Renewed);
                self.credential = credential;
                self.renew_backoff.reset();
                self.next_renew = deadline_for(self.credential.renew_at, now, wall);
                if self.current.is_some() && self.pending.is_none() && self.opening.is_none() {
                    return vec![self.open(true)];
                }
                Vec::new()
            }
            Err(reason) => {
                let retry_in = self.renew_backoff.next_delay();
                self.notes.push(Note::RenewFailed { reason, retry_in });
                self.next_renew = now + retry_in;
                Vec::new()
            }
        }
    }

    /// The outcome of [`Action::Register`]: a new certificate (already stored). (A refusal ends
    /// the agent: retrying cannot help.)
    pub fn on_registered(
        &mut self,
        credential: Credential,
        now: Instant,
        wall: SystemTime,
    ) -> Vec<Action> {
        self.credential = credential;
        self.expired_said = false;
        self.next_renew = deadline_for(self.credential.renew_at, now, wall);
        if self.current.is_none() && self.opening.is_none() {
            return vec![self.open(false)];
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmesh_proto::v1::{DiscoveryAck, Health};

    const SECOND: Duration = Duration::from_secs(1);

    fn wall0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
    }

    /// A certificate issued at `wall0() + issued` s, valid for 100 s, renewed at half-life.
    fn cert(name: &str, issued: u64) -> Credential {
        let at = wall0() + Duration::from_secs(issued);
        Credential {
            id: name.into(),
            renew_at: at + 50 * SECOND,
            not_after: at + 100 * SECOND,
        }
    }

    fn instance(id: &str) -> ServiceInstance {
        ServiceInstance {
            id: id.into(),
            service: "web".into(),
            address: "10.0.0.7".into(),
            port: 80,
            health: Health::Passing as i32,
            ..Default::default()
        }
    }

    fn ack(seq: u64) -> ControllerMessage {
        ControllerMessage {
            message: Some(controller_message::Message::DiscoveryAck(DiscoveryAck {
                seq,
            })),
        }
    }

    fn kinds(messages: &[AgentMessage]) -> Vec<&'static str> {
        messages
            .iter()
            .map(|m| match m.message {
                Some(agent_message::Message::Hello(_)) => "hello",
                Some(agent_message::Message::Snapshot(_)) => "snapshot",
                Some(agent_message::Message::Delta(_)) => "delta",
                Some(agent_message::Message::ConfigAck(_)) => "config_ack",
                None => "none",
            })
            .collect()
    }

    /// A session at `t0`, connected on stream 1 with the controller's ack of its snapshot.
    fn connected(t0: Instant) -> Session {
        connected_with(t0, cert("c1", 0))
    }

    fn connected_with(t0: Instant, credential: Credential) -> Session {
        let mut s = Session::new(
            "test",
            credential,
            true,
            Some(vec![instance("a")]),
            t0,
            wall0(),
            7,
        );
        let actions = s.on_tick(t0, wall0());
        let [Action::Open { id: 1, messages }] = actions.as_slice() else {
            panic!("{actions:?}");
        };
        assert_eq!(kinds(messages), ["hello", "snapshot"]);
        assert!(s.on_opened(1, Ok(()), t0).is_empty());
        assert!(s.on_message(1, &ack(1)).is_empty());
        assert_eq!(s.take_notes(), [Note::Connected]);
        s
    }

    #[test]
    fn the_first_tick_connects_and_local_changes_go_as_deltas() {
        let t0 = Instant::now();
        let mut s = connected(t0);
        let actions = s.on_local(vec![instance("a"), instance("b")]);
        let [Action::Send { id: 1, messages }] = actions.as_slice() else {
            panic!("{actions:?}");
        };
        assert_eq!(kinds(messages), ["delta"]);
        assert!(
            s.on_local(vec![instance("a"), instance("b")]).is_empty(),
            "no change"
        );
        assert_eq!(
            s.next_deadline(),
            t0 + 50 * SECOND,
            "only the renewal is due"
        );
    }

    #[test]
    fn a_lost_stream_reconnects_with_backoff_and_an_ack_resets_it() {
        let t0 = Instant::now();
        let mut s = connected(t0);
        let mut delays = Vec::new();
        let mut now = t0;
        for _ in 0..4 {
            let current = s.current().unwrap_or(0);
            s.on_ended(current, Ended::failed("connection reset"), now);
            let notes = s.take_notes();
            let Some(Note::Disconnected { retry_in, .. } | Note::ConnectFailed { retry_in, .. }) =
                notes.last()
            else {
                panic!("{notes:?}");
            };
            delays.push(*retry_in);
            assert_eq!(s.next_deadline(), now + *retry_in);
            assert!(
                s.on_tick(now, wall0()).is_empty() || retry_in.is_zero(),
                "not yet"
            );
            now += *retry_in;
            let actions = s.on_tick(now, wall0());
            let [Action::Open { id, messages }] = actions.as_slice() else {
                panic!("{actions:?}");
            };
            assert_eq!(
                kinds(messages),
                ["hello", "snapshot"],
                "every connect starts afresh"
            );
            // This time it fails to open; then it opens.
            let id = *id;
            s.on_opened(id, Err(Ended::failed("refused")), now);
            let notes = s.take_notes();
            let Some(Note::ConnectFailed { retry_in, .. }) = notes.last() else {
                panic!("{notes:?}");
            };
            delays.push(*retry_in);
            now += *retry_in;
            let actions = s.on_tick(now, wall0());
            let [Action::Open { id, .. }] = actions.as_slice() else {
                panic!("{actions:?}");
            };
            s.on_opened(*id, Ok(()), now);
        }
        let ceilings = [200, 400, 800, 1600, 3200, 6400, 12800, 25600];
        for (d, c) in delays.iter().zip(ceilings) {
            assert!(*d <= Duration::from_millis(c), "{delays:?}");
        }
        // The controller acknowledges discovery on the new stream: the next loss starts over.
        let current = s.current().unwrap();
        let seq = 2 + 2 * 4; // one snapshot per open attempt that sent one
        s.on_message(current, &ack(seq));
        s.on_ended(current, Ended::closed(), now);
        let notes = s.take_notes();
        let Some(Note::Disconnected { retry_in, .. }) = notes.last() else {
            panic!("{notes:?}");
        };
        assert!(*retry_in <= RETRY_BASE, "{retry_in:?}");
    }

    #[test]
    fn a_revoked_agent_retries_at_the_cap() {
        let t0 = Instant::now();
        let long = Credential {
            renew_at: wall0() + 500 * SECOND,
            not_after: wall0() + 1000 * SECOND,
            ..cert("c1", 0)
        };
        let mut s = connected_with(t0, long);
        s.on_ended(1, Ended::revoked("agent has been revoked"), t0);
        assert_eq!(
            s.take_notes(),
            [Note::Revoked {
                reason: "agent has been revoked".into(),
                retry_in: RETRY_CAP
            }]
        );
        assert_eq!(s.next_deadline(), t0 + RETRY_CAP);
        let actions = s.on_tick(t0 + RETRY_CAP, wall0());
        assert!(matches!(actions.as_slice(), [Action::Open { .. }]));
        // Refused again at connect: again the cap.
        s.on_opened(2, Err(Ended::revoked("revoked")), t0 + RETRY_CAP);
        assert_eq!(s.next_deadline(), t0 + 2 * RETRY_CAP);
    }

    #[test]
    fn renewal_switches_streams_only_once_the_new_one_is_acknowledged() {
        let t0 = Instant::now();
        let mut s = connected(t0);
        assert_eq!(s.on_tick(t0 + 49 * SECOND, wall0() + 49 * SECOND), []);
        let (t, w) = (t0 + 50 * SECOND, wall0() + 50 * SECOND);
        assert_eq!(s.on_tick(t, w), [Action::Renew]);
        let actions = s.on_renewed(Ok(cert("c2", 50)), t, w);
        let [Action::Open { id: 2, messages }] = actions.as_slice() else {
            panic!("{actions:?}");
        };
        assert_eq!(kinds(messages), ["hello", "snapshot"]);
        assert!(s.on_opened(2, Ok(()), t).is_empty());
        assert_eq!(
            s.current(),
            Some(1),
            "the old stream carries on until the new is acked"
        );
        assert_eq!(s.pending(), Some(2));
        // Meanwhile local changes go on the new stream.
        let actions = s.on_local(vec![instance("b")]);
        assert!(
            matches!(actions.as_slice(), [Action::Send { id: 2, .. }]),
            "{actions:?}"
        );
        // The controller acknowledges the new stream's snapshot (seq 2): the old one closes.
        assert_eq!(s.on_message(2, &ack(2)), [Action::Close { id: 1 }]);
        assert_eq!(s.current(), Some(2));
        assert_eq!(s.pending(), None);
        assert_eq!(s.credential().id, "c2");
        assert_eq!(
            s.take_notes(),
            [Note::Renewed, Note::SwitchOpened, Note::Switched]
        );
        assert_eq!(s.next_deadline(), t0 + 100 * SECOND, "the next renewal");
    }

    #[test]
    fn a_renewed_stream_that_fails_resends_a_snapshot_on_the_old_and_retries() {
        let t0 = Instant::now();
        let mut s = connected(t0);
        let (t, w) = (t0 + 50 * SECOND, wall0() + 50 * SECOND);
        s.on_tick(t, w);
        s.on_renewed(Ok(cert("c2", 50)), t, w);
        s.on_opened(2, Ok(()), t);
        s.take_notes();
        let actions = s.on_ended(2, Ended::failed("reset"), t);
        let [Action::Send { id: 1, messages }] = actions.as_slice() else {
            panic!("{actions:?}");
        };
        assert_eq!(
            kinds(messages),
            ["snapshot"],
            "the old stream gets everything again"
        );
        let retry = s.next_deadline();
        assert!(retry > t && retry <= t + RETRY_BASE, "{:?}", retry - t);
        // The retry opens a stream with the renewed certificate (no new renewal needed).
        let actions = s.on_tick(retry, w);
        assert!(
            matches!(actions.as_slice(), [Action::Open { id: 3, .. }]),
            "{actions:?}"
        );
        s.on_opened(3, Ok(()), retry);
        assert_eq!(s.on_message(3, &ack(4)), [Action::Close { id: 1 }]);
    }

    #[test]
    fn a_renewal_during_a_switch_switches_again_to_the_newest_certificate() {
        let t0 = Instant::now();
        let mut s = connected(t0);
        let (t, w) = (t0 + 50 * SECOND, wall0() + 50 * SECOND);
        s.on_tick(t, w);
        s.on_renewed(Ok(cert("c2", 50)), t, w);
        s.on_opened(2, Ok(()), t);
        // A second renewal completes before the controller acknowledged stream 2 (c2).
        assert_eq!(
            s.on_renewed(Ok(cert("c3", 60)), t, w),
            [],
            "one switch at a time"
        );
        // Stream 2 is acknowledged: it takes over, and a stream with c3 opens at once.
        let actions = s.on_message(2, &ack(2));
        assert!(
            matches!(
                actions.as_slice(),
                [Action::Close { id: 1 }, Action::Open { id: 3, .. }]
            ),
            "{actions:?}"
        );
        s.on_opened(3, Ok(()), t);
        assert_eq!(s.on_message(3, &ack(3)), [Action::Close { id: 2 }]);
        assert_eq!(s.current(), Some(3));
    }

    #[test]
    fn the_old_stream_ending_during_a_switch_hands_over_to_the_new_one() {
        let t0 = Instant::now();
        let mut s = connected(t0);
        let (t, w) = (t0 + 50 * SECOND, wall0() + 50 * SECOND);
        s.on_tick(t, w);
        s.on_renewed(Ok(cert("c2", 50)), t, w);
        s.on_opened(2, Ok(()), t);
        assert!(s.on_ended(1, Ended::closed(), t).is_empty());
        assert_eq!(s.current(), Some(2));
        assert_eq!(s.pending(), None);
    }

    #[test]
    fn a_failed_renewal_is_retried_with_backoff() {
        let t0 = Instant::now();
        let mut s = connected(t0);
        let (t, w) = (t0 + 50 * SECOND, wall0() + 50 * SECOND);
        s.on_tick(t, w);
        s.on_renewed(Err("unavailable".into()), t, w);
        let notes = s.take_notes();
        let [Note::RenewFailed { retry_in, .. }] = notes.as_slice() else {
            panic!("{notes:?}");
        };
        assert_eq!(s.next_deadline(), t + *retry_in);
        assert_eq!(s.on_tick(t + *retry_in, w), [Action::Renew]);
    }

    #[test]
    fn an_expired_certificate_registers_again_with_the_token() {
        let t0 = Instant::now();
        let wall = wall0() + 200 * SECOND;
        let mut s = Session::new("test", cert("c1", 0), true, None, t0, wall, 1);
        assert_eq!(s.on_tick(t0, wall), [Action::Register]);
        assert_eq!(s.take_notes(), [Note::Reregistering]);
        let actions = s.on_registered(cert("c2", 200), t0, wall);
        assert!(
            matches!(actions.as_slice(), [Action::Open { id: 1, .. }]),
            "{actions:?}"
        );
        s.on_opened(1, Ok(()), t0);
        assert_eq!(s.current(), Some(1));
        assert_eq!(s.next_deadline(), t0 + 50 * SECOND);
    }

    #[test]
    fn an_expired_certificate_without_a_token_is_said_once_and_retried() {
        let t0 = Instant::now();
        let wall = wall0() + 200 * SECOND;
        let mut s = Session::new("test", cert("c1", 0), false, None, t0, wall, 1);
        assert_eq!(s.on_tick(t0, wall), []);
        assert_eq!(s.take_notes(), [Note::ExpiredWithoutToken]);
        let later = t0 + RETRY_CAP;
        assert_eq!(s.next_deadline(), later);
        assert_eq!(s.on_tick(later, wall), []);
        assert!(s.take_notes().is_empty(), "said once");
    }

    #[test]
    fn an_expired_certificate_on_an_open_stream_waits_for_the_controller_to_close_it() {
        let t0 = Instant::now();
        let mut s = connected(t0);
        let (t, w) = (t0 + 100 * SECOND, wall0() + 100 * SECOND);
        assert_eq!(s.on_tick(t, w), []);
        s.on_ended(1, Ended::failed("certificate expired"), t);
        let retry = s.next_deadline();
        assert_eq!(s.on_tick(retry, w + SECOND), [Action::Register]);
    }

    #[test]
    fn proxy_config_is_refused_until_sidecars_exist_and_resyncs_are_answered() {
        let t0 = Instant::now();
        let mut s = connected(t0);
        let config = ControllerMessage {
            message: Some(controller_message::Message::ProxyConfig(ProxyConfig {
                proxy: "web-sidecar".into(),
                version: "v1".into(),
                resources: vec![],
            })),
        };
        let actions = s.on_message(1, &config);
        let [Action::Send { id: 1, messages }] = actions.as_slice() else {
            panic!("{actions:?}");
        };
        let Some(agent_message::Message::ConfigAck(a)) = &messages[0].message else {
            panic!("{messages:?}");
        };
        assert_eq!(
            (a.proxy.as_str(), a.error.as_str()),
            ("web-sidecar", NO_SIDECARS)
        );
        let actions = s.on_message(1, &resync("gap"));
        let [Action::Send { messages, .. }] = actions.as_slice() else {
            panic!("{actions:?}");
        };
        assert_eq!(kinds(messages), ["snapshot"]);
        assert_eq!(
            s.take_notes(),
            [Note::ResyncRequested {
                reason: "gap".into()
            }]
        );
        // Messages on a stream that is no longer the session's are ignored.
        assert!(s.on_message(9, &resync("late")).is_empty());
    }
}

//! Discovery shared between controller replicas: the records and the rules for reading them.
//!
//! An agent streams to one replica, but every replica serves proxies, so each replica writes
//! what its agents report to `<prefix>/discovery/<dc>/<node>/<replica>` (a [`DiscoveryRecord`]:
//! the instances it accepted, whether the stream is still open) and reads every other replica's
//! records. The controller's tasks move the records in and out of Consul KV; the rules are here.
//!
//! - A record is written under the replica's session: if the replica dies, Consul deletes its
//!   records when the session expires. A reader that sees a record vanish keeps its instances for
//!   the grace period from that moment, as it would for a disconnected agent, so a replica crash
//!   is an agent disconnect for everyone else, never an empty service.
//! - A replica deletes its record when the agent's grace period ends or the agent is revoked.
//! - When several replicas have a record for one agent (it moved), an open stream wins over a
//!   closed one, and the newest stream over older ones.
//!
//! [`RemoteView`] is the pure part: other replicas' records and what they count for now.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use vmesh_layout::Layout;
use vmesh_model::{Catalog, ServiceInstance};
use vmesh_tls::{DenyList, SpiffeId};

/// `<prefix>/discovery/<dc>/<node>/<replica>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoveryRecord {
    pub spiffe_id: SpiffeId,
    /// The replica that holds (or held) the agent's stream.
    pub replica: String,
    /// When that stream opened (whole seconds since the Unix epoch).
    pub connected_unix: u64,
    /// When it closed; `None` while it is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnected_unix: Option<u64>,
    /// The instances the replica accepted from the agent, by service.
    pub instances: Vec<SharedInstance>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedInstance {
    pub service: String,
    #[serde(flatten)]
    pub instance: ServiceInstance,
}

/// The KV key of the record that `replica` writes for agent `id`.
pub fn record_key(layout: &Layout, id: &SpiffeId, replica: &str) -> String {
    layout.discovery_key(id.dc(), id.agent_node().unwrap_or_default(), replica)
}

#[derive(Clone, Debug)]
struct Seen {
    record: DiscoveryRecord,
    /// When its stream closed, on this machine's monotonic clock (converted once, when read).
    closed: Option<Instant>,
    /// When this replica noticed the record was deleted.
    vanished: Option<Instant>,
}

/// Other replicas' records, and which of their instances still count.
#[derive(Debug)]
pub struct RemoteView {
    replica: String,
    grace: Duration,
    /// By (agent, writing replica).
    records: BTreeMap<(SpiffeId, String), Seen>,
}

impl RemoteView {
    pub fn new(replica: &str, grace: Duration) -> Self {
        RemoteView {
            replica: replica.to_owned(),
            grace,
            records: BTreeMap::new(),
        }
    }

    /// Every record now in KV (this replica's own are ignored). Records that disappeared start
    /// their grace period at `now`. Returns whether anything changed.
    pub fn set(&mut self, records: Vec<DiscoveryRecord>, now: Instant, wall: SystemTime) -> bool {
        let mut changed = false;
        let mut present = BTreeSet::new();
        for record in records {
            if record.replica == self.replica {
                continue;
            }
            let key = (record.spiffe_id.clone(), record.replica.clone());
            present.insert(key.clone());
            match self.records.get_mut(&key) {
                Some(seen) if seen.record == record && seen.vanished.is_none() => {}
                Some(seen) => {
                    if seen.record.disconnected_unix != record.disconnected_unix {
                        seen.closed = closed_at(&record, self.grace, now, wall);
                    }
                    seen.record = record;
                    seen.vanished = None;
                    changed = true;
                }
                None => {
                    let closed = closed_at(&record, self.grace, now, wall);
                    self.records.insert(
                        key,
                        Seen {
                            record,
                            closed,
                            vanished: None,
                        },
                    );
                    changed = true;
                }
            }
        }
        for (key, seen) in &mut self.records {
            if !present.contains(key) && seen.vanished.is_none() {
                seen.vanished = Some(now);
                changed = true;
            }
        }
        changed
    }

    /// Forgets records whose grace period ended, and every record of a revoked agent. Returns
    /// whether any went.
    pub fn expire(&mut self, deny: &DenyList, now: Instant) -> bool {
        let before = self.records.len();
        let grace = self.grace;
        self.records.retain(|(id, _), seen| {
            !deny.ids().any(|d| d == id) && counts_until(seen, grace).is_none_or(|t| t > now)
        });
        self.records.len() != before
    }

    /// When the next record stops counting, if any will.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.records
            .values()
            .filter_map(|s| counts_until(s, self.grace))
            .min()
    }

    /// Adds the instances of every agent not in `local` (this replica's own agents, which it
    /// knows first-hand) to `catalog`: per agent, the newest open stream's record, else the
    /// newest closed one still within its grace period.
    pub fn add_to(&self, catalog: &mut Catalog, local: impl Fn(&SpiffeId) -> bool, now: Instant) {
        let mut best: BTreeMap<&SpiffeId, &Seen> = BTreeMap::new();
        for ((id, _), seen) in &self.records {
            if local(id) || counts_until(seen, self.grace).is_some_and(|t| t <= now) {
                continue;
            }
            let rank = |s: &Seen| {
                (
                    s.vanished.is_none() && s.record.disconnected_unix.is_none(),
                    s.record.connected_unix,
                )
            };
            match best.get(id) {
                Some(b) if rank(b) >= rank(seen) => {}
                _ => {
                    best.insert(id, seen);
                }
            }
        }
        for seen in best.values() {
            for i in &seen.record.instances {
                catalog.insert(i.service.clone(), i.instance.clone());
            }
        }
    }

    /// Whether another replica holds an open stream of this agent now.
    pub fn has_open(&self, id: &SpiffeId) -> bool {
        self.records.iter().any(|((agent, _), seen)| {
            agent == id && seen.vanished.is_none() && seen.record.disconnected_unix.is_none()
        })
    }

    /// How many other replicas' agents are counted.
    pub fn agents(&self) -> usize {
        self.records
            .keys()
            .map(|(id, _)| id)
            .collect::<BTreeSet<_>>()
            .len()
    }
}

/// Until when a record counts: `None` while its stream is open and it is in KV.
fn counts_until(seen: &Seen, grace: Duration) -> Option<Instant> {
    match (seen.closed, seen.vanished) {
        (None, None) => None,
        (Some(t), None) | (None, Some(t)) => Some(t + grace),
        // Closed, then deleted: the grace period began when it closed.
        (Some(closed), Some(vanished)) => Some(closed.min(vanished) + grace),
    }
}

/// When a record's stream closed, as an instant on this machine's monotonic clock. Converted
/// once, when the record is read: a writer whose clock runs ahead then cannot restart the grace
/// period on every look, and a time beyond the grace period (or unrepresentable) is expired.
fn closed_at(
    record: &DiscoveryRecord,
    grace: Duration,
    now: Instant,
    wall: SystemTime,
) -> Option<Instant> {
    record.disconnected_unix.map(|t| {
        let ago = SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(t))
            .and_then(|closed| wall.duration_since(closed).ok())
            .unwrap_or_default();
        now.checked_sub(ago.min(grace)).unwrap_or(now)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmesh_model::Health;

    const GRACE: Duration = Duration::from_secs(60);

    fn id(node: &str) -> SpiffeId {
        SpiffeId::agent("vmesh", "dc1", node).unwrap()
    }

    fn record(node: &str, replica: &str, connected: u64, closed: Option<u64>) -> DiscoveryRecord {
        DiscoveryRecord {
            spiffe_id: id(node),
            replica: replica.into(),
            connected_unix: connected,
            disconnected_unix: closed,
            instances: vec![SharedInstance {
                service: "web".into(),
                instance: ServiceInstance {
                    node: node.into(),
                    datacenter: "dc1".into(),
                    id: format!("web-{replica}"),
                    address: "10.0.0.1".into(),
                    port: 80,
                    tags: vec![],
                    health: Health::Passing,
                },
            }],
        }
    }

    fn ids(view: &RemoteView, now: Instant) -> Vec<String> {
        let mut catalog = Catalog::new();
        view.add_to(&mut catalog, |_| false, now);
        catalog
            .instances("web")
            .iter()
            .map(|i| format!("{}/{}", i.node, i.id))
            .collect()
    }

    fn wall(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn other_replicas_records_count_and_our_own_are_ignored() {
        let mut view = RemoteView::new("a", GRACE);
        let now = Instant::now();
        assert!(view.set(
            vec![
                record("vm-1", "a", 100, None),
                record("vm-2", "b", 100, None)
            ],
            now,
            wall(200)
        ));
        assert_eq!(ids(&view, now), vec!["vm-2/web-b"]);
        assert!(
            !view.set(vec![record("vm-2", "b", 100, None)], now, wall(200)),
            "no change"
        );
        assert_eq!(view.next_expiry(), None);
    }

    #[test]
    fn a_closed_stream_counts_for_the_grace_period_from_when_it_closed() {
        let mut view = RemoteView::new("a", GRACE);
        let now = Instant::now();
        view.set(vec![record("vm-2", "b", 100, Some(190))], now, wall(200));
        // Closed 10 s ago (wall clock 200): 50 s left.
        assert_eq!(ids(&view, now).len(), 1);
        assert_eq!(view.next_expiry(), Some(now + Duration::from_secs(50)));
        let later = now + Duration::from_secs(50);
        assert!(ids(&view, later).is_empty());
        assert!(view.expire(&DenyList::new(), later));
        assert_eq!(view.agents(), 0);
    }

    #[test]
    fn a_vanished_record_a_dead_replica_counts_for_the_grace_period_from_when_it_vanished() {
        let mut view = RemoteView::new("a", GRACE);
        let t0 = Instant::now();
        view.set(vec![record("vm-2", "b", 100, None)], t0, wall(200));
        assert!(view.set(vec![], t0 + Duration::from_secs(5), wall(205)));
        let in_grace = t0 + Duration::from_secs(64);
        assert_eq!(ids(&view, in_grace).len(), 1);
        assert_eq!(view.next_expiry(), Some(t0 + Duration::from_secs(65)));
        assert!(!view.expire(&DenyList::new(), in_grace));
        assert!(view.expire(&DenyList::new(), t0 + Duration::from_secs(65)));
        // It comes back (the agent reconnected to that replica): it counts again.
        assert!(view.set(vec![record("vm-2", "b", 400, None)], t0, wall(400)));
        assert_eq!(ids(&view, t0).len(), 1);
    }

    #[test]
    fn an_open_stream_wins_over_a_closed_one_and_the_newest_over_older() {
        let mut view = RemoteView::new("a", GRACE);
        let now = Instant::now();
        view.set(
            vec![
                record("vm-2", "b", 100, Some(150)),
                record("vm-2", "c", 140, None),
                record("vm-2", "d", 120, None),
            ],
            now,
            wall(160),
        );
        assert_eq!(ids(&view, now), vec!["vm-2/web-c"]);
    }

    #[test]
    fn local_agents_and_revoked_agents_do_not_count() {
        let mut view = RemoteView::new("a", GRACE);
        let now = Instant::now();
        view.set(
            vec![
                record("vm-2", "b", 100, None),
                record("vm-3", "b", 100, None),
            ],
            now,
            wall(200),
        );
        let mut catalog = Catalog::new();
        view.add_to(&mut catalog, |i| *i == id("vm-2"), now);
        assert_eq!(catalog.instances("web").len(), 1);
        let mut deny = DenyList::new();
        deny.deny_id(id("vm-3"));
        assert!(view.expire(&deny, now));
        assert_eq!(view.agents(), 1);
    }

    #[test]
    fn a_writer_clock_ahead_cannot_stretch_the_grace_period() {
        let mut view = RemoteView::new("a", GRACE);
        let now = Instant::now();
        // Closed "in the future" by this machine's clock: counted as closed now, once.
        view.set(vec![record("vm-2", "b", 100, Some(500))], now, wall(200));
        assert_eq!(view.next_expiry(), Some(now + GRACE));
        // Reading the same record again later does not restart it.
        let later = now + Duration::from_secs(30);
        view.set(vec![record("vm-2", "b", 100, Some(500))], later, wall(230));
        assert_eq!(view.next_expiry(), Some(now + GRACE));
        // A time that cannot be represented is expired, not a panic.
        view.set(
            vec![record("vm-2", "b", 100, Some(u64::MAX))],
            later,
            wall(230),
        );
        assert!(view.next_expiry().is_some());
    }

    #[test]
    fn records_round_trip_as_json() {
        let r = record("vm-2", "b", 100, Some(150));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"service\":\"web\""), "{json}");
        assert_eq!(serde_json::from_str::<DiscoveryRecord>(&json).unwrap(), r);
        assert_eq!(
            record_key(&Layout::default(), &id("vm-2"), "b"),
            "vmesh/discovery/dc1/vm-2/b"
        );
    }
}

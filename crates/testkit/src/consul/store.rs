//! The emulator's state: one raft index, the KV table with tombstones, sessions and lock delays.
//! Pure data and rules, no I/O; every method runs under the emulator's mutex.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::agent::LocalAgent;
use super::util::new_uuid;

/// Consul's cap on a session's lock delay.
pub(crate) const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);

/// One KV entry, as `GET /v1/kv/<key>` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: Vec<u8>,
    pub flags: u64,
    pub create_index: u64,
    pub modify_index: u64,
    pub lock_index: u64,
    /// The session holding the lock on this key, if any.
    pub session: Option<String>,
}

/// What happens to a session's locks when it is invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionBehavior {
    Release,
    Delete,
}

impl SessionBehavior {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SessionBehavior::Release => "release",
            SessionBehavior::Delete => "delete",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub id: String,
    pub name: String,
    pub node: String,
    pub lock_delay: Duration,
    pub behavior: SessionBehavior,
    /// As given at creation (`""` when none).
    pub ttl_text: String,
    pub ttl: Option<Duration>,
    /// `None` serializes as `null` (the request set `Checks`/`NodeChecks` explicitly empty).
    pub node_checks: Option<Vec<String>>,
    pub create_index: u64,
    pub modify_index: u64,
    /// When the TTL runs out (None: no TTL, or the server is stopped).
    pub expires: Option<Instant>,
}

/// A new session, before it gets its ID and indexes.
#[derive(Debug, Clone)]
pub(crate) struct NewSession {
    pub name: String,
    pub node: String,
    pub lock_delay: Duration,
    pub behavior: SessionBehavior,
    pub ttl_text: String,
    pub ttl: Option<Duration>,
    pub node_checks: Option<Vec<String>>,
}

#[derive(Debug, Default)]
pub(crate) struct Store {
    /// The last raft index handed out; every applied write takes the next one.
    pub raft_index: u64,
    /// Index of the last change to the KV table or its tombstones (Consul's `kvs` +
    /// `tombstones` table indexes).
    pub kv_index: u64,
    /// Index of the last change to the sessions table.
    pub sessions_index: u64,
    pub kv: BTreeMap<String, KvEntry>,
    /// Deleted keys and the index of their delete (never reaped here).
    pub tombstones: BTreeMap<String, u64>,
    pub sessions: BTreeMap<String, Session>,
    /// Key → when its lock delay ends.
    pub lock_delays: HashMap<String, Instant>,
    /// The local agent's node, services and checks.
    pub agent: LocalAgent,
}

fn under<'a, V>(
    map: &'a BTreeMap<String, V>,
    prefix: &str,
) -> impl Iterator<Item = (&'a String, &'a V)> + 'a {
    let prefix = prefix.to_owned();
    map.range(prefix.clone()..)
        .take_while(move |(k, _)| k.starts_with(prefix.as_str()))
}

impl Store {
    pub(crate) fn next_index(&mut self) -> u64 {
        self.raft_index += 1;
        self.raft_index
    }

    // ---- reads ----

    /// The index and entry of a single-key read: the entry's ModifyIndex, or (missing key) the
    /// KV table index, at least 1.
    pub fn get(&self, key: &str) -> (u64, Option<&KvEntry>) {
        match self.kv.get(key) {
            Some(e) => (e.modify_index, Some(e)),
            None => (self.kv_index.max(1), None),
        }
    }

    /// The index of a prefix read: the highest ModifyIndex or tombstone index under the prefix;
    /// the whole KV table's index for the empty prefix or when nothing was ever under it.
    pub fn prefix_index(&self, prefix: &str) -> u64 {
        if prefix.is_empty() {
            return self.kv_index.max(1);
        }
        let live = under(&self.kv, prefix)
            .map(|(_, e)| e.modify_index)
            .max()
            .unwrap_or(0);
        let dead = under(&self.tombstones, prefix)
            .map(|(_, i)| *i)
            .max()
            .unwrap_or(0);
        match live.max(dead) {
            0 => self.kv_index.max(1),
            i => i,
        }
    }

    pub fn list(&self, prefix: &str) -> Vec<&KvEntry> {
        under(&self.kv, prefix).map(|(_, e)| e).collect()
    }

    // ---- KV writes ----

    fn touch_kv(&mut self) -> u64 {
        let idx = self.next_index();
        self.kv_index = idx;
        idx
    }

    /// Stores `entry`'s key/value/flags/session, keeping CreateIndex; an unchanged entry is not
    /// rewritten (its ModifyIndex stays, as in current Consul).
    fn write_entry(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        session: Option<String>,
        lock_index: u64,
    ) {
        if let Some(e) = self.kv.get(key) {
            if e.value == value
                && e.flags == flags
                && e.session == session
                && e.lock_index == lock_index
            {
                return;
            }
        }
        let idx = self.touch_kv();
        let create_index = self.kv.get(key).map_or(idx, |e| e.create_index);
        self.kv.insert(
            key.to_owned(),
            KvEntry {
                key: key.to_owned(),
                value,
                flags,
                create_index,
                modify_index: idx,
                lock_index,
                session,
            },
        );
    }

    /// Plain PUT: sets value and flags, keeps any lock holder and LockIndex.
    pub fn set(&mut self, key: &str, value: Vec<u8>, flags: u64) -> bool {
        let (session, lock_index) = self
            .kv
            .get(key)
            .map_or((None, 0), |e| (e.session.clone(), e.lock_index));
        self.write_entry(key, value, flags, session, lock_index);
        true
    }

    /// `?cas=<index>`: writes only if the key's ModifyIndex is `cas` (0: only if absent).
    pub fn cas(&mut self, key: &str, value: Vec<u8>, flags: u64, cas: u64) -> bool {
        let current = self.kv.get(key).map_or(0, |e| e.modify_index);
        if current != cas {
            return false;
        }
        self.set(key, value, flags)
    }

    /// `?acquire=<session>`. `Err` is a server error (unknown session).
    pub fn lock(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        session: &str,
        now: Instant,
    ) -> Result<bool, String> {
        if self.lock_delays.get(key).is_some_and(|until| *until > now) {
            return Ok(false);
        }
        if !self.sessions.contains_key(session) {
            return Err(format!("invalid session {session:?}"));
        }
        let lock_index = match self.kv.get(key) {
            Some(e) if e.session.as_deref() == Some(session) => e.lock_index,
            Some(e) if e.session.is_some() => return Ok(false),
            Some(e) => e.lock_index + 1,
            None => 1,
        };
        self.write_entry(key, value, flags, Some(session.to_owned()), lock_index);
        Ok(true)
    }

    /// `?release=<session>`: only the holder can release.
    pub fn unlock(&mut self, key: &str, value: Vec<u8>, flags: u64, session: &str) -> bool {
        let lock_index = match self.kv.get(key) {
            Some(e) if e.session.as_deref() == Some(session) => e.lock_index,
            _ => return false,
        };
        self.write_entry(key, value, flags, None, lock_index);
        true
    }

    /// Deletes one key (leaving a tombstone); returns whether it existed.
    pub fn delete(&mut self, key: &str) -> bool {
        if !self.kv.contains_key(key) {
            return false;
        }
        let idx = self.touch_kv();
        self.kv.remove(key);
        self.tombstones.insert(key.to_owned(), idx);
        true
    }

    /// `DELETE ?cas=`: true if deleted or already absent, false if the index does not match.
    pub fn delete_cas(&mut self, key: &str, cas: u64) -> bool {
        match self.kv.get(key) {
            None => true,
            Some(e) if e.modify_index != cas => false,
            Some(_) => self.delete(key),
        }
    }

    /// `DELETE ?recurse`: every key under the prefix, all with one index.
    pub fn delete_tree(&mut self, prefix: &str) {
        let keys: Vec<String> = under(&self.kv, prefix).map(|(k, _)| k.clone()).collect();
        if keys.is_empty() {
            return;
        }
        let idx = self.touch_kv();
        for k in keys {
            self.kv.remove(&k);
            self.tombstones.insert(k, idx);
        }
    }

    // ---- sessions ----

    pub fn session_create(
        &mut self,
        new: NewSession,
        now: Instant,
        timers_running: bool,
    ) -> String {
        let mut id = new_uuid();
        while self.sessions.contains_key(&id) {
            id = new_uuid();
        }
        let idx = self.next_index();
        self.sessions_index = idx;
        let expires = new.ttl.filter(|_| timers_running).map(|ttl| now + ttl);
        self.sessions.insert(
            id.clone(),
            Session {
                id: id.clone(),
                name: new.name,
                node: new.node,
                lock_delay: new.lock_delay,
                behavior: new.behavior,
                ttl_text: new.ttl_text,
                ttl: new.ttl,
                node_checks: new.node_checks,
                create_index: idx,
                modify_index: idx,
                expires,
            },
        );
        id
    }

    /// Restarts the TTL; `None` if there is no such session.
    pub fn session_renew(&mut self, id: &str, now: Instant) -> Option<&Session> {
        let s = self.sessions.get_mut(id)?;
        s.expires = s.ttl.map(|ttl| now + ttl);
        Some(s)
    }

    /// Destroys or invalidates a session: releases (or deletes) its locks and starts their lock
    /// delay. Returns whether it existed.
    pub fn session_destroy(&mut self, id: &str, now: Instant) -> bool {
        let Some(session) = self.sessions.remove(id) else {
            return false;
        };
        let idx = self.next_index();
        self.sessions_index = idx;
        let held: Vec<String> = self
            .kv
            .values()
            .filter(|e| e.session.as_deref() == Some(id))
            .map(|e| e.key.clone())
            .collect();
        if !held.is_empty() {
            self.kv_index = idx;
        }
        let delay = session.lock_delay.min(MAX_LOCK_DELAY);
        for key in held {
            match session.behavior {
                SessionBehavior::Release => {
                    if let Some(e) = self.kv.get_mut(&key) {
                        e.session = None;
                        e.modify_index = idx;
                    }
                }
                SessionBehavior::Delete => {
                    self.kv.remove(&key);
                    self.tombstones.insert(key.clone(), idx);
                }
            }
            if !delay.is_zero() {
                self.lock_delays.insert(key, now + delay);
            }
        }
        true
    }

    /// Invalidates every session whose TTL ran out; returns whether any did.
    pub fn expire_sessions(&mut self, now: Instant) -> bool {
        let due: Vec<String> = self
            .sessions
            .values()
            .filter(|s| s.expires.is_some_and(|e| e <= now))
            .map(|s| s.id.clone())
            .collect();
        for id in &due {
            self.session_destroy(id, now);
        }
        self.lock_delays.retain(|_, until| *until > now);
        !due.is_empty()
    }

    pub fn next_session_expiry(&self) -> Option<Instant> {
        self.sessions.values().filter_map(|s| s.expires).min()
    }

    /// Stops (`None`) or restarts (`Some(now)`) every TTL timer, as a Consul leader does when it
    /// loses or gains leadership.
    pub fn reset_session_timers(&mut self, now: Option<Instant>) {
        for s in self.sessions.values_mut() {
            s.expires = match (now, s.ttl) {
                (Some(now), Some(ttl)) => Some(now + ttl),
                _ => None,
            };
        }
    }

    // ---- test knobs ----

    /// Simulates a snapshot restore to raft index `n`: data stays, every index above `n` becomes
    /// `n`, and the next write gets `n + 1`.
    pub fn restore_index_to(&mut self, n: u64) {
        let clamp = |i: &mut u64| *i = (*i).min(n);
        clamp(&mut self.raft_index);
        clamp(&mut self.kv_index);
        clamp(&mut self.sessions_index);
        clamp(&mut self.agent.node_index);
        clamp(&mut self.agent.services_index);
        clamp(&mut self.agent.checks_index);
        for s in self.agent.services.values_mut() {
            clamp(&mut s.create_index);
            clamp(&mut s.modify_index);
        }
        for c in self.agent.checks.values_mut() {
            clamp(&mut c.create_index);
            clamp(&mut c.modify_index);
        }
        for e in self.kv.values_mut() {
            clamp(&mut e.create_index);
            clamp(&mut e.modify_index);
        }
        self.tombstones.values_mut().for_each(clamp);
        for s in self.sessions.values_mut() {
            clamp(&mut s.create_index);
            clamp(&mut s.modify_index);
        }
        self.raft_index = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(st: &mut Store, behavior: SessionBehavior, delay: Duration) -> String {
        st.session_create(
            NewSession {
                name: "t".into(),
                node: "n".into(),
                lock_delay: delay,
                behavior,
                ttl_text: String::new(),
                ttl: None,
                node_checks: None,
            },
            Instant::now(),
            true,
        )
    }

    #[test]
    fn indexes_and_tombstones() {
        let mut st = Store::default();
        assert_eq!(st.get("a").0, 1);
        st.set("p/a", b"1".to_vec(), 0);
        st.set("p/b", b"2".to_vec(), 0);
        st.set("q/x", b"3".to_vec(), 0);
        assert_eq!(st.prefix_index("p/"), 2);
        assert_eq!(st.prefix_index("nothing/"), 3);
        // Unchanged write: no new index.
        st.set("p/a", b"1".to_vec(), 0);
        assert_eq!(st.raft_index, 3);
        assert!(st.delete("p/b"));
        assert_eq!(st.prefix_index("p/"), 4);
        assert!(!st.delete("p/b"));
        assert!(st.cas("p/new", vec![], 0, 0));
        assert!(!st.cas("p/new", vec![], 0, 0));
        assert!(st.delete_cas("p/zzz", 7));
        st.restore_index_to(2);
        assert_eq!(st.prefix_index("p/"), 2);
        st.set("p/c", vec![], 0);
        assert_eq!(st.get("p/c").0, 3);
    }

    #[test]
    fn locks_and_delay() {
        let mut st = Store::default();
        let now = Instant::now();
        let a = session(&mut st, SessionBehavior::Release, Duration::from_secs(5));
        let b = session(&mut st, SessionBehavior::Delete, Duration::ZERO);
        assert_eq!(st.lock("k", vec![], 0, &a, now), Ok(true));
        assert_eq!(st.lock("k", vec![], 0, &b, now), Ok(false));
        assert_eq!(st.kv["k"].lock_index, 1);
        assert!(st.lock("k", vec![], 0, "nope", now).is_err());
        assert!(st.session_destroy(&a, now));
        assert_eq!(st.kv["k"].session, None);
        assert_eq!(st.lock("k", vec![], 0, &b, now), Ok(false));
        let later = now + Duration::from_secs(6);
        assert_eq!(st.lock("k", vec![], 0, &b, later), Ok(true));
        assert_eq!(st.kv["k"].lock_index, 2);
        assert!(st.session_destroy(&b, later));
        assert!(!st.kv.contains_key("k"));
    }
}

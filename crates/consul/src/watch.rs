//! The blocking-query watch on a KV prefix, as a pure state machine.
//!
//! The async loop around it only asks [`KvWatch::next`] what to request and
//! when, makes the call, and hands the outcome back. The rules, from Consul's
//! guidance on blocking queries:
//!
//! - the first read does not block; after that every read blocks on the last
//!   `X-Consul-Index`, never on 0;
//! - if the index goes backwards (a snapshot restore, a new leader), reset: read
//!   again without blocking;
//! - a wake-up is not a change: entries are compared by `ModifyIndex` and only
//!   changed keys come out; a wake-up with nothing changed waits a little before the
//!   next read, so a flapping index cannot turn the loop hot;
//! - errors back off exponentially with jitter (the one policy, [`vmesh_retry::Backoff`]); the
//!   read after an error does not block, so a Consul that is back is seen at once, and it yields
//!   only what really changed meanwhile, so nothing is pushed again;
//! - an answer Consul filtered by ACLs is a partial view: it is *unknown*, not "gone". Nothing
//!   comes out of it (applying it would delete every key the token may not read); it counts as
//!   a failed read, and the last view stands until a complete answer arrives.

use std::collections::BTreeMap;
use std::time::Duration;

use vmesh_retry::Backoff;

use crate::{Indexed, KvEntry};

#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// How long one blocking read waits (Consul caps it at 10 minutes).
    pub wait: Duration,
    /// Pause after a wake-up that changed nothing.
    pub quiet_pause: Duration,
    /// First backoff after an error; doubles per consecutive error.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            wait: Duration::from_secs(300),
            quiet_pause: Duration::from_millis(50),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// The next read to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Next {
    /// Block on this index; `None` for a read that answers at once.
    pub index: Option<u64>,
    /// Wait this long before making it.
    pub delay: Duration,
}

/// A change to one key under the watched prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Upsert(KvEntry),
    Delete(String),
}

/// An answer that was filtered by ACLs: unknown, not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filtered;

#[derive(Clone, Debug)]
pub struct KvWatch {
    config: WatchConfig,
    /// The index to block on; 0 means "read without blocking".
    index: u64,
    /// ModifyIndex of every key we have seen, by key.
    known: BTreeMap<String, u64>,
    synced: bool,
    failures: u32,
    delay: Duration,
    backoff: Backoff,
}

impl KvWatch {
    pub fn new(config: WatchConfig) -> Self {
        Self::with_seed(config, vmesh_retry::seed())
    }

    /// A watch whose backoff jitter comes from `seed` (tests).
    pub fn with_seed(config: WatchConfig, seed: u64) -> Self {
        let backoff = Backoff::with_seed(config.backoff_base, config.backoff_max, seed);
        KvWatch {
            config,
            index: 0,
            known: BTreeMap::new(),
            synced: false,
            failures: 0,
            delay: Duration::ZERO,
            backoff,
        }
    }

    pub fn config(&self) -> &WatchConfig {
        &self.config
    }

    pub fn next(&self) -> Next {
        Next {
            index: (self.index > 0 && self.failures == 0).then_some(self.index),
            delay: self.delay,
        }
    }

    /// At least one read succeeded and the last one did.
    pub fn is_healthy(&self) -> bool {
        self.synced && self.failures == 0
    }

    /// Consecutive failed reads.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether a first read has completed.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// A read answered: the keys that changed since the last answer. An answer filtered by ACLs
    /// changes nothing and counts as a failed read.
    pub fn on_response(
        &mut self,
        response: Indexed<Vec<KvEntry>>,
    ) -> Result<Vec<WatchEvent>, Filtered> {
        if response.filtered_by_acls {
            self.on_error();
            return Err(Filtered);
        }
        let went_back = self.synced && response.index < self.index;
        self.index = if went_back {
            // The store was restored or a leader changed: the old index may never come
            // back. This answer is complete anyway; the next read starts over.
            0
        } else {
            response.index.max(1)
        };
        let mut events = Vec::new();
        let mut now = BTreeMap::new();
        for entry in response.value {
            now.insert(entry.key.clone(), entry.modify_index);
            if self.known.get(&entry.key) != Some(&entry.modify_index) {
                events.push(WatchEvent::Upsert(entry));
            }
        }
        for key in self.known.keys() {
            if !now.contains_key(key) {
                events.push(WatchEvent::Delete(key.clone()));
            }
        }
        self.known = now;
        self.failures = 0;
        self.backoff.reset();
        self.synced = true;
        self.delay = if events.is_empty() && !went_back {
            self.config.quiet_pause
        } else {
            Duration::ZERO
        };
        Ok(events)
    }

    /// A read failed: the next one waits a jittered, growing delay and does not block.
    pub fn on_error(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.delay = self.backoff.next_delay();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, modify_index: u64, value: &str) -> KvEntry {
        KvEntry {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            create_index: 1,
            modify_index,
            lock_index: 0,
            flags: 0,
            session: None,
        }
    }

    fn answer(index: u64, entries: Vec<KvEntry>) -> Indexed<Vec<KvEntry>> {
        Indexed {
            index,
            value: entries,
            filtered_by_acls: false,
        }
    }

    fn keys(events: &[WatchEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                WatchEvent::Upsert(e) => format!("+{}", e.key),
                WatchEvent::Delete(k) => format!("-{k}"),
            })
            .collect()
    }

    #[test]
    fn the_first_read_does_not_block_and_the_next_blocks_on_its_index() {
        let mut w = KvWatch::new(WatchConfig::default());
        assert_eq!(
            w.next(),
            Next {
                index: None,
                delay: Duration::ZERO
            }
        );
        let ev = w
            .on_response(answer(7, vec![entry("p/a", 5, "1"), entry("p/b", 7, "2")]))
            .unwrap();
        assert_eq!(keys(&ev), vec!["+p/a", "+p/b"]);
        assert_eq!(
            w.next(),
            Next {
                index: Some(7),
                delay: Duration::ZERO
            }
        );
        assert!(w.is_healthy());
    }

    #[test]
    fn an_empty_prefix_never_blocks_on_index_zero() {
        let mut w = KvWatch::new(WatchConfig::default());
        assert!(w.on_response(answer(0, vec![])).unwrap().is_empty());
        assert_eq!(w.next().index, Some(1));
    }

    #[test]
    fn only_changed_keys_come_out_and_deletes_are_seen() {
        let mut w = KvWatch::new(WatchConfig::default());
        w.on_response(answer(7, vec![entry("p/a", 5, "1"), entry("p/b", 7, "2")]))
            .unwrap();
        let ev = w
            .on_response(answer(9, vec![entry("p/a", 5, "1"), entry("p/b", 9, "3")]))
            .unwrap();
        assert_eq!(keys(&ev), vec!["+p/b"]);
        let ev = w
            .on_response(answer(10, vec![entry("p/b", 9, "3")]))
            .unwrap();
        assert_eq!(keys(&ev), vec!["-p/a"]);
    }

    #[test]
    fn a_wake_up_with_nothing_changed_is_no_change_and_slows_the_loop() {
        let mut w = KvWatch::new(WatchConfig::default());
        w.on_response(answer(7, vec![entry("p/a", 5, "1")]))
            .unwrap();
        // The index moved for another reason (another prefix, a tombstone reaped).
        let ev = w
            .on_response(answer(12, vec![entry("p/a", 5, "1")]))
            .unwrap();
        assert!(ev.is_empty());
        assert_eq!(
            w.next(),
            Next {
                index: Some(12),
                delay: WatchConfig::default().quiet_pause
            }
        );
        // A real change goes through at once again.
        w.on_response(answer(13, vec![entry("p/a", 13, "2")]))
            .unwrap();
        assert_eq!(w.next().delay, Duration::ZERO);
    }

    #[test]
    fn an_index_that_goes_backwards_resets_to_a_non_blocking_read() {
        let mut w = KvWatch::new(WatchConfig::default());
        w.on_response(answer(100, vec![entry("p/a", 90, "1")]))
            .unwrap();
        // A snapshot restore: lower index, content as of the snapshot.
        let ev = w
            .on_response(answer(40, vec![entry("p/a", 30, "0")]))
            .unwrap();
        assert_eq!(keys(&ev), vec!["+p/a"], "the content is still compared");
        assert_eq!(
            w.next(),
            Next {
                index: None,
                delay: Duration::ZERO
            }
        );
        w.on_response(answer(41, vec![entry("p/a", 30, "0")]))
            .unwrap();
        assert_eq!(w.next().index, Some(41));
    }

    #[test]
    fn errors_back_off_with_jitter_up_to_the_cap_and_recovery_resends_nothing() {
        let cfg = WatchConfig::default();
        let mut w = KvWatch::with_seed(cfg.clone(), 7);
        w.on_response(answer(7, vec![entry("p/a", 5, "1")]))
            .unwrap();
        let mut ceiling = cfg.backoff_base;
        for _ in 0..12 {
            w.on_error();
            let delay = w.next().delay;
            assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
            assert!(!w.is_healthy());
            assert_eq!(
                w.next().index,
                None,
                "the retry answers at once, so recovery shows"
            );
            ceiling = (ceiling * 2).min(cfg.backoff_max);
        }
        assert_eq!(ceiling, cfg.backoff_max, "the delays reached the cap");

        // Consul is back with the same content: nothing comes out.
        let ev = w
            .on_response(answer(7, vec![entry("p/a", 5, "1")]))
            .unwrap();
        assert!(ev.is_empty());
        assert!(w.is_healthy());
        assert_eq!(w.failures(), 0);
        // The next failure starts from the base again.
        w.on_error();
        assert!(w.next().delay <= cfg.backoff_base);
    }

    #[test]
    fn an_answer_filtered_by_acls_is_unknown_not_gone() {
        let mut w = KvWatch::with_seed(WatchConfig::default(), 1);
        w.on_response(answer(7, vec![entry("p/a", 5, "1"), entry("p/b", 6, "2")]))
            .unwrap();
        // The token lost read on p/b: Consul leaves it out and says so.
        let mut partial = answer(8, vec![entry("p/a", 5, "1")]);
        partial.filtered_by_acls = true;
        assert_eq!(w.on_response(partial), Err(Filtered));
        assert_eq!(w.failures(), 1, "counted as a failed read");
        assert_eq!(w.next().index, None);
        // Once complete answers come back, nothing was deleted meanwhile.
        let ev = w
            .on_response(answer(9, vec![entry("p/a", 5, "1"), entry("p/b", 6, "2")]))
            .unwrap();
        assert!(ev.is_empty(), "{:?}", keys(&ev));
    }
}

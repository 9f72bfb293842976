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
//! - errors back off exponentially with jitter; the read after an error does not
//!   block, so a Consul that is back is seen at once, and it yields only what really
//!   changed meanwhile, so nothing is pushed again.

use std::collections::BTreeMap;
use std::time::Duration;

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
}

impl KvWatch {
    pub fn new(config: WatchConfig) -> Self {
        KvWatch {
            config,
            index: 0,
            known: BTreeMap::new(),
            synced: false,
            failures: 0,
            delay: Duration::ZERO,
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

    /// A read answered: the keys that changed since the last answer.
    pub fn on_response(&mut self, response: Indexed<Vec<KvEntry>>) -> Vec<WatchEvent> {
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
        self.synced = true;
        self.delay = if events.is_empty() && !went_back {
            self.config.quiet_pause
        } else {
            Duration::ZERO
        };
        events
    }

    /// A read failed. `jitter` in [0, 1) spreads retries of many controllers apart.
    pub fn on_error(&mut self, jitter: f64) {
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(20);
        let full = self
            .config
            .backoff_base
            .saturating_mul(1 << exp)
            .min(self.config.backoff_max);
        // Between half and all of it.
        self.delay = full / 2 + full.mul_f64(jitter.clamp(0.0, 1.0) / 2.0);
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
        let ev = w.on_response(answer(7, vec![entry("p/a", 5, "1"), entry("p/b", 7, "2")]));
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
        assert!(w.on_response(answer(0, vec![])).is_empty());
        assert_eq!(w.next().index, Some(1));
    }

    #[test]
    fn only_changed_keys_come_out_and_deletes_are_seen() {
        let mut w = KvWatch::new(WatchConfig::default());
        w.on_response(answer(7, vec![entry("p/a", 5, "1"), entry("p/b", 7, "2")]));
        let ev = w.on_response(answer(9, vec![entry("p/a", 5, "1"), entry("p/b", 9, "3")]));
        assert_eq!(keys(&ev), vec!["+p/b"]);
        let ev = w.on_response(answer(10, vec![entry("p/b", 9, "3")]));
        assert_eq!(keys(&ev), vec!["-p/a"]);
    }

    #[test]
    fn a_wake_up_with_nothing_changed_is_no_change_and_slows_the_loop() {
        let mut w = KvWatch::new(WatchConfig::default());
        w.on_response(answer(7, vec![entry("p/a", 5, "1")]));
        // The index moved for another reason (another prefix, a tombstone reaped).
        let ev = w.on_response(answer(12, vec![entry("p/a", 5, "1")]));
        assert!(ev.is_empty());
        assert_eq!(
            w.next(),
            Next {
                index: Some(12),
                delay: WatchConfig::default().quiet_pause
            }
        );
        // A real change goes through at once again.
        w.on_response(answer(13, vec![entry("p/a", 13, "2")]));
        assert_eq!(w.next().delay, Duration::ZERO);
    }

    #[test]
    fn an_index_that_goes_backwards_resets_to_a_non_blocking_read() {
        let mut w = KvWatch::new(WatchConfig::default());
        w.on_response(answer(100, vec![entry("p/a", 90, "1")]));
        // A snapshot restore: lower index, content as of the snapshot.
        let ev = w.on_response(answer(40, vec![entry("p/a", 30, "0")]));
        assert_eq!(keys(&ev), vec!["+p/a"], "the content is still compared");
        assert_eq!(
            w.next(),
            Next {
                index: None,
                delay: Duration::ZERO
            }
        );
        w.on_response(answer(41, vec![entry("p/a", 30, "0")]));
        assert_eq!(w.next().index, Some(41));
    }

    #[test]
    fn errors_back_off_with_jitter_up_to_the_cap_and_recovery_resends_nothing() {
        let cfg = WatchConfig::default();
        let mut w = KvWatch::new(cfg.clone());
        w.on_response(answer(7, vec![entry("p/a", 5, "1")]));
        let mut delays = Vec::new();
        for _ in 0..12 {
            w.on_error(1.0);
            delays.push(w.next().delay);
            assert!(!w.is_healthy());
        }
        assert_eq!(delays[0], cfg.backoff_base);
        assert_eq!(delays[1], cfg.backoff_base * 2);
        assert!(delays.windows(2).all(|d| d[0] <= d[1]), "{delays:?}");
        assert_eq!(*delays.last().unwrap(), cfg.backoff_max);
        w.on_error(0.0);
        assert_eq!(
            w.next().delay,
            cfg.backoff_max / 2,
            "jitter takes up to half off"
        );
        assert_eq!(
            w.next().index,
            None,
            "the retry answers at once, so recovery shows"
        );

        // Consul is back with the same content: nothing comes out.
        let ev = w.on_response(answer(7, vec![entry("p/a", 5, "1")]));
        assert!(ev.is_empty());
        assert!(w.is_healthy());
        assert_eq!(w.failures(), 0);
    }
}

//! The one driver of Consul KV watches: a [`KvWatch`] state machine plus the calls it asks for.
//!
//! Every loop in vmesh that watches KV (the config source, revocations, the replicas' discovery
//! records and status reports, the leader lock) goes through [`KvWatcher`], so they share the
//! rules of [`KvWatch`]: blocking reads on the last index (never 0), a reset when the index goes
//! backwards, only changed keys reported, a pause after a wake-up that changed nothing, backoff
//! with jitter after errors, and ACL-filtered answers treated as unknown rather than as deletes.
//!
//! [`KvWatcher::changed`] is cancel-safe: a caller may race it against a timer in
//! `tokio::select!`; a cancelled read is simply made again, and a backoff already begun is only
//! waited out, not restarted.

use std::time::Duration;

use tokio::time::Instant;

use crate::watch::{KvWatch, WatchConfig, WatchEvent};
use crate::{Client, ConsulError, Indexed};

/// What a [`KvWatcher`] watches.
#[derive(Clone, Debug)]
enum Target {
    /// Every key under a prefix (`?recurse`).
    Prefix(String),
    /// Exactly one key.
    Key(String),
}

/// Changes since the last call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changes {
    /// The keys that changed. Empty only for the first answer (an empty prefix) and for the
    /// first answer after failed reads when nothing changed meanwhile (so the caller learns that
    /// the source is back).
    pub events: Vec<WatchEvent>,
    /// The first successful read: `events` is everything there is.
    pub first: bool,
    /// The read before this one failed.
    pub recovered: bool,
}

/// Why a watch read failed. The watcher keeps its last view and retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Consul(#[from] ConsulError),
    /// Consul left out keys the ACL token may not read; the answer is not applied.
    #[error("the ACL token may not read every key under {target} (Consul filtered the answer); it needs key_prefix \"{target}\" read")]
    Filtered { target: String },
}

/// A KV watch: the state machine and the Consul client it reads with.
#[derive(Debug)]
pub struct KvWatcher {
    client: Client,
    target: Target,
    watch: KvWatch,
    /// Do not read before this (a backoff or a pause under way).
    not_before: Option<Instant>,
}

impl KvWatcher {
    /// Watches every key under `prefix`.
    pub fn prefix(client: Client, prefix: impl Into<String>, config: WatchConfig) -> Self {
        Self::new(client, Target::Prefix(prefix.into()), config)
    }

    /// Watches one key.
    pub fn key(client: Client, key: impl Into<String>, config: WatchConfig) -> Self {
        Self::new(client, Target::Key(key.into()), config)
    }

    fn new(client: Client, target: Target, config: WatchConfig) -> Self {
        KvWatcher {
            client,
            target,
            watch: KvWatch::new(config),
            not_before: None,
        }
    }

    /// The prefix or key watched.
    pub fn target(&self) -> &str {
        match &self.target {
            Target::Prefix(p) | Target::Key(p) => p,
        }
    }

    /// Consecutive failed reads.
    pub fn failures(&self) -> u32 {
        self.watch.failures()
    }

    /// How long until the next read (the backoff after an error).
    pub fn retry_in(&self) -> Duration {
        self.not_before
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// Waits for the next change. Wake-ups that changed nothing are not returned (except the
    /// first success after errors); an error is, and the next call first waits out its backoff.
    pub async fn changed(&mut self) -> Result<Changes, WatchError> {
        loop {
            if let Some(t) = self.not_before {
                tokio::time::sleep_until(t).await;
                self.not_before = None;
            }
            let next = self.watch.next();
            let wait = self.watch.config().wait;
            let read = match &self.target {
                Target::Prefix(p) => self.client.kv_list(p, next.index, wait).await,
                Target::Key(k) => self
                    .client
                    .kv_watch_key(k, next.index, wait)
                    .await
                    .map(|r| Indexed {
                        index: r.index,
                        value: r.value.into_iter().collect(),
                        filtered_by_acls: r.filtered_by_acls,
                    }),
            };
            let first = !self.watch.is_synced();
            let recovered = self.watch.failures() > 0;
            let outcome = match read {
                Ok(answer) => self
                    .watch
                    .on_response(answer)
                    .map_err(|_| WatchError::Filtered {
                        target: self.target().to_string(),
                    }),
                Err(e) => {
                    self.watch.on_error();
                    Err(WatchError::Consul(e))
                }
            };
            let delay = self.watch.next().delay;
            self.not_before = (!delay.is_zero()).then(|| Instant::now() + delay);
            match outcome {
                Ok(events) if events.is_empty() && !first && !recovered => continue,
                Ok(events) => {
                    return Ok(Changes {
                        events,
                        first,
                        recovered,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }
}

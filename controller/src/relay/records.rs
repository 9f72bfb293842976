//! Records under one Consul KV prefix (revocations, bootstrap tokens), decoded and kept up to
//! date on the shared watch driver. While Consul cannot be read, the last records stay in force.
//! A record that does not decode never drops what it said before (if it decoded once): that
//! stays in force, and the key at fault is named (the component is degraded) until it is fixed.

use std::collections::BTreeMap;
use std::fmt::Display;

use tracing::{info, warn};
use vmesh_consul::{Client, KvEntry, KvWatcher, WatchConfig, WatchEvent};
use vmesh_runtime::Component;

pub struct WatchedRecords<T> {
    watcher: KvWatcher,
    /// What the records are, for the log ("revoked agents").
    what: &'static str,
    records: BTreeMap<String, T>,
    /// Keys whose record does not decode now, with why.
    corrupt: BTreeMap<String, String>,
}

impl<T> WatchedRecords<T> {
    pub fn new(client: Client, prefix: String, what: &'static str) -> Self {
        WatchedRecords {
            watcher: KvWatcher::prefix(client, prefix, WatchConfig::default()),
            what,
            records: BTreeMap::new(),
            corrupt: BTreeMap::new(),
        }
    }

    /// Waits until the records changed (read errors are logged, marked on `component` and
    /// retried with the driver's backoff), decoding each new value with `decode`.
    pub async fn changed<E: Display>(
        &mut self,
        decode: impl Fn(&KvEntry) -> Result<T, E>,
        component: &Component,
    ) {
        let changes = loop {
            match self.watcher.changed().await {
                Ok(changes) => break changes,
                Err(e) => {
                    if self.watcher.failures() == 1 {
                        warn!(error = %e, "cannot read {}; the last ones stay in force", self.what);
                    }
                    component.degraded(format!("cannot read {}: {e}", self.what));
                }
            }
        };
        if changes.recovered {
            info!("reading {} again", self.what);
        }
        for event in changes.events {
            match event {
                WatchEvent::Delete(key) => {
                    self.records.remove(&key);
                    self.corrupt.remove(&key);
                }
                WatchEvent::Upsert(entry) if entry.key.ends_with('/') => {}
                WatchEvent::Upsert(entry) => match decode(&entry) {
                    Ok(record) => {
                        self.corrupt.remove(&entry.key);
                        self.records.insert(entry.key, record);
                    }
                    Err(e) => {
                        warn!(key = %entry.key, error = %e, "a record of {} does not decode; what it said before stays in force", self.what);
                        self.corrupt.insert(entry.key, e.to_string());
                    }
                },
            }
        }
        match self.corrupt.values().next() {
            Some(e) => component.degraded(format!("{}: {e}", self.what)),
            None => component.ready(),
        }
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.records.values()
    }
}

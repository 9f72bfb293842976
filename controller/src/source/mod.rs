//! Config sources. Each one turns its backend's changes into [`SourceEvent`]s for the
//! index, and reports its health (for readiness and metrics) in a [`SourceHealth`].

pub mod consul;
pub mod dir;

use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::time::SystemTime;

use vmesh_model::{ObjectKey, ParsedSource, Problem};

/// One change to one source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A file was written: any number of documents, parsed by the source (off the index's
    /// path, so a slow document delays only its own source).
    File {
        source: String,
        parsed: ParsedSource,
    },
    /// A Consul KV value was written: exactly the object its key names, parsed by the source.
    KvValue {
        source: String,
        parsed: ParsedSource,
        /// The KV ModifyIndex this value was read at.
        revision: u64,
        /// The key's CreateIndex: of two objects claiming one domain, the older keeps it.
        created: u64,
    },
    /// A source that holds nothing usable, for a reason found before parsing (too large, not
    /// text, a key that names no object).
    Reject {
        source: String,
        key: Option<ObjectKey>,
        problem: Problem,
        /// The KV ModifyIndex and CreateIndex it was read at (Consul sources only).
        revision: Option<u64>,
        created: Option<u64>,
    },
    Remove {
        source: String,
    },
    /// Every service instance the agents report (the relay's discovery), replacing the last.
    Catalog(vmesh_model::Catalog),
    /// What the secret watcher knows of the secrets the config refers to, replacing the last.
    Secrets(std::collections::BTreeMap<String, vmesh_model::SecretEntry>),
}

/// A batch of changes, applied together. An empty batch says "the source is read, nothing changed".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceEvent {
    pub changes: Vec<Change>,
}

/// Whether a source can currently be read. While it cannot, the controller keeps
/// serving the last config it read and says it is degraded.
#[derive(Debug, Default)]
pub struct SourceHealth {
    inner: Mutex<Option<Degraded>>,
    up: Gauge,
    errors: Counter,
}

#[derive(Clone, Debug)]
pub struct Degraded {
    pub since: SystemTime,
    pub error: String,
    pub failures: u32,
}

impl SourceHealth {
    /// A health that also keeps these metrics: 1/0 for up, and a count of failed reads.
    pub fn new(up: Gauge, errors: Counter) -> Self {
        up.set(1);
        SourceHealth {
            inner: Mutex::new(None),
            up,
            errors,
        }
    }

    pub fn ok(&self) {
        *self.lock() = None;
        self.up.set(1);
    }

    pub fn failed(&self, error: String) {
        self.up.set(0);
        self.errors.inc();
        let mut d = self.lock();
        let failures = d.as_ref().map_or(0, |d| d.failures) + 1;
        let since = d.as_ref().map_or_else(SystemTime::now, |d| d.since);
        *d = Some(Degraded {
            since,
            error,
            failures,
        });
    }

    pub fn degraded(&self) -> Option<Degraded> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Degraded>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

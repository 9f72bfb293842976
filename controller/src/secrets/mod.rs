//! The secret watcher: reads the secrets the config refers to, from Vault KV v2 ([`vault`]) or
//! from a secrets directory ([`dir`], the embedded default), and gives the index what it knows
//! of each ([`store`]), whenever that changes.
//!
//! - The index says which secrets the config refers to; a name it adds is read at once (the
//!   index publishes nothing until each has been read or tried once), a name it drops is
//!   forgotten.
//! - While the source cannot be reached, every secret keeps what it had, the `secrets`
//!   component is degraded in `/readyz`, and `vmesh_secret_source_up` is 0.
//! - What is served is checked for expiry every minute.
//!
//! Secret material lives in memory only: never on the controller's disk, in a log line or in an
//! error (they name the secret and the field, never its content).

pub mod dir;
pub mod store;
pub mod vault;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};
use vmesh_runtime::{Component, Shutdown};

use crate::metrics::{Metrics, SecretRequestLabels};
use crate::source::{Change, SourceEvent};
use store::{SecretRead, SecretStore};

/// How often what is served is checked for expiry.
const RECHECK: Duration = Duration::from_secs(60);

/// Where secrets come from.
pub enum Backend {
    Dir(dir::DirBackend),
    Vault(vault::VaultBackend),
}

/// One read, with the request it took (for metrics).
pub struct Read {
    pub name: String,
    pub request: &'static str,
    pub result: SecretRead,
}

impl Backend {
    fn set_names(&mut self, names: &BTreeSet<String>) {
        match self {
            Backend::Dir(d) => d.set_names(names),
            Backend::Vault(v) => v.set_names(names),
        }
    }

    async fn next(&mut self) -> Vec<Read> {
        match self {
            Backend::Dir(d) => d.next().await,
            Backend::Vault(v) => v.next().await,
        }
    }

    fn describe(&self) -> String {
        match self {
            Backend::Dir(d) => format!("the secrets directory {}", d.dir().display()),
            Backend::Vault(v) => format!("Vault KV v2 at mount {:?}", v.mount()),
        }
    }
}

pub struct SecretWatcher {
    pub backend: Backend,
    pub names: watch::Receiver<BTreeSet<String>>,
    pub events: mpsc::Sender<SourceEvent>,
    pub component: Component,
    pub metrics: Arc<Metrics>,
}

fn result_label(read: &SecretRead) -> &'static str {
    match read {
        SecretRead::Found { .. } | SecretRead::Unchanged => "ok",
        SecretRead::Missing(_) => "not_found",
        SecretRead::Denied(_) => "denied",
        SecretRead::Unreachable(_) => "unreachable",
    }
}

impl SecretWatcher {
    pub async fn run(mut self, mut shutdown: Shutdown) -> anyhow::Result<()> {
        info!(source = %self.backend.describe(), "reading secrets");
        let mut store = SecretStore::default();
        let mut names = self.names.borrow_and_update().clone();
        self.backend.set_names(&names);
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Unreachable since (the first failure of a run of them).
        let mut down: Option<String> = None;
        // The index waits for each secret's first read itself; nothing to wait for here.
        self.component.ready();
        loop {
            let mut changed = false;
            tokio::select! {
                () = shutdown.requested() => return Ok(()),
                r = self.names.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    names = self.names.borrow_and_update().clone();
                    changed |= store.retain(&names);
                    self.backend.set_names(&names);
                }
                reads = self.backend.next() => {
                    let now = SystemTime::now();
                    for read in reads {
                        self.metrics
                            .secret_requests
                            .get_or_create(&SecretRequestLabels {
                                request: read.request,
                                result: result_label(&read.result),
                            })
                            .inc();
                        match &read.result {
                            SecretRead::Unreachable(e) => {
                                if down.is_none() {
                                    warn!(error = %e, "cannot reach the secret source; the secrets read before keep serving");
                                    self.metrics.secret_source_up.set(0);
                                    self.component.degraded(format!("cannot reach the secret source: {e}"));
                                }
                                down = Some(e.clone());
                            }
                            _ => {
                                if down.take().is_some() {
                                    info!("the secret source answers again");
                                }
                                self.metrics.secret_source_up.set(1);
                                self.component.ready();
                            }
                        }
                        if names.contains(&read.name) {
                            changed |= store.apply(&read.name, read.result, now);
                        }
                    }
                }
                _ = recheck.tick() => {
                    changed |= store.recheck(SystemTime::now());
                }
            }
            if changed {
                let entries = store.entries();
                let event = SourceEvent {
                    changes: vec![Change::Secrets(entries)],
                };
                if self.events.send(event).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

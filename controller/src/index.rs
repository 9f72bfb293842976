//! The index: the one writer of the controller's state.
//!
//! It applies source changes to the [`ConfigSet`], translates the result and
//! publishes two immutable values: every proxy's snapshot (read by the xDS
//! streams) and the whole translation (read by status, metrics and the NACK
//! reporter). Readers only ever see the latest; they never block the writer.
//! Bursts coalesce: everything queued when a translation starts goes into it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{debug, info};
use vmesh_model::{ConfigSet, Problem, SourceMode};
use vmesh_translate::Translation;
use vmesh_xds::server::{Snapshots, SnapshotsRx};

use crate::metrics::Metrics;
use crate::source::{Change, SourceEvent};

/// One published translation.
pub struct Published {
    /// Moves by one on every publication.
    pub generation: u64,
    pub translation: Translation,
    /// Problems that belong to no object (e.g. a file that is not YAML), by source.
    pub source_errors: BTreeMap<String, Vec<Problem>>,
    /// The KV ModifyIndex each source was read at (Consul sources only).
    pub revisions: BTreeMap<String, u64>,
    pub took: Duration,
}

/// The latest translation, `None` until the first one.
pub type PublishedRx = watch::Receiver<Option<Arc<Published>>>;

pub struct Index {
    set: ConfigSet,
    /// The KV ModifyIndex each keyed source was last read at.
    revisions: BTreeMap<String, u64>,
    snapshots: watch::Sender<Option<Arc<Snapshots>>>,
    published: watch::Sender<Option<Arc<Published>>>,
    metrics: Arc<Metrics>,
    /// What agents report, put into every config before translation.
    catalog: vmesh_model::Catalog,
    /// Whether to publish nothing until the first catalog arrives (set when the relay runs, so a
    /// restarted controller never serves Consul services without their endpoints).
    awaiting_catalog: bool,
}

impl Index {
    pub fn new(metrics: Arc<Metrics>) -> (Self, SnapshotsRx, PublishedRx) {
        let (snapshots, snapshots_rx) = watch::channel(None);
        let (published, published_rx) = watch::channel(None);
        let index = Index {
            set: ConfigSet::new(),
            revisions: BTreeMap::new(),
            snapshots,
            published,
            metrics,
            catalog: vmesh_model::Catalog::default(),
            awaiting_catalog: false,
        };
        (index, snapshots_rx, published_rx)
    }

    /// Publishes nothing until the first [`Change::Catalog`].
    pub fn await_catalog(mut self) -> Self {
        self.awaiting_catalog = true;
        self
    }

    /// Applies events until every source is gone.
    pub async fn run(mut self, mut events: mpsc::Receiver<SourceEvent>) {
        let mut generation = 0;
        while let Some(event) = events.recv().await {
            let mut changed = self.apply(event);
            while let Ok(more) = events.try_recv() {
                changed |= self.apply(more);
            }
            if (!changed && generation > 0) || self.awaiting_catalog {
                continue;
            }
            generation += 1;
            let mut config = self.set.snapshot();
            config.catalog = self.catalog.clone();
            let source_errors = config.source_errors.clone();
            let started = Instant::now();
            // Translation is CPU work; keep it off the async workers that serve proxies.
            let translation = match tokio::task::spawn_blocking(move || {
                vmesh_translate::translate(&config)
            })
            .await
            {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "translation panicked; keeping the last config");
                    continue;
                }
            };
            let took = started.elapsed();
            self.metrics.translated(took, &translation);
            self.publish(generation, translation, source_errors, took);
        }
    }

    fn apply(&mut self, event: SourceEvent) -> bool {
        let mut changed = false;
        for change in event.changes {
            changed |= match change {
                Change::Upsert { source, text } => {
                    self.set.upsert_source(&source, &text, SourceMode::MultiDoc)
                }
                Change::Object {
                    source,
                    key,
                    text,
                    revision,
                } => {
                    self.revisions.insert(source.clone(), revision);
                    self.set.upsert_keyed(&source, &key, &text)
                }
                Change::Reject {
                    source,
                    key,
                    problem,
                    revision,
                } => {
                    self.revisions.insert(source.clone(), revision);
                    self.set.reject_source(&source, key.as_ref(), problem)
                }
                Change::Remove { source } => {
                    self.revisions.remove(&source);
                    self.set.remove_source(&source)
                }
                Change::Catalog(catalog) => {
                    let first = std::mem::take(&mut self.awaiting_catalog);
                    let changed = catalog != self.catalog;
                    self.catalog = catalog;
                    changed || first
                }
            };
        }
        changed
    }

    fn publish(
        &self,
        generation: u64,
        translation: Translation,
        source_errors: BTreeMap<String, Vec<Problem>>,
        took: Duration,
    ) {
        let previous = self.snapshots.borrow().clone().unwrap_or_default();
        let mut next = Snapshots::new();
        let mut changed_proxies = 0;
        for (proxy, output) in &translation.proxies {
            // Keep the same Arc for an unchanged proxy so its streams skip it at once.
            match previous.get(proxy) {
                Some(old) if **old == output.snapshot => {
                    next.insert(proxy.clone(), old.clone());
                }
                _ => {
                    changed_proxies += 1;
                    next.insert(proxy.clone(), Arc::new(output.snapshot.clone()));
                }
            }
        }
        let removed = previous.keys().filter(|p| !next.contains_key(*p)).count();
        info!(
            generation,
            proxies = next.len(),
            changed = changed_proxies + removed,
            took_ms = took.as_secs_f64() * 1e3,
            "config translated"
        );
        if changed_proxies + removed > 0 || generation == 1 {
            self.snapshots.send_replace(Some(Arc::new(next)));
        } else {
            debug!("no proxy changed");
        }
        self.published.send_replace(Some(Arc::new(Published {
            generation,
            translation,
            source_errors,
            revisions: self.revisions.clone(),
            took,
        })));
    }
}

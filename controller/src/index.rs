//! The index: the one writer of the controller's state.
//!
//! It applies source changes to the [`ConfigSet`], translates the result and publishes two
//! immutable values: every proxy's snapshot (read by the xDS streams) and the whole translation
//! (read by status, metrics and the NACK reporter). Readers only ever see the latest; they never
//! block the writer.
//!
//! The rules live in [`IndexState`], which does no IO and is tested synchronously:
//! - bursts coalesce: everything queued when a translation starts goes into it;
//! - nothing is published while the relay's first catalog is awaited (a restarted controller
//!   never serves a Consul service without its endpoints);
//! - an unchanged proxy keeps the same `Arc` snapshot ([`next_snapshots`]), so its streams skip
//!   it at once, and nothing is sent to the streams when no proxy changed.
//!
//! [`Index::run`] only moves events in and translations out, and runs the translator off the
//! async workers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{debug, info};
use vmesh_model::{Catalog, Config, ConfigSet, Problem, SecretEntry, Secrets};
use vmesh_runtime::{Component, Shutdown};
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

/// What the index knows, and when it must translate. No IO.
#[derive(Debug, Default)]
pub struct IndexState {
    set: ConfigSet,
    /// The KV ModifyIndex each keyed source was last read at.
    revisions: BTreeMap<String, u64>,
    /// What agents report, put into every config before translation.
    catalog: Catalog,
    /// Publish nothing until the first catalog arrives.
    awaiting_catalog: bool,
    /// What the secret watcher reported, and why secrets may not be sent at all.
    secrets: Secrets,
    /// Whether a secret watcher runs. Without one, every secret is reported missing at once.
    secret_source: bool,
    /// The secrets the config refers to, as of the last translation attempt: what the secret
    /// watcher must read.
    wanted_secrets: BTreeSet<String>,
    /// Something changed since the last translation (or nothing was translated yet).
    dirty: bool,
    generation: u64,
}

impl IndexState {
    /// `awaiting_catalog`: publish nothing until the first [`Change::Catalog`] (set when the
    /// relay runs).
    pub fn new(awaiting_catalog: bool) -> Self {
        IndexState {
            awaiting_catalog,
            dirty: true,
            ..Default::default()
        }
    }

    /// Secrets come from a watcher (`source`), and may be sent to proxies unless `refused`
    /// says why not.
    pub fn with_secrets(mut self, source: bool, refused: Option<String>) -> Self {
        self.secret_source = source;
        self.secrets.refused = refused;
        self
    }

    /// The secrets the config refers to: what the secret watcher reads.
    pub fn wanted_secrets(&self) -> &BTreeSet<String> {
        &self.wanted_secrets
    }

    /// Applies one batch of changes.
    pub fn apply(&mut self, event: SourceEvent) {
        for change in event.changes {
            self.dirty |= match change {
                Change::File { source, parsed } => self.set.apply(&source, parsed),
                Change::KvValue {
                    source,
                    parsed,
                    revision,
                    created,
                } => {
                    self.revisions.insert(source.clone(), revision);
                    let claimed = self.set.set_created(&source, created);
                    self.set.apply(&source, parsed) | claimed
                }
                Change::Reject {
                    source,
                    key,
                    problem,
                    revision,
                    created,
                } => {
                    match revision {
                        Some(r) => self.revisions.insert(source.clone(), r),
                        None => self.revisions.remove(&source),
                    };
                    let claimed = created.is_some_and(|c| self.set.set_created(&source, c));
                    self.set.reject_source(&source, key.as_ref(), problem) | claimed
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
                Change::Secrets(entries) => {
                    let changed = entries != self.secrets.entries;
                    self.secrets.entries = entries;
                    changed
                }
            };
        }
    }

    /// The config to translate next, with its generation, if there is anything to translate:
    /// something changed (or nothing was published yet), no catalog is awaited, and every
    /// secret the config refers to has been read (or tried) once — so a restarted controller
    /// never serves a gateway without the certificates it had.
    pub fn next_translation(&mut self) -> Option<(u64, Config)> {
        if !self.dirty || self.awaiting_catalog {
            return None;
        }
        let mut config = self.set.snapshot();
        self.wanted_secrets = config.referenced_secrets();
        let mut secrets = self.secrets.clone();
        for name in &self.wanted_secrets {
            if secrets.entries.contains_key(name) {
                continue;
            }
            if self.secret_source {
                // Not read yet: wait for the watcher, which reads it now.
                return None;
            }
            secrets.entries.insert(
                name.clone(),
                SecretEntry {
                    problem: Some(
                        "no secret source: start the controller with --secrets-dir or --vault-addr"
                            .into(),
                    ),
                    ..Default::default()
                },
            );
        }
        secrets
            .entries
            .retain(|name, _| self.wanted_secrets.contains(name));
        self.dirty = false;
        self.generation += 1;
        config.catalog = self.catalog.clone();
        config.secrets = secrets;
        Some((self.generation, config))
    }

    /// The KV revisions of the sources, as of the last change applied.
    pub fn revisions(&self) -> &BTreeMap<String, u64> {
        &self.revisions
    }
}

/// The snapshots to publish after `translation`, given the `previous` ones: an unchanged proxy
/// keeps its `Arc`. Also returns how many proxies changed (added, changed or removed).
pub fn next_snapshots(previous: &Snapshots, translation: &Translation) -> (Snapshots, usize) {
    let mut next = Snapshots::new();
    let mut changed = 0;
    for (proxy, output) in &translation.proxies {
        match previous.get(proxy) {
            Some(old) if **old == output.snapshot => {
                next.insert(proxy.clone(), old.clone());
            }
            _ => {
                changed += 1;
                next.insert(proxy.clone(), Arc::new(output.snapshot.clone()));
            }
        }
    }
    changed += previous.keys().filter(|p| !next.contains_key(*p)).count();
    (next, changed)
}

/// The index task: [`IndexState`] fed by the sources, publishing to the readers.
pub struct Index {
    state: IndexState,
    snapshots: watch::Sender<Option<Arc<Snapshots>>>,
    published: watch::Sender<Option<Arc<Published>>>,
    /// The secrets the config refers to, for the secret watcher.
    secret_names: watch::Sender<BTreeSet<String>>,
    metrics: Arc<Metrics>,
    component: Component,
}

impl Index {
    /// `component` turns ready with the first publication.
    pub fn new(
        state: IndexState,
        metrics: Arc<Metrics>,
        component: Component,
    ) -> (Self, SnapshotsRx, PublishedRx) {
        let (snapshots, snapshots_rx) = watch::channel(None);
        let (published, published_rx) = watch::channel(None);
        if state.awaiting_catalog {
            component.starting("waiting for the relay's first catalog (discovery warm-up)");
        } else {
            component.starting("waiting for the first config read");
        }
        let index = Index {
            state,
            snapshots,
            published,
            secret_names: watch::channel(BTreeSet::new()).0,
            metrics,
            component,
        };
        (index, snapshots_rx, published_rx)
    }

    /// The names of the secrets the config refers to, as they change.
    pub fn secret_names(&self) -> watch::Receiver<BTreeSet<String>> {
        self.secret_names.subscribe()
    }

    /// Applies events until every source is gone or a shutdown is asked for.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        mut shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                () = shutdown.requested() => return Ok(()),
            };
            let Some(event) = event else {
                anyhow::ensure!(shutdown.is_requested(), "every config source stopped");
                return Ok(());
            };
            vmesh_runtime::test_panic("index");
            self.state.apply(event);
            while let Ok(more) = events.try_recv() {
                self.state.apply(more);
            }
            let next = self.state.next_translation();
            let wanted = self.state.wanted_secrets();
            self.secret_names.send_if_modified(|names| {
                let changed = names != wanted;
                if changed {
                    names.clone_from(wanted);
                }
                changed
            });
            let Some((generation, config)) = next else {
                continue;
            };
            let source_errors = config.source_errors.clone();
            let started = Instant::now();
            // Translation is CPU work; keep it off the async workers that serve proxies. A
            // translation that panics is a bug that would recur on every change: let it end
            // the process (the supervisor says why) rather than serve stale config silently.
            let translation =
                tokio::task::spawn_blocking(move || vmesh_translate::translate(&config))
                    .await
                    .map_err(|e| anyhow::anyhow!("translation panicked: {e}"))?;
            let took = started.elapsed();
            self.metrics.translated(took, &translation);
            self.publish(generation, translation, source_errors, took);
        }
    }

    fn publish(
        &self,
        generation: u64,
        translation: Translation,
        source_errors: BTreeMap<String, Vec<Problem>>,
        took: Duration,
    ) {
        let previous = self.snapshots.borrow().clone().unwrap_or_default();
        let (next, changed) = next_snapshots(&previous, &translation);
        info!(
            generation,
            proxies = next.len(),
            changed,
            took_ms = took.as_secs_f64() * 1e3,
            "config translated"
        );
        if changed > 0 || generation == 1 {
            self.snapshots.send_replace(Some(Arc::new(next)));
        } else {
            debug!("no proxy changed");
        }
        {
            let before = self.published.borrow();
            let before = before
                .as_deref()
                .map(|p| (&p.translation.reports, &p.source_errors));
            crate::object_log::log(&crate::object_log::lines(
                before,
                &translation.reports,
                &source_errors,
            ));
        }
        self.published.send_replace(Some(Arc::new(Published {
            generation,
            translation,
            source_errors,
            revisions: self.state.revisions().clone(),
            took,
        })));
        self.component.ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmesh_model::{Health, ServiceInstance};

    const GATEWAY: &str =
        "kind: Gateway\nname: edge\nspec:\n  bindPort: 10000\n  proxyNames: [gw-a]\n";

    fn file(source: &str, text: &str) -> SourceEvent {
        SourceEvent {
            changes: vec![Change::File {
                source: source.into(),
                parsed: vmesh_model::ParsedSource::file(text),
            }],
        }
    }

    fn upstream(name: &str, port: u16) -> String {
        format!(
            "kind: Upstream\nname: {name}\nspec:\n  static:\n    hosts:\n      - address: 127.0.0.1\n        port: {port}\n"
        )
    }

    fn vs(upstream: &str) -> String {
        format!(
            "kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - upstream: {upstream}\n"
        )
    }

    fn catalog(port: u16) -> Catalog {
        let mut c = Catalog::new();
        c.insert(
            "web",
            ServiceInstance {
                node: "vm-1".into(),
                datacenter: "dc1".into(),
                id: "web-1".into(),
                address: "10.0.0.1".into(),
                port,
                tags: vec![],
                health: Health::Passing,
            },
        );
        c
    }

    #[test]
    fn a_burst_of_changes_becomes_one_translation() {
        let mut s = IndexState::new(false);
        s.apply(file("gw.yaml", GATEWAY));
        s.apply(file("a.yaml", &upstream("a", 8081)));
        s.apply(file("web.yaml", &vs("a")));
        let (generation, config) = s.next_translation().expect("something to translate");
        assert_eq!(generation, 1);
        assert_eq!(
            (
                config.gateways.len(),
                config.upstreams.len(),
                config.virtual_services.len()
            ),
            (1, 1, 1),
            "all three in the one translation"
        );
        assert!(s.next_translation().is_none(), "nothing new since");
    }

    #[test]
    fn the_first_read_is_published_even_if_empty_and_no_change_is_not_translated() {
        let mut s = IndexState::new(false);
        s.apply(SourceEvent::default());
        assert_eq!(s.next_translation().map(|(g, _)| g), Some(1));
        s.apply(file("a.yaml", &upstream("a", 8081)));
        assert_eq!(s.next_translation().map(|(g, _)| g), Some(2));
        // The same file again (a rescan): no change, no translation.
        s.apply(file("a.yaml", &upstream("a", 8081)));
        assert!(s.next_translation().is_none());
    }

    #[test]
    fn nothing_is_published_until_the_relays_first_catalog() {
        let mut s = IndexState::new(true);
        s.apply(file("a.yaml", &upstream("a", 8081)));
        assert!(s.next_translation().is_none(), "awaiting the catalog");
        // The first catalog counts even if empty.
        s.apply(SourceEvent {
            changes: vec![Change::Catalog(Catalog::new())],
        });
        let (_, config) = s.next_translation().unwrap();
        assert_eq!(config.upstreams.len(), 1);
        // The same catalog again changes nothing; a new one does, and it is in the config.
        s.apply(SourceEvent {
            changes: vec![Change::Catalog(Catalog::new())],
        });
        assert!(s.next_translation().is_none());
        s.apply(SourceEvent {
            changes: vec![Change::Catalog(catalog(8080))],
        });
        let (_, config) = s.next_translation().unwrap();
        assert_eq!(config.catalog.instances("web").len(), 1);
    }

    fn tls_gateway(secret: &str) -> String {
        format!(
            "kind: Gateway\nname: https\nspec:\n  bindPort: 443\n  proxyNames: [gw-a]\n  tls:\n    certificates: [{{secret: {secret}}}]\n"
        )
    }

    fn secrets(names: &[&str]) -> SourceEvent {
        SourceEvent {
            changes: vec![Change::Secrets(
                names
                    .iter()
                    .map(|n| {
                        (
                            n.to_string(),
                            SecretEntry {
                                problem: Some("not found".into()),
                                ..Default::default()
                            },
                        )
                    })
                    .collect(),
            )],
        }
    }

    #[test]
    fn nothing_is_published_until_every_secret_referred_to_was_read_once() {
        let mut s = IndexState::new(false).with_secrets(true, None);
        s.apply(file("gw.yaml", &tls_gateway("tls/a")));
        assert!(s.next_translation().is_none(), "awaiting tls/a");
        assert_eq!(s.wanted_secrets().iter().collect::<Vec<_>>(), ["tls/a"]);
        s.apply(secrets(&["tls/a"]));
        let (_, config) = s.next_translation().expect("tls/a was read");
        assert!(config.secrets.entries.contains_key("tls/a"));
        // A new name waits again; a name no longer referred to is left out.
        s.apply(file("gw.yaml", &tls_gateway("tls/b")));
        assert!(s.next_translation().is_none(), "awaiting tls/b");
        s.apply(secrets(&["tls/a", "tls/b"]));
        let (_, config) = s.next_translation().unwrap();
        assert_eq!(config.secrets.entries.keys().collect::<Vec<_>>(), ["tls/b"]);
    }

    #[test]
    fn without_a_secret_source_every_secret_is_missing_at_once() {
        let mut s = IndexState::new(false).with_secrets(false, Some("plaintext".into()));
        s.apply(file("gw.yaml", &tls_gateway("tls/a")));
        let (_, config) = s.next_translation().expect("nothing to wait for");
        let entry = &config.secrets.entries["tls/a"];
        assert!(entry.problem.as_deref().unwrap().contains("--secrets-dir"));
        assert_eq!(config.secrets.refused.as_deref(), Some("plaintext"));
    }

    #[test]
    fn kv_revisions_follow_the_values_and_go_with_them() {
        let mut s = IndexState::new(false);
        s.apply(SourceEvent {
            changes: vec![Change::KvValue {
                source: "vmesh/config/Upstream/a".into(),
                parsed: vmesh_model::ParsedSource::keyed(
                    &vmesh_model::ObjectKey::upstream("a"),
                    &upstream("a", 8081),
                ),
                revision: 7,
                created: 7,
            }],
        });
        assert_eq!(s.revisions().get("vmesh/config/Upstream/a"), Some(&7));
        s.apply(SourceEvent {
            changes: vec![Change::Remove {
                source: "vmesh/config/Upstream/a".into(),
            }],
        });
        assert!(s.revisions().is_empty());
    }

    #[test]
    fn an_unchanged_proxy_keeps_its_snapshot_arc() {
        // gw-a serves web (and so upstream a); gw-b, when there, only a static virtual service.
        let translate = |upstream_port: u16, with_b: bool| {
            let mut s = IndexState::new(false);
            let mut text = format!(
                "{GATEWAY}  virtualServices: [web]\n---\n{}---\n{}---\n{STATIC}",
                upstream("a", upstream_port),
                vs("a")
            );
            if with_b {
                text.push_str("---\nkind: Gateway\nname: other\nspec:\n  bindPort: 10001\n  proxyNames: [gw-b]\n  virtualServices: [static]\n");
            }
            s.apply(file("all.yaml", &text));
            vmesh_translate::translate(&s.next_translation().unwrap().1)
        };
        const STATIC: &str = "kind: VirtualService\nname: static\nspec:\n  domains: [static.example.com]\n  routes:\n    - directResponse: {status: 200, body: ok}\n";
        let (first, changed) = next_snapshots(&Snapshots::new(), &translate(8081, true));
        assert_eq!(changed, 2, "two new proxies");
        // The same translation again: the same Arcs, nothing changed.
        let (same, changed) = next_snapshots(&first, &translate(8081, true));
        assert_eq!(changed, 0);
        assert!(Arc::ptr_eq(&same["gw-a"], &first["gw-a"]));
        // gw-a's upstream changes; gw-b's config does not: only gw-a gets a new Arc.
        let (next, changed) = next_snapshots(&same, &translate(8082, true));
        assert_eq!(changed, 1);
        assert!(!Arc::ptr_eq(&next["gw-a"], &same["gw-a"]));
        assert!(Arc::ptr_eq(&next["gw-b"], &same["gw-b"]));
        // gw-b goes away: a removal counts as a change, and gw-a keeps its Arc.
        let (last, changed) = next_snapshots(&next, &translate(8082, false));
        assert_eq!(changed, 1);
        assert!(!last.contains_key("gw-b"));
        assert!(Arc::ptr_eq(&last["gw-a"], &next["gw-a"]));
    }
}

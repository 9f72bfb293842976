//! The Consul KV source: a watch of `<prefix>/config/` on the shared driver ([`KvWatcher`]).
//! Each key `<prefix>/config/<Kind>/<name>` holds one object; only keys whose ModifyIndex moved
//! are re-parsed. While Consul cannot be read (or answers only in part, filtered by ACLs) the
//! last config read keeps being served and the source reports itself degraded; when Consul is
//! back, only what really changed is applied.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};
use vmesh_consul::{Client, KvEntry, KvWatcher, WatchConfig, WatchEvent};
use vmesh_layout::Layout;
use vmesh_model::{Kind, ParsedSource, Problem};

use super::{Change, SourceEvent, SourceHealth};

pub struct ConsulSource {
    pub client: Client,
    pub layout: Layout,
    pub watch: WatchConfig,
    pub health: Arc<SourceHealth>,
}

/// How often the source checks that Consul answers at all, and how long it waits for the
/// answer: a Consul that takes requests and answers none (a blocking read cannot tell it from a
/// quiet one for minutes) makes the source degraded within the sum of the two.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

impl ConsulSource {
    /// Runs until `out` is closed.
    pub async fn run(self, out: mpsc::Sender<SourceEvent>) -> anyhow::Result<()> {
        let mut watcher =
            KvWatcher::prefix(self.client.clone(), self.layout.config_prefix(), self.watch);
        // The watch runs on its own, so that a probe can drop a read Consul hung on.
        let restart = Notify::new();
        let (reads_tx, mut reads) = mpsc::channel(1);
        let watching = async {
            loop {
                let read = tokio::select! {
                    r = watcher.changed() => (r, watcher.failures(), watcher.retry_in()),
                    () = restart.notified() => continue,
                };
                if reads_tx.send(read).await.is_err() {
                    return;
                }
            }
        };
        let handling = async {
            let mut probe = Box::pin(probe_after(self.client.clone(), PROBE_EVERY));
            // Whether Consul failed to answer the last probe, and the last watch read failed.
            let (mut unanswered, mut read_failed) = (false, false);
            // Until a first read, there is no "last config" to serve.
            let mut read_once = false;
            let serving = |read_once: bool| {
                if read_once {
                    "serving the last config read"
                } else {
                    "serving no config until Consul can be read"
                }
            };
            loop {
                tokio::select! {
                    Some((read, failures, retry_in)) = reads.recv() => {
                        match read {
                            Ok(changes) => {
                                unanswered = false;
                                read_failed = false;
                                read_once = true;
                                self.health.ok();
                                if changes.recovered {
                                    info!(changed = changes.events.len(), "Consul is reachable again");
                                }
                                // Parsing is CPU work (bounded per document): off the async
                                // workers, and off the index's path.
                                let layout = self.layout.clone();
                                let changes = tokio::task::spawn_blocking(move || {
                                    changes
                                        .events
                                        .into_iter()
                                        .filter_map(|e| to_change(&layout, e))
                                        .collect()
                                })
                                .await?;
                                if out.send(SourceEvent { changes }).await.is_err() {
                                    return Ok(());
                                }
                            }
                            Err(e) => {
                                read_failed = true;
                                warn!(
                                    error = %e,
                                    failures,
                                    retry_in_ms = retry_in.as_millis() as u64,
                                    "cannot read config from Consul; {}",
                                    serving(read_once)
                                );
                                self.health.failed(e.to_string());
                            }
                        }
                    }
                    answered = &mut probe => {
                        probe = Box::pin(probe_after(self.client.clone(), PROBE_EVERY));
                        match answered {
                            Err(e) => {
                                if !unanswered {
                                    warn!(
                                        error = %e,
                                        "Consul does not answer; the config source is degraded, {}",
                                        serving(read_once)
                                    );
                                }
                                unanswered = true;
                                self.health.failed(e.to_string());
                                // A read Consul took and never answers would hold the watch
                                // until its own timeout: start a new one.
                                restart.notify_one();
                            }
                            Ok(()) if unanswered => {
                                unanswered = false;
                                if !read_failed {
                                    info!("Consul answers again");
                                    self.health.ok();
                                }
                            }
                            Ok(()) => {}
                        }
                    }
                    () = out.closed() => return Ok(()),
                }
            }
        };
        tokio::select! {
            () = watching => Ok(()),
            r = handling => r,
        }
    }
}

/// Waits `delay`, then asks whether Consul answers at all.
async fn probe_after(client: Client, delay: Duration) -> Result<(), vmesh_consul::ConsulError> {
    tokio::time::sleep(delay).await;
    client.ping(PROBE_TIMEOUT).await
}

/// A KV change as a config change. Folder keys (ending in `/`) are not config.
fn to_change(layout: &Layout, event: WatchEvent) -> Option<Change> {
    match event {
        WatchEvent::Delete(key) => Some(Change::Remove { source: key }),
        WatchEvent::Upsert(entry) if entry.key.ends_with('/') => None,
        WatchEvent::Upsert(entry) => Some(upsert(layout, entry)),
    }
}

fn upsert(layout: &Layout, entry: KvEntry) -> Change {
    let source = entry.key.clone();
    let (revision, created) = (entry.modify_index, entry.create_index);
    let Some(key) = layout.parse_config_key(&entry.key) else {
        let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        return Change::Reject {
            source,
            key: None,
            problem: Problem::new(
                "",
                format!(
                    "{}: config keys are {}<Kind>/<name>, with Kind one of {}",
                    entry.key,
                    layout.config_prefix(),
                    kinds.join(", ")
                ),
            ),
            revision: Some(revision),
            created: Some(entry.create_index),
        };
    };
    // The same limits and words as a file of the config directory (vmesh_model::limits).
    match vmesh_model::limits::document_text(entry.value) {
        Ok(text) => Change::KvValue {
            source,
            parsed: ParsedSource::keyed(&key, &text),
            revision,
            created,
        },
        Err(problem) => Change::Reject {
            source,
            key: Some(key),
            problem,
            revision: Some(revision),
            created: Some(created),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &[u8]) -> KvEntry {
        KvEntry {
            key: key.into(),
            value: value.to_vec(),
            create_index: 1,
            modify_index: 1,
            lock_index: 0,
            flags: 0,
            session: None,
        }
    }

    #[test]
    fn values_become_changes_or_rejections() {
        let l = Layout::default();
        assert!(matches!(
            upsert(&l, entry("vmesh/config/Upstream/a", b"kind: Upstream")),
            Change::KvValue { .. }
        ));
        assert!(matches!(
            upsert(&l, entry("vmesh/config/Upstream/a", &[0xff, 0xfe])),
            Change::Reject { key: Some(_), .. }
        ));
        assert!(matches!(
            upsert(
                &l,
                entry(
                    "vmesh/config/Upstream/a",
                    &vec![b'x'; vmesh_model::limits::MAX_DOCUMENT_BYTES + 1]
                )
            ),
            Change::Reject { key: Some(_), .. }
        ));
        let Change::Reject {
            key: None, problem, ..
        } = upsert(&l, entry("vmesh/config/readme", b"hello"))
        else {
            panic!("a key that names no object is rejected under its own name");
        };
        assert!(
            problem.message.contains(
                "vmesh/config/<Kind>/<name>, with Kind one of Upstream, VirtualService, Gateway"
            ),
            "{problem}"
        );
        assert_eq!(
            to_change(&l, WatchEvent::Upsert(entry("vmesh/config/Upstream/", b""))),
            None
        );
    }
}

//! The Consul KV source: a watch of `<prefix>/config/` on the shared driver ([`KvWatcher`]).
//! Each key `<prefix>/config/<Kind>/<name>` holds one object; only keys whose ModifyIndex moved
//! are re-parsed. While Consul cannot be read (or answers only in part, filtered by ACLs) the
//! last config read keeps being served and the source reports itself degraded; when Consul is
//! back, only what really changed is applied.

use std::sync::Arc;

use tokio::sync::mpsc;
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

impl ConsulSource {
    /// Runs until `out` is closed.
    pub async fn run(self, out: mpsc::Sender<SourceEvent>) -> anyhow::Result<()> {
        let mut watcher = KvWatcher::prefix(self.client, self.layout.config_prefix(), self.watch);
        loop {
            let changed = tokio::select! {
                r = watcher.changed() => r,
                _ = out.closed() => return Ok(()),
            };
            match changed {
                Ok(changes) => {
                    self.health.ok();
                    if changes.recovered {
                        info!(changed = changes.events.len(), "Consul is reachable again");
                    }
                    // Parsing is CPU work (bounded per document): off the async workers, and
                    // off the index's path.
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
                    warn!(
                        error = %e,
                        failures = watcher.failures(),
                        retry_in_ms = watcher.retry_in().as_millis() as u64,
                        "cannot read config from Consul; serving the last config read"
                    );
                    self.health.failed(e.to_string());
                }
            }
        }
    }
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

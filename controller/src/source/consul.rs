//! The Consul KV source: one blocking recurse query on `<prefix>/config/`, driven by
//! the [`KvWatch`] state machine. Each key `<prefix>/config/<Kind>/<name>` holds one
//! object; only keys whose ModifyIndex moved are re-parsed. While Consul cannot be
//! read, the last config read keeps being served and the source reports itself
//! degraded; when Consul is back, only what really changed is applied.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tracing::{info, warn};
use vmesh_consul::{Client, ConsulError, KvEntry, KvWatch, WatchConfig, WatchEvent};
use vmesh_model::{is_valid_name, Kind, ObjectKey, Problem};

use super::{Change, SourceEvent, SourceHealth};

/// Consul's default value limit; a larger value (a Consul configured to allow it) is refused.
pub const MAX_VALUE_BYTES: usize = 512 * 1024;

pub struct ConsulSource {
    pub client: Client,
    /// `vmesh` by default: config under `vmesh/config/`, status under `vmesh/status/`.
    pub prefix: String,
    pub watch: WatchConfig,
    pub health: Arc<SourceHealth>,
}

impl ConsulSource {
    pub fn config_prefix(&self) -> String {
        format!("{}/config/", self.prefix)
    }

    /// Runs until `out` is closed.
    pub async fn run(self, out: mpsc::Sender<SourceEvent>) {
        let prefix = self.config_prefix();
        let mut watch = KvWatch::new(self.watch.clone());
        loop {
            let next = watch.next();
            if !next.delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(next.delay) => {}
                    _ = out.closed() => return,
                }
            }
            let read = tokio::select! {
                r = self.client.kv_list(&prefix, next.index, watch.config().wait) => r,
                _ = out.closed() => return,
            };
            // An answer Consul filtered is a partial view: applying it would drop every
            // object the token may not read. Keep the last config and say why.
            let read = read.and_then(|answer| {
                if answer.filtered_by_acls {
                    Err(ConsulError::Status {
                        status: 403,
                        message: format!(
                            "the ACL token may not read every key under {prefix} (Consul filtered the answer); it needs key_prefix \"{prefix}\" read"
                        ),
                    })
                } else {
                    Ok(answer)
                }
            });
            match read {
                Ok(answer) => {
                    let first = !watch.is_synced();
                    let recovered = !watch.is_healthy() && !first;
                    let events = watch.on_response(answer);
                    self.health.ok();
                    if recovered {
                        info!(changed = events.len(), "Consul is reachable again");
                    }
                    if events.is_empty() && !first {
                        continue;
                    }
                    let changes = events
                        .into_iter()
                        .filter_map(|e| to_change(&prefix, e))
                        .collect();
                    if out.send(SourceEvent { changes }).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    watch.on_error(jitter());
                    warn!(
                        error = %e,
                        failures = watch.failures(),
                        retry_in_ms = watch.next().delay.as_millis() as u64,
                        "cannot read config from Consul; serving the last config read"
                    );
                    self.health.failed(e.to_string());
                }
            }
        }
    }
}

/// A KV change as a config change. Folder keys (ending in `/`) are not config.
fn to_change(prefix: &str, event: WatchEvent) -> Option<Change> {
    match event {
        WatchEvent::Delete(key) => Some(Change::Remove { source: key }),
        WatchEvent::Upsert(entry) if entry.key.ends_with('/') => None,
        WatchEvent::Upsert(entry) => Some(upsert(prefix, entry)),
    }
}

fn upsert(prefix: &str, entry: KvEntry) -> Change {
    let source = entry.key.clone();
    let revision = entry.modify_index;
    let Some(key) = object_key(prefix, &entry.key) else {
        return Change::Reject {
            source,
            key: None,
            problem: Problem::new(
                "",
                format!("{}: config keys are {prefix}<Kind>/<name>, with Kind one of Upstream, VirtualService, Gateway", entry.key),
            ),
            revision,
        };
    };
    if entry.value.len() > MAX_VALUE_BYTES {
        return Change::Reject {
            source,
            key: Some(key),
            problem: Problem::new(
                "",
                format!(
                    "the value is {} KiB; the limit is {} KiB",
                    entry.value.len() / 1024,
                    MAX_VALUE_BYTES / 1024
                ),
            ),
            revision,
        };
    }
    match String::from_utf8(entry.value) {
        Ok(text) => Change::Object {
            source,
            key,
            text,
            revision,
        },
        Err(_) => Change::Reject {
            source,
            key: Some(key),
            problem: Problem::new("", "the value is not UTF-8 text (YAML or JSON expected)"),
            revision,
        },
    }
}

/// `<prefix><Kind>/<name>` → the object it names.
pub fn object_key(prefix: &str, key: &str) -> Option<ObjectKey> {
    let rest = key.strip_prefix(prefix)?;
    let (kind, name) = rest.split_once('/')?;
    let kind = Kind::parse(kind)?;
    is_valid_name(name).then(|| ObjectKey::new(kind, name))
}

/// A number in [0, 1) that differs between processes and calls, for backoff jitter.
fn jitter() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mixed = (u64::from(nanos) ^ (u64::from(std::process::id()) << 16))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> 11) as f64 / (1u64 << 53) as f64
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
    fn keys_name_objects() {
        let p = "vmesh/config/";
        assert_eq!(
            object_key(p, "vmesh/config/VirtualService/shop"),
            Some(ObjectKey::virtual_service("shop"))
        );
        assert_eq!(object_key(p, "vmesh/config/Nope/shop"), None);
        assert_eq!(object_key(p, "vmesh/config/Upstream/a/b"), None);
        assert_eq!(object_key(p, "vmesh/config/Upstream/"), None);
        assert_eq!(object_key(p, "other/config/Upstream/a"), None);
    }

    #[test]
    fn values_become_changes_or_rejections() {
        let p = "vmesh/config/";
        assert!(matches!(
            upsert(p, entry("vmesh/config/Upstream/a", b"kind: Upstream")),
            Change::Object { .. }
        ));
        assert!(matches!(
            upsert(p, entry("vmesh/config/Upstream/a", &[0xff, 0xfe])),
            Change::Reject { key: Some(_), .. }
        ));
        assert!(matches!(
            upsert(
                p,
                entry("vmesh/config/Upstream/a", &vec![b'x'; MAX_VALUE_BYTES + 1])
            ),
            Change::Reject { key: Some(_), .. }
        ));
        assert!(matches!(
            upsert(p, entry("vmesh/config/readme", b"hello")),
            Change::Reject { key: None, .. }
        ));
        assert_eq!(
            to_change(p, WatchEvent::Upsert(entry("vmesh/config/Upstream/", b""))),
            None
        );
    }

    #[test]
    fn jitter_is_in_range() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }
}

//! The deny list: revoked agents, watched in Consul KV (`<prefix>/revoked/`) on the shared watch
//! driver and handed to the hub, which cuts their streams and drops their services at once.
//! While Consul cannot be read, the last list stays in force.

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{info, warn};
use vmesh_consul::{KvWatcher, WatchConfig, WatchEvent};
use vmesh_registry::{deny_list, Registry, Revocation};
use vmesh_runtime::{Component, Shutdown};

use super::hub::Hub;

pub async fn watch(
    registry: Registry,
    hub: Arc<Hub>,
    component: Component,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut watcher = KvWatcher::prefix(
        registry.client().clone(),
        registry.layout().revoked_prefix(),
        WatchConfig::default(),
    );
    let mut revocations: BTreeMap<String, Revocation> = BTreeMap::new();
    // Keys whose record does not decode now, with why.
    let mut corrupt: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let changed = tokio::select! {
            r = watcher.changed() => r,
            () = shutdown.requested() => return Ok(()),
        };
        let changes = match changed {
            Ok(changes) => changes,
            Err(e) => {
                if watcher.failures() == 1 {
                    warn!(error = %e, "cannot read revoked agents; the last list stays in force");
                }
                component.degraded(format!("cannot read revoked agents: {e}"));
                continue;
            }
        };
        if changes.recovered {
            info!("reading revoked agents again");
        }
        // A record that does not decode never shortens the list: what it said before (if it
        // decoded once) stays in force, and the key at fault is named until it is fixed.
        for event in changes.events {
            match event {
                WatchEvent::Delete(key) => {
                    revocations.remove(&key);
                    corrupt.remove(&key);
                }
                WatchEvent::Upsert(entry) if entry.key.ends_with('/') => {}
                WatchEvent::Upsert(entry) => match registry.decode_revocation(&entry) {
                    Ok(r) => {
                        corrupt.remove(&entry.key);
                        revocations.insert(entry.key, r);
                    }
                    Err(e) => {
                        warn!(error = %e, "a revocation record does not decode; what it said before stays in force");
                        corrupt.insert(entry.key, e.to_string());
                    }
                },
            }
        }
        match corrupt.values().next() {
            Some(e) => component.degraded(format!("revoked agents: {e}")),
            None => component.ready(),
        }
        let list: Vec<Revocation> = revocations.values().cloned().collect();
        hub.set_deny(deny_list(&list));
    }
}

//! Discovery shared with the other replicas through Consul KV: this replica writes the records
//! of its agents (`<prefix>/discovery/<dc>/<node>/<replica>`, under its session) and reads every
//! replica's. The records and the rules for reading them are `vmesh_relay::replicas`; these
//! tasks only move them in and out of Consul.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};
use vmesh_consul::{Client, KvWatcher, WatchConfig, WatchEvent, WriteOptions};
use vmesh_layout::Layout;
use vmesh_relay::replicas::record_key;
use vmesh_relay::DiscoveryRecord;
use vmesh_retry::Backoff;
use vmesh_runtime::{Component, Shutdown};

use super::hub::Hub;

/// Writes this replica's records whenever an agent's discovery changes, under the replica's
/// session (none is written until there is one; all are written again under a new one).
pub async fn write_records(
    hub: Arc<Hub>,
    client: Client,
    layout: Layout,
    replica: String,
    mut session: watch::Receiver<Option<String>>,
    component: Component,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    component.ready();
    loop {
        let current = session.borrow().clone();
        if let Some(current) = current {
            let mut failed = Vec::new();
            let mut error = None;
            for (id, record) in hub.take_records() {
                let key = record_key(&layout, &id, &replica);
                let written = match &record {
                    Some(r) => match serde_json::to_vec(r) {
                        Ok(value) => {
                            let options = WriteOptions {
                                acquire: Some(current.clone()),
                                ..WriteOptions::default()
                            };
                            client.kv_put(&key, value, &options).await
                        }
                        Err(e) => {
                            warn!(%key, error = %e, "cannot encode a discovery record");
                            continue;
                        }
                    },
                    None => client.kv_delete(&key, None).await,
                };
                match written {
                    Ok(true) => {}
                    // The session is gone; a new one rewrites everything.
                    Ok(false) => failed.push(id),
                    Err(e) => {
                        error.get_or_insert(e);
                        failed.push(id);
                    }
                }
            }
            if !failed.is_empty() {
                let retry_in = backoff.next_delay();
                if backoff.attempts() == 1 {
                    match &error {
                        Some(e) => {
                            warn!(error = %e, "cannot share discovery with the other replicas; retrying")
                        }
                        None => warn!("cannot share discovery under this session; retrying"),
                    }
                }
                component.degraded(match &error {
                    Some(e) => format!("cannot share discovery with the other replicas: {e}"),
                    None => "cannot share discovery under this session".to_string(),
                });
                hub.retry_records(failed);
                tokio::select! {
                    () = tokio::time::sleep(retry_in) => continue,
                    () = shutdown.requested() => return Ok(()),
                }
            }
            if backoff.attempts() > 0 {
                info!("sharing discovery with the other replicas again");
                backoff.reset();
                component.ready();
            }
        }
        tokio::select! {
            biased;
            () = shutdown.requested() => return Ok(()),
            () = hub.records_changed() => {}
            changed = session.changed() => {
                // The election ended (a shutdown, or the process ends for it anyway).
                if changed.is_err() {
                    return Ok(());
                }
                hub.rewrite_records();
            }
        }
    }
}

/// Reads every replica's records (a watch of `<prefix>/discovery/`) into the hub. While Consul
/// cannot be read (or answers only in part), what was read last stands.
pub async fn read_records(
    hub: Arc<Hub>,
    client: Client,
    layout: Layout,
    component: Component,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut watcher = KvWatcher::prefix(client, layout.discovery_prefix(), WatchConfig::default());
    let mut records: BTreeMap<String, DiscoveryRecord> = BTreeMap::new();
    loop {
        let changed = tokio::select! {
            r = watcher.changed() => r,
            () = shutdown.requested() => return Ok(()),
        };
        match changed {
            Ok(changes) => {
                if changes.recovered {
                    info!("reading the other replicas' discovery again");
                }
                component.ready();
                for event in changes.events {
                    match event {
                        WatchEvent::Delete(key) => {
                            records.remove(&key);
                        }
                        WatchEvent::Upsert(entry) => {
                            match serde_json::from_slice::<DiscoveryRecord>(&entry.value) {
                                Ok(r) => {
                                    records.insert(entry.key, r);
                                }
                                Err(e) => {
                                    warn!(key = %entry.key, error = %e, "ignoring a discovery record that does not decode");
                                    records.remove(&entry.key);
                                }
                            }
                        }
                    }
                }
                hub.set_remote(records.values().cloned().collect());
            }
            Err(e) => {
                if watcher.failures() == 1 {
                    warn!(error = %e, "cannot read the other replicas' discovery; keeping what was read");
                }
                component.degraded(format!("cannot read the other replicas' discovery: {e}"));
            }
        }
    }
}

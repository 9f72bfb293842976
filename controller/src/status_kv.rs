//! Writes every object's status to `<prefix>/status/<Kind>/<name>` in Consul KV, as
//! JSON, never into the user's own key. Only the leader writes; it writes a key only
//! when its content changed, always with CAS (so two writers never overwrite each
//! other blindly), and removes the status of objects that are gone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};
use vmesh_consul::{Client, ConsulError, WriteOptions};
use vmesh_xds::server::Connections;

use crate::index::PublishedRx;
use crate::status::{object_statuses, NackLog};

/// Coalesces bursts (a change, then an ACK from each proxy) into one round of writes.
const SETTLE: Duration = Duration::from_millis(50);
/// Retry pause after Consul refused or could not be reached.
const RETRY: Duration = Duration::from_secs(1);

pub struct StatusWriter {
    pub client: Client,
    /// `<prefix>/status/`
    pub prefix: String,
    pub leader: watch::Receiver<bool>,
    pub published: PublishedRx,
    pub connections: Arc<Connections>,
    pub nacks: Arc<NackLog>,
}

/// What is in Consul under the status prefix, by key: (ModifyIndex, value).
type Written = BTreeMap<String, (u64, Vec<u8>)>;

impl StatusWriter {
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut acks = self.connections.subscribe();
        // None: not loaded (not leader yet, or after a failure): read it before writing.
        let mut written: Option<Written> = None;
        loop {
            if *self.leader.borrow() && self.published.borrow().is_some() {
                match self.sync(&mut written).await {
                    Ok(()) => {}
                    Err(e) => {
                        warn!(error = %e, "cannot write status to Consul; retrying");
                        written = None;
                        tokio::select! {
                            _ = tokio::time::sleep(RETRY) => continue,
                            _ = shutdown.changed() => return,
                        }
                    }
                }
            } else {
                written = None;
            }
            tokio::select! {
                r = self.published.changed() => if r.is_err() { return },
                r = acks.changed() => if r.is_err() { return },
                r = self.leader.changed() => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(SETTLE) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Brings the status keys in line with the current statuses.
    async fn sync(&self, written: &mut Option<Written>) -> Result<(), ConsulError> {
        if written.is_none() {
            *written = Some(self.load().await?);
        }
        let Some(current) = written.as_mut() else {
            return Ok(());
        };
        let Some(published) = self.published.borrow().clone() else {
            return Ok(());
        };
        let statuses = object_statuses(&published, &self.connections.list(), &self.nacks);
        let mut desired = BTreeMap::new();
        for status in &statuses {
            let key = format!("{}{}/{}", self.prefix, status.kind, status.name);
            let body = serde_json::to_vec_pretty(status)
                .map_err(|e| ConsulError::Decode(e.to_string()))?;
            desired.insert(key, body);
        }
        let mut wrote = 0;
        let mut conflict = false;
        for (key, body) in &desired {
            let cas = match current.get(key) {
                Some((_, old)) if old == body => continue,
                Some((index, _)) => *index,
                None => 0,
            };
            let options = WriteOptions {
                cas: Some(cas),
                ..Default::default()
            };
            if self.client.kv_put(key, body.clone(), &options).await? {
                wrote += 1;
            } else {
                conflict = true;
            }
        }
        let gone: Vec<(String, u64)> = current
            .iter()
            .filter(|(k, _)| !desired.contains_key(*k))
            .map(|(k, (i, _))| (k.clone(), *i))
            .collect();
        for (key, index) in &gone {
            if !self.client.kv_delete(key, Some(*index)).await? {
                conflict = true;
            }
        }
        if wrote + gone.len() > 0 || conflict {
            debug!(wrote, removed = gone.len(), conflict, "status written");
            // Learn the new ModifyIndexes (and anything another writer did) for the next CAS.
            *current = self.load().await?;
        }
        Ok(())
    }

    async fn load(&self) -> Result<Written, ConsulError> {
        let answer = self
            .client
            .kv_list(&self.prefix, None, Duration::ZERO)
            .await?;
        Ok(answer
            .value
            .into_iter()
            .filter(|e| !e.key.ends_with('/'))
            .map(|e| (e.key, (e.modify_index, e.value)))
            .collect())
    }
}

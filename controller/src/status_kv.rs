//! Status in Consul KV.
//!
//! Every replica publishes what the proxies connected to it hold to
//! `<prefix>/replicas/<id>`, a key bound to its session (deleted by Consul when the
//! replica's session ends, so a dead replica's report does not linger). The leader
//! merges all of them and writes every object's status to
//! `<prefix>/status/<Kind>/<name>` as JSON, never into the user's own key: only when
//! its content changed, always with CAS (two writers never overwrite each other
//! blindly), and it removes the status of objects that are gone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};
use vmesh_consul::{Client, ConsulError, WriteOptions};
use vmesh_model::{Kind, ObjectKey};
use vmesh_xds::server::Connections;

use crate::index::PublishedRx;
use crate::status::{local_acks, merge_acks, object_statuses, Acks, NackLog};

/// Coalesces bursts (a change, then an ACK from each proxy, many changes in a row) into
/// one round of writes; status needs to be current, not instant.
const SETTLE: Duration = Duration::from_millis(250);
/// Retry pause after Consul refused or could not be reached.
const RETRY: Duration = Duration::from_secs(1);
/// How long a watch on the replicas' reports blocks.
const REPORTS_WAIT: Duration = Duration::from_secs(60);

pub struct StatusWriter {
    pub client: Client,
    /// e.g. `vmesh`
    pub prefix: String,
    /// This replica's id.
    pub id: String,
    /// The replica's Consul session, once it has one.
    pub session: watch::Receiver<Option<String>>,
    pub leader: watch::Receiver<bool>,
    pub published: PublishedRx,
    pub connections: Arc<Connections>,
    pub nacks: Arc<NackLog>,
}

/// What is in Consul under the status prefix, by key: (ModifyIndex, value).
type Written = BTreeMap<String, (u64, Vec<u8>)>;

impl StatusWriter {
    fn status_prefix(&self) -> String {
        format!("{}/status/", self.prefix)
    }

    fn reports_prefix(&self) -> String {
        format!("{}/replicas/", self.prefix)
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut acks_changed = self.connections.subscribe();
        let mut reports_changed = self.watch_reports(shutdown.clone());
        // None: not loaded (not leader yet, or after a failure): read it before writing.
        let mut written: Option<Written> = None;
        let mut reported: Option<(String, Vec<u8>)> = None;
        loop {
            if let Err(e) = self.round(&mut written, &mut reported).await {
                warn!(error = %e, "cannot write status to Consul; retrying");
                written = None;
                reported = None;
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => continue,
                    _ = shutdown.changed() => return,
                }
            }
            tokio::select! {
                r = self.published.changed() => if r.is_err() { return },
                r = acks_changed.changed() => if r.is_err() { return },
                r = self.leader.changed() => if r.is_err() { return },
                r = self.session.changed() => if r.is_err() { return },
                r = reports_changed.changed() => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(SETTLE) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn round(
        &self,
        written: &mut Option<Written>,
        reported: &mut Option<(String, Vec<u8>)>,
    ) -> Result<(), ConsulError> {
        let Some(published) = self.published.borrow().clone() else {
            return Ok(());
        };
        let mine = local_acks(&published, &self.connections.list());
        self.report(&mine, reported).await?;
        if !*self.leader.borrow() {
            *written = None;
            return Ok(());
        }
        let mut acks = mine;
        for (replica, theirs) in self.read_reports().await? {
            if replica != self.id {
                merge_acks(&mut acks, theirs);
            }
        }
        let statuses = object_statuses(&published, &acks, &self.nacks);
        let mut desired = BTreeMap::new();
        for status in &statuses {
            let key = format!("{}{}/{}", self.status_prefix(), status.kind, status.name);
            let body = serde_json::to_vec_pretty(status)
                .map_err(|e| ConsulError::Decode(e.to_string()))?;
            desired.insert(key, body);
        }
        self.sync(written, desired).await
    }

    /// Publishes what this replica's proxies hold, under its session, when it changed.
    async fn report(
        &self,
        acks: &Acks,
        reported: &mut Option<(String, Vec<u8>)>,
    ) -> Result<(), ConsulError> {
        let Some(session) = self.session.borrow().clone() else {
            return Ok(());
        };
        let wire: BTreeMap<&String, BTreeMap<String, &String>> = acks
            .iter()
            .map(|(proxy, objects)| {
                (
                    proxy,
                    objects.iter().map(|(k, v)| (k.to_string(), v)).collect(),
                )
            })
            .collect();
        let body = serde_json::to_vec(&wire).map_err(|e| ConsulError::Decode(e.to_string()))?;
        if reported.as_ref() == Some(&(session.clone(), body.clone())) {
            return Ok(());
        }
        let key = format!("{}{}", self.reports_prefix(), self.id);
        let options = WriteOptions {
            acquire: Some(session.clone()),
            ..Default::default()
        };
        if self.client.kv_put(&key, body.clone(), &options).await? {
            *reported = Some((session, body));
        }
        Ok(())
    }

    /// Every live replica's report, by replica id.
    async fn read_reports(&self) -> Result<BTreeMap<String, Acks>, ConsulError> {
        let answer = self
            .client
            .kv_list(&self.reports_prefix(), None, Duration::ZERO)
            .await?;
        let mut reports = BTreeMap::new();
        for entry in answer.value {
            // A report no session holds belongs to a replica that is gone.
            if entry.session.is_none() {
                continue;
            }
            let Some(id) = entry.key.strip_prefix(&self.reports_prefix()) else {
                continue;
            };
            let Ok(wire) =
                serde_json::from_slice::<BTreeMap<String, BTreeMap<String, String>>>(&entry.value)
            else {
                warn!(replica = id, "ignoring an unreadable replica report");
                continue;
            };
            let acks: Acks = wire
                .into_iter()
                .map(|(proxy, objects)| {
                    let objects = objects
                        .into_iter()
                        .filter_map(|(k, v)| Some((parse_key(&k)?, v)))
                        .collect();
                    (proxy, objects)
                })
                .collect();
            reports.insert(id.to_string(), acks);
        }
        Ok(reports)
    }

    /// A channel that moves whenever a replica's report changes.
    fn watch_reports(&self, mut shutdown: watch::Receiver<bool>) -> watch::Receiver<u64> {
        let (tx, rx) = watch::channel(0);
        let client = self.client.clone();
        let prefix = self.reports_prefix();
        tokio::spawn(async move {
            let mut index = None;
            loop {
                let read = tokio::select! {
                    r = client.kv_list(&prefix, index, REPORTS_WAIT) => r,
                    _ = shutdown.changed() => return,
                };
                match read {
                    Ok(answer) => {
                        if index.is_some_and(|i| i != answer.index) {
                            tx.send_modify(|n| *n += 1);
                        }
                        index = Some(answer.index.max(1));
                    }
                    Err(_) => {
                        index = None;
                        tokio::select! {
                            _ = tokio::time::sleep(RETRY) => {}
                            _ = shutdown.changed() => return,
                        }
                    }
                }
            }
        });
        rx
    }

    /// Brings the status keys in line with `desired`.
    async fn sync(
        &self,
        written: &mut Option<Written>,
        desired: BTreeMap<String, Vec<u8>>,
    ) -> Result<(), ConsulError> {
        if written.is_none() {
            *written = Some(self.load().await?);
        }
        let Some(current) = written.as_mut() else {
            return Ok(());
        };
        let mut wrote = Vec::new();
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
                wrote.push(key);
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
            if self.client.kv_delete(key, Some(*index)).await? {
                current.remove(key);
            } else {
                conflict = true;
            }
        }
        if !wrote.is_empty() || !gone.is_empty() || conflict {
            debug!(
                wrote = wrote.len(),
                removed = gone.len(),
                conflict,
                "status written"
            );
        }
        if conflict {
            // Someone else wrote: learn everything again before the next CAS.
            *current = self.load().await?;
        } else {
            // Learn the new ModifyIndex of just what was written, for the next CAS.
            for key in wrote {
                match self.client.kv_get(key).await? {
                    Some(e) => current.insert(key.clone(), (e.modify_index, e.value)),
                    None => current.remove(key),
                };
            }
        }
        Ok(())
    }

    async fn load(&self) -> Result<Written, ConsulError> {
        let answer = self
            .client
            .kv_list(&self.status_prefix(), None, Duration::ZERO)
            .await?;
        Ok(answer
            .value
            .into_iter()
            .filter(|e| !e.key.ends_with('/'))
            .map(|e| (e.key, (e.modify_index, e.value)))
            .collect())
    }
}

/// `Kind/name` → the key.
fn parse_key(text: &str) -> Option<ObjectKey> {
    let (kind, name) = text.split_once('/')?;
    Some(ObjectKey::new(Kind::parse(kind)?, name))
}

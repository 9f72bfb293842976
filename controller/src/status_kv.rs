//! Status in Consul KV.
//!
//! Every replica publishes what the proxies connected to it hold to `<prefix>/replicas/<id>`, a
//! key bound to its session (deleted by Consul when the replica's session ends, so a dead
//! replica's report does not linger). The leader merges all of them and writes every object's
//! status to `<prefix>/status/<Kind>/<name>` as JSON ([`vmesh_layout::ObjectStatus`]), never into
//! the user's own key.
//!
//! [`StatusSync`] holds the rules of writing: only what changed, always with CAS (two writers
//! never overwrite each other blindly), the status of removed objects deleted, and after a
//! conflict everything learned again before the next CAS. [`StatusWriter`] is the task: it wakes
//! on a new translation, an acknowledgement, a change of leadership or session, or another
//! replica's report, lets bursts settle, and retries with backoff while Consul refuses.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};
use vmesh_consul::{Client, ConsulError, Indexed, KvWatcher, WatchConfig, WriteOptions};
use vmesh_layout::{Layout, ReplicaReport};
use vmesh_retry::Backoff;
use vmesh_runtime::{Component, Shutdown};
use vmesh_xds::server::Connections;

use crate::index::PublishedRx;
use crate::status::{local_acks, object_statuses, NackLog};

/// Coalesces bursts (a change, then an ACK from each proxy, many changes in a row) into one
/// round of writes; status needs to be current, not instant.
const SETTLE: Duration = Duration::from_millis(250);
/// How long a watch on the replicas' reports blocks.
const REPORTS_WAIT: Duration = Duration::from_secs(60);

/// What is in Consul under the status prefix, by key: (ModifyIndex, value).
type Written = BTreeMap<String, (u64, Vec<u8>)>;

/// What one [`StatusSync::sync`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    pub written: usize,
    pub removed: usize,
    /// Another writer changed a key first; it is learned again before the next sync.
    pub conflict: bool,
    /// Keys Consul refused as too large (413): skipped, so they hold up no other key.
    pub too_large: Vec<String>,
}

/// Keeps `<prefix>/status/` in line with the desired statuses.
pub struct StatusSync {
    client: Client,
    layout: Layout,
    /// `None`: not loaded (never, or after a failure or a conflict): read before writing.
    written: Option<Written>,
}

impl StatusSync {
    pub fn new(client: Client, layout: Layout) -> Self {
        StatusSync {
            client,
            layout,
            written: None,
        }
    }

    /// Forgets what it knows of the keys (after a failure, or when not leading): the next sync
    /// reads them first.
    pub fn forget(&mut self) {
        self.written = None;
    }

    /// Brings the status keys in line with `desired` (key → JSON).
    pub async fn sync(
        &mut self,
        desired: BTreeMap<String, Vec<u8>>,
    ) -> Result<Synced, ConsulError> {
        let result = self.sync_inner(desired).await;
        if result.is_err() {
            self.written = None;
        }
        result
    }

    async fn sync_inner(
        &mut self,
        desired: BTreeMap<String, Vec<u8>>,
    ) -> Result<Synced, ConsulError> {
        let mut current = match self.written.take() {
            Some(w) => w,
            None => self.load().await?,
        };
        let mut wrote = Vec::new();
        let mut conflict = false;
        let mut too_large = Vec::new();
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
            match self.client.kv_put(key, body.clone(), &options).await {
                Ok(true) => wrote.push(key),
                Ok(false) => conflict = true,
                // One status too large for this Consul (its kv_max_value_size is below ours):
                // the others are still written.
                Err(ConsulError::Status { status: 413, .. }) => too_large.push(key.clone()),
                Err(e) => return Err(e),
            }
        }
        let gone: Vec<(String, u64)> = current
            .iter()
            .filter(|(k, _)| !desired.contains_key(*k))
            .map(|(k, (i, _))| (k.clone(), *i))
            .collect();
        let mut removed = 0;
        for (key, index) in &gone {
            if self.client.kv_delete(key, Some(*index)).await? {
                current.remove(key);
                removed += 1;
            } else {
                conflict = true;
            }
        }
        let synced = Synced {
            written: wrote.len(),
            removed,
            conflict,
            too_large,
        };
        if conflict {
            // Someone else wrote: learn everything again before the next CAS.
            current = self.load().await?;
        } else {
            // Learn the new ModifyIndex of just what was written, for the next CAS.
            for key in wrote {
                match self.client.kv_get(key).await? {
                    Some(e) => current.insert(key.clone(), (e.modify_index, e.value)),
                    None => current.remove(key),
                };
            }
        }
        self.written = Some(current);
        Ok(synced)
    }

    async fn load(&self) -> Result<Written, ConsulError> {
        let answer = complete(
            self.client
                .kv_list(&self.layout.status_prefix(), None, Duration::ZERO)
                .await?,
            &self.layout.status_prefix(),
        )?;
        Ok(answer
            .value
            .into_iter()
            .filter(|e| !e.key.ends_with('/'))
            .map(|e| (e.key, (e.modify_index, e.value)))
            .collect())
    }
}

/// An answer Consul filtered by ACLs would make keys look absent (CAS writes would conflict on
/// every round, replicas' proxies would go uncounted): it is an error naming the permission.
fn complete<T>(answer: Indexed<T>, prefix: &str) -> Result<Indexed<T>, ConsulError> {
    if answer.filtered_by_acls {
        return Err(ConsulError::Status {
            status: 403,
            message: format!(
                "the ACL token may not read every key under {prefix} (Consul filtered the answer); it needs key_prefix \"{prefix}\" read"
            ),
        });
    }
    Ok(answer)
}

pub struct StatusWriter {
    pub client: Client,
    pub layout: Layout,
    /// This replica's id.
    pub id: String,
    /// The replica's Consul session, once it has one.
    pub session: watch::Receiver<Option<String>>,
    pub leader: watch::Receiver<bool>,
    pub published: PublishedRx,
    pub connections: Arc<Connections>,
    pub nacks: Arc<NackLog>,
    /// Degraded while status cannot be written.
    pub component: Component,
}

impl StatusWriter {
    pub async fn run(mut self, mut shutdown: Shutdown) -> anyhow::Result<()> {
        let mut acks_changed = self.connections.subscribe();
        let mut reports = KvWatcher::prefix(
            self.client.clone(),
            self.layout.replicas_prefix(),
            WatchConfig {
                wait: REPORTS_WAIT,
                ..WatchConfig::default()
            },
        );
        let mut sync = StatusSync::new(self.client.clone(), self.layout.clone());
        let mut reported: Option<(String, Vec<u8>)> = None;
        // Short: status should be current again soon after Consul is.
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        self.component.ready();
        loop {
            match self.round(&mut sync, &mut reported).await {
                Ok(()) => {
                    backoff.reset();
                    self.component.ready();
                }
                Err(e) => {
                    sync.forget();
                    reported = None;
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot write status to Consul");
                    self.component
                        .degraded(format!("cannot write status to Consul: {e}"));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        () = shutdown.requested() => return Ok(()),
                    }
                }
            }
            // A closed channel means its sender's task ended: stop (when that was not a
            // shutdown, the supervisor ends the process for that task anyway).
            tokio::select! {
                biased;
                () = shutdown.requested() => return Ok(()),
                r = self.published.changed() => if r.is_err() { return Ok(()) },
                r = acks_changed.changed() => if r.is_err() { return Ok(()) },
                r = self.leader.changed() => if r.is_err() { return Ok(()) },
                r = self.session.changed() => if r.is_err() { return Ok(()) },
                // Errors of this watch back off inside it; either way, look again.
                _ = reports.changed() => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(SETTLE) => {}
                () = shutdown.requested() => return Ok(()),
            }
        }
    }

    async fn round(
        &self,
        sync: &mut StatusSync,
        reported: &mut Option<(String, Vec<u8>)>,
    ) -> Result<(), ConsulError> {
        let Some(published) = self.published.borrow().clone() else {
            return Ok(());
        };
        let mine = local_acks(&published, &self.connections.list());
        self.report(&mine, reported).await?;
        if !*self.leader.borrow() {
            sync.forget();
            return Ok(());
        }
        let mut acks = mine;
        for (replica, theirs) in self.read_reports().await? {
            if replica != self.id {
                acks.merge(theirs);
            }
        }
        let mut desired = BTreeMap::new();
        for status in object_statuses(&published, &acks, &self.nacks) {
            let Some(key) = status.key() else {
                continue;
            };
            let body = serde_json::to_vec_pretty(&status)
                .map_err(|e| ConsulError::Decode(e.to_string()))?;
            desired.insert(self.layout.status_key(&key), body);
        }
        let synced = sync.sync(desired).await?;
        if !synced.too_large.is_empty() {
            warn!(
                keys = ?synced.too_large,
                "Consul refused these status values as too large; the other keys are written"
            );
        }
        if synced != Synced::default() {
            debug!(
                wrote = synced.written,
                removed = synced.removed,
                conflict = synced.conflict,
                "status written"
            );
        }
        Ok(())
    }

    /// Publishes what this replica's proxies hold, under its session, when it changed.
    async fn report(
        &self,
        acks: &ReplicaReport,
        reported: &mut Option<(String, Vec<u8>)>,
    ) -> Result<(), ConsulError> {
        let Some(session) = self.session.borrow().clone() else {
            return Ok(());
        };
        let body = acks.to_json();
        if reported.as_ref() == Some(&(session.clone(), body.clone())) {
            return Ok(());
        }
        let options = WriteOptions {
            acquire: Some(session.clone()),
            ..Default::default()
        };
        if self
            .client
            .kv_put(&self.layout.replica_key(&self.id), body.clone(), &options)
            .await?
        {
            *reported = Some((session, body));
        }
        Ok(())
    }

    /// Every live replica's report, by replica id.
    async fn read_reports(&self) -> Result<BTreeMap<String, ReplicaReport>, ConsulError> {
        let answer = complete(
            self.client
                .kv_list(&self.layout.replicas_prefix(), None, Duration::ZERO)
                .await?,
            &self.layout.replicas_prefix(),
        )?;
        let mut reports = BTreeMap::new();
        for entry in answer.value {
            // A report no session holds belongs to a replica that is gone.
            if entry.session.is_none() {
                continue;
            }
            let Some(id) = self.layout.parse_replica_key(&entry.key) else {
                continue;
            };
            match ReplicaReport::from_json(&entry.value) {
                Ok(report) => {
                    reports.insert(id.to_string(), report);
                }
                Err(_) => warn!(replica = id, "ignoring an unreadable replica report"),
            }
        }
        Ok(reports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmesh_testkit::consul::ConsulEmulator;

    fn client(consul: &ConsulEmulator) -> Client {
        Client::at(&consul.url()).unwrap()
    }

    fn desired(entries: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        entries
            .iter()
            .map(|(k, v)| (format!("vmesh/status/{k}"), v.as_bytes().to_vec()))
            .collect()
    }

    #[tokio::test]
    async fn only_changes_are_written_and_removed_objects_lose_their_status() {
        let consul = ConsulEmulator::start();
        consul.kv_put("vmesh/status/Upstream/gone", "{}");
        consul.kv_put("vmesh/config/Upstream/a", "kind: Upstream");
        let mut sync = StatusSync::new(client(&consul), Layout::default());
        let want = desired(&[("Upstream/a", "1"), ("Upstream/b", "1")]);
        let done = sync.sync(want.clone()).await.unwrap();
        assert_eq!((done.written, done.removed, done.conflict), (2, 1, false));
        assert_eq!(consul.kv_get("vmesh/status/Upstream/a").unwrap(), b"1");
        assert!(consul.kv_get("vmesh/status/Upstream/gone").is_none());
        assert!(
            consul.kv_get("vmesh/config/Upstream/a").is_some(),
            "never the user's own keys"
        );

        // Nothing changed: nothing is written (the store's index does not move).
        let index = consul.index();
        assert_eq!(sync.sync(want).await.unwrap(), Synced::default());
        assert_eq!(consul.index(), index);

        // One changed: only it is written.
        let done = sync
            .sync(desired(&[("Upstream/a", "2"), ("Upstream/b", "1")]))
            .await
            .unwrap();
        assert_eq!(done.written, 1);
        assert_eq!(consul.kv_get("vmesh/status/Upstream/a").unwrap(), b"2");
    }

    #[tokio::test]
    async fn a_key_written_by_someone_else_is_never_overwritten_blindly() {
        let consul = ConsulEmulator::start();
        let mut sync = StatusSync::new(client(&consul), Layout::default());
        sync.sync(desired(&[("Upstream/a", "1")])).await.unwrap();
        // Another writer (a second leader for a moment) changes the key.
        consul.kv_put("vmesh/status/Upstream/a", "theirs");
        let done = sync.sync(desired(&[("Upstream/a", "2")])).await.unwrap();
        assert!(done.conflict, "the CAS failed");
        assert_eq!(
            consul.kv_get("vmesh/status/Upstream/a").unwrap(),
            b"theirs",
            "not overwritten"
        );
        // It learned the key again: the next sync writes with the right index.
        let done = sync.sync(desired(&[("Upstream/a", "2")])).await.unwrap();
        assert_eq!((done.written, done.conflict), (1, false));
        assert_eq!(consul.kv_get("vmesh/status/Upstream/a").unwrap(), b"2");
    }

    #[tokio::test]
    async fn after_a_failure_the_keys_are_read_again_before_writing() {
        let consul = ConsulEmulator::start();
        let mut sync = StatusSync::new(client(&consul), Layout::default());
        sync.sync(desired(&[("Upstream/a", "1")])).await.unwrap();
        consul.set_failing(true);
        assert!(sync.sync(desired(&[("Upstream/a", "2")])).await.is_err());
        consul.set_failing(false);
        // Meanwhile a key appeared that must go, and `a` changed under us.
        consul.kv_put("vmesh/status/Upstream/stale", "x");
        consul.kv_put("vmesh/status/Upstream/a", "theirs");
        let done = sync.sync(desired(&[("Upstream/a", "2")])).await.unwrap();
        assert_eq!((done.written, done.removed, done.conflict), (1, 1, false));
        assert_eq!(consul.kv_get("vmesh/status/Upstream/a").unwrap(), b"2");
    }

    #[tokio::test]
    async fn a_status_consul_refuses_as_too_large_holds_up_no_other_key() {
        let consul = ConsulEmulator::start_with(vmesh_testkit::consul::ConsulOptions {
            max_value_size: 1024,
            ..Default::default()
        });
        let mut sync = StatusSync::new(client(&consul), Layout::default());
        let big = "x".repeat(2048);
        let done = sync
            .sync(desired(&[
                ("Upstream/a", "1"),
                ("Upstream/big", &big),
                ("Upstream/z", "1"),
            ]))
            .await
            .unwrap();
        assert_eq!(done.too_large, ["vmesh/status/Upstream/big"]);
        assert_eq!(done.written, 2);
        assert_eq!(consul.kv_get("vmesh/status/Upstream/z").unwrap(), b"1");
    }
}

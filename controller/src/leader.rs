//! Leader election between controller replicas, through a Consul session and a lock
//! on `<prefix>/leader`. Every replica serves proxies; only the leader writes status.
//!
//! A replica creates a session (TTL, `delete` behaviour, a short lock delay), tries
//! to take the lock, and renews the session at a third of its TTL. A follower
//! watches the lock key and tries again as soon as it is free. Leadership is given
//! up when the session cannot be renewed within its TTL (Consul will have
//! invalidated it by then), and handed over cleanly on shutdown by destroying the
//! session, which releases the lock at once. With the `delete` behaviour, the keys a
//! session holds (the lock, the replica's report of its proxies) go when it ends.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};
use vmesh_consul::{Client, SessionRequest, WriteOptions};

pub struct Election {
    pub client: Client,
    /// `<prefix>/leader`
    pub key: String,
    /// Who we are, written into the lock key for operators to read.
    pub id: String,
    pub ttl: Duration,
    pub lock_delay: Duration,
}

impl Election {
    /// Runs until `shutdown` turns true; `leader` says whether this replica leads, and
    /// `session` which Consul session it holds.
    pub async fn run(
        self,
        leader: watch::Sender<bool>,
        session_out: watch::Sender<Option<String>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let request = SessionRequest {
                name: format!("vmesh-controller {}", self.id),
                ttl: format!("{}s", self.ttl.as_secs().max(1)),
                behavior: "delete".into(),
                lock_delay: format!("{}ms", self.lock_delay.as_millis()),
            };
            let session = match self.client.session_create(&request).await {
                Ok(id) => id,
                Err(e) => {
                    warn!(error = %e, "cannot create a Consul session for leader election");
                    set(&leader, false, &self.id);
                    if wait_or_shutdown(backoff, &mut shutdown).await {
                        return;
                    }
                    backoff = (backoff * 2).min(self.ttl);
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            session_out.send_replace(Some(session.clone()));
            let stopping = self.hold(&session, &leader, &mut shutdown).await;
            session_out.send_replace(None);
            if stopping {
                let _ = self.client.session_destroy(&session).await;
                set(&leader, false, &self.id);
                info!("leadership handed over");
                return;
            }
        }
    }

    /// Campaigns and leads with one session. Returns true on shutdown, false when the
    /// session is gone and a new one is needed.
    async fn hold(
        &self,
        session: &str,
        leader: &watch::Sender<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut renewed = Instant::now();
        let mut index = None;
        loop {
            let acquire = WriteOptions {
                acquire: Some(session.to_string()),
                ..Default::default()
            };
            match self
                .client
                .kv_put(&self.key, self.id.clone().into_bytes(), &acquire)
                .await
            {
                Ok(held) => set(leader, held, &self.id),
                Err(e) => {
                    warn!(error = %e, "cannot reach Consul for leader election");
                    if renewed.elapsed() >= self.ttl {
                        set(leader, false, &self.id);
                    }
                }
            }
            // Until it is time to renew: a leader sleeps; a follower watches the lock.
            let renew_at = renewed + self.ttl / 3;
            let until_renew = renew_at.saturating_duration_since(Instant::now());
            if *leader.borrow() {
                if wait_or_shutdown(until_renew, shutdown).await {
                    return true;
                }
            } else {
                let watched = tokio::select! {
                    r = self.client.kv_watch_key(&self.key, index, until_renew) => Some(r),
                    _ = shutdown.changed() => None,
                };
                match watched {
                    None => return true,
                    Some(Ok(answer)) => {
                        index = Some(answer.index.max(1));
                        let free = answer.value.is_none_or(|e| e.session.is_none());
                        if free {
                            // Released: it can be taken once the lock delay has passed.
                            if wait_or_shutdown(self.lock_delay, shutdown).await {
                                return true;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "cannot watch the leader key");
                        if wait_or_shutdown(Duration::from_millis(500).min(until_renew), shutdown)
                            .await
                        {
                            return true;
                        }
                    }
                }
            }
            if Instant::now() >= renew_at {
                match self.client.session_renew(session).await {
                    Ok(true) => renewed = Instant::now(),
                    Ok(false) => {
                        warn!("the Consul session was invalidated; starting a new one");
                        set(leader, false, &self.id);
                        return false;
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot renew the Consul session");
                        if renewed.elapsed() >= self.ttl {
                            set(leader, false, &self.id);
                            return false;
                        }
                    }
                }
            }
        }
    }
}

fn set(leader: &watch::Sender<bool>, value: bool, id: &str) {
    let changed = leader.send_if_modified(|l| std::mem::replace(l, value) != value);
    if changed {
        if value {
            info!(id, "became the leader: writing status");
        } else {
            info!(id, "not the leader: another replica writes status");
        }
    }
}

/// Sleeps for `d`; true if shutdown came first.
async fn wait_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.changed() => true,
    }
}

//! Leader election between controller replicas, through a Consul session and a lock on
//! `<prefix>/leader`. Every replica serves proxies; only the leader writes status.
//!
//! A replica creates a session (TTL, `delete` behaviour, a short lock delay), tries to take the
//! lock, and renews the session at a third of its TTL. A follower watches the lock key (on the
//! shared watch driver) and tries again as soon as it is free, once the lock delay has passed.
//! Leadership is given up when the session cannot be renewed within its TTL (Consul will have
//! invalidated it by then), and handed over cleanly on shutdown by destroying the session, which
//! releases the lock at once. With the `delete` behaviour, the keys a session holds (the lock,
//! the replica's report of its proxies, its discovery records) are deleted when it ends.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};
use vmesh_consul::{Client, KvWatcher, SessionRequest, WatchConfig, WatchEvent, WriteOptions};
use vmesh_retry::Backoff;
use vmesh_runtime::{Component, Shutdown};

pub struct Election {
    pub client: Client,
    /// `<prefix>/leader`
    pub key: String,
    /// Who we are, written into the lock key for operators to read.
    pub id: String,
    pub ttl: Duration,
    pub lock_delay: Duration,
    /// Degraded while Consul cannot be reached for the election.
    pub component: Component,
}

impl Election {
    /// Runs until a shutdown is asked for; `leader` says whether this replica leads, and
    /// `session_out` which Consul session it holds.
    pub async fn run(
        self,
        leader: watch::Sender<bool>,
        session_out: watch::Sender<Option<String>>,
        mut shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(200), self.ttl);
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
                    self.component
                        .degraded(format!("cannot create a Consul session: {e}"));
                    set(&leader, false, &self.id);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => continue,
                        () = shutdown.requested() => return Ok(()),
                    }
                }
            };
            backoff.reset();
            self.component.ready();
            session_out.send_replace(Some(session.clone()));
            let stopping = self.hold(&session, &leader, &mut shutdown).await;
            session_out.send_replace(None);
            if stopping {
                let _ = self.client.session_destroy(&session).await;
                set(&leader, false, &self.id);
                info!("leadership handed over");
                return Ok(());
            }
        }
    }

    /// Campaigns and leads with one session. Returns true on shutdown, false when the session
    /// is gone and a new one is needed.
    async fn hold(
        &self,
        session: &str,
        leader: &watch::Sender<bool>,
        shutdown: &mut Shutdown,
    ) -> bool {
        let mut renewed = Instant::now();
        // Paces the retries of a renewal that failed (the TTL has not run out yet).
        let mut retry = Backoff::new(Duration::from_millis(200), self.ttl / 3);
        // A blocking read never outlives a renewal.
        let mut lock = KvWatcher::key(
            self.client.clone(),
            &self.key,
            WatchConfig {
                wait: (self.ttl / 3).max(Duration::from_millis(100)),
                ..WatchConfig::default()
            },
        );
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
                Ok(held) => {
                    set(leader, held, &self.id);
                    self.component.ready();
                }
                Err(e) => {
                    warn!(error = %e, "cannot reach Consul for leader election");
                    self.component
                        .degraded(format!("cannot reach Consul for leader election: {e}"));
                    if renewed.elapsed() >= self.ttl {
                        set(leader, false, &self.id);
                    }
                }
            }
            // Until it is time to renew: a leader sleeps; a follower watches the lock.
            let renew_at = renewed + self.ttl / 3;
            let until_renew = tokio::time::sleep_until(renew_at.into());
            if *leader.borrow() {
                tokio::select! {
                    () = until_renew => {}
                    () = shutdown.requested() => return true,
                }
            } else {
                tokio::select! {
                    changed = lock.changed() => match changed {
                        Ok(changes) => {
                            let free = changes.events.iter().any(|e| match e {
                                WatchEvent::Delete(_) => true,
                                WatchEvent::Upsert(entry) => entry.session.is_none(),
                            }) || (changes.first && changes.events.is_empty());
                            if free {
                                // Released: it can be taken once the lock delay has passed.
                                tokio::select! {
                                    () = tokio::time::sleep(self.lock_delay) => {}
                                    () = shutdown.requested() => return true,
                                }
                            }
                        }
                        // The watch backs off by itself; the next turn tries again.
                        Err(e) => warn!(error = %e, "cannot watch the leader key"),
                    },
                    () = until_renew => {}
                    () = shutdown.requested() => return true,
                }
            }
            if Instant::now() >= renew_at {
                match self.client.session_renew(session).await {
                    Ok(true) => {
                        renewed = Instant::now();
                        retry.reset();
                    }
                    Ok(false) => {
                        warn!("the Consul session was invalidated; starting a new one");
                        set(leader, false, &self.id);
                        return false;
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot renew the Consul session");
                        self.component
                            .degraded(format!("cannot renew the Consul session: {e}"));
                        let left = self.ttl.saturating_sub(renewed.elapsed());
                        if left.is_zero() {
                            set(leader, false, &self.id);
                            return false;
                        }
                        // The renewal is overdue: try again soon, but not in a hot loop.
                        tokio::select! {
                            () = tokio::time::sleep(retry.next_delay().min(left)) => {}
                            () = shutdown.requested() => return true,
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

#[cfg(test)]
mod tests {
    use super::*;
    use vmesh_runtime::Supervisor;
    use vmesh_testkit::consul::{ConsulEmulator, ConsulOptions};

    const TTL: Duration = Duration::from_secs(3);
    const DEADLINE: Duration = Duration::from_secs(20);

    fn emulator() -> ConsulEmulator {
        ConsulEmulator::start_with(ConsulOptions {
            session_ttl_min: Duration::from_secs(1),
            ..Default::default()
        })
    }

    fn client(consul: &ConsulEmulator) -> Client {
        Client::at(&consul.url()).unwrap()
    }

    /// One replica campaigning: its leadership, its session, and the supervisor that stops it.
    struct Replica {
        leader: watch::Receiver<bool>,
        session: watch::Receiver<Option<String>>,
        stop: tokio::sync::oneshot::Sender<()>,
        done: tokio::task::JoinHandle<()>,
    }

    fn campaign(consul: &ConsulEmulator, id: &str) -> Replica {
        let mut supervisor = Supervisor::new();
        let election = Election {
            client: client(consul),
            key: "vmesh/leader".into(),
            id: id.into(),
            ttl: TTL,
            lock_delay: Duration::from_millis(100),
            component: supervisor.readiness().component("election"),
        };
        let (leader_tx, leader) = watch::channel(false);
        let (session_tx, session) = watch::channel(None);
        let shutdown = supervisor.shutdown();
        supervisor.spawn("election", election.run(leader_tx, session_tx, shutdown));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            let stop = async {
                let _ = stopped.await;
            };
            supervisor
                .run(stop, Duration::from_secs(5))
                .await
                .expect("the election ends only when asked to");
        });
        Replica {
            leader,
            session,
            stop,
            done,
        }
    }

    async fn until_leader(r: &mut Replica, leads: bool) {
        tokio::time::timeout(DEADLINE, r.leader.wait_for(|l| *l == leads))
            .await
            .expect("within the deadline")
            .unwrap();
    }

    #[tokio::test]
    async fn one_of_two_replicas_leads_and_the_other_takes_over_when_it_stops() {
        let consul = emulator();
        let mut a = campaign(&consul, "a");
        until_leader(&mut a, true).await;
        assert_eq!(consul.kv_get("vmesh/leader").unwrap(), b"a");
        let mut b = campaign(&consul, "b");
        tokio::time::timeout(DEADLINE, b.session.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap();
        // b holds a session and campaigns, but a keeps the lock (and renews it).
        tokio::time::sleep(TTL).await;
        assert!(*a.leader.borrow() && !*b.leader.borrow());

        // a stops: it destroys its session, the lock is freed and b takes it.
        a.stop.send(()).unwrap();
        a.done.await.unwrap();
        until_leader(&mut b, true).await;
        assert_eq!(consul.kv_get("vmesh/leader").unwrap(), b"b");
        b.stop.send(()).unwrap();
        b.done.await.unwrap();
        assert!(
            consul.kv_get("vmesh/leader").is_none(),
            "the key went with b's session"
        );
    }

    #[tokio::test]
    async fn a_leader_whose_session_is_invalidated_steps_down_and_campaigns_again() {
        let consul = emulator();
        let mut a = campaign(&consul, "a");
        until_leader(&mut a, true).await;
        let first = a.session.borrow().clone().unwrap();
        // An operator (or Consul, after a missed TTL) destroys the session.
        client(&consul).session_destroy(&first).await.unwrap();
        // It notices at its next renewal, and leads again under a new session.
        tokio::time::timeout(
            DEADLINE,
            a.session
                .wait_for(|s| s.as_ref().is_some_and(|s| *s != first)),
        )
        .await
        .unwrap()
        .unwrap();
        until_leader(&mut a, true).await;
        assert_eq!(consul.kv_get("vmesh/leader").unwrap(), b"a");
        a.stop.send(()).unwrap();
        a.done.await.unwrap();
    }

    #[tokio::test]
    async fn without_consul_nobody_leads_and_the_election_is_degraded() {
        let consul = emulator();
        consul.set_failing(true);
        let mut supervisor = Supervisor::new();
        let readiness = supervisor.readiness();
        let election = Election {
            client: client(&consul),
            key: "vmesh/leader".into(),
            id: "a".into(),
            ttl: TTL,
            lock_delay: Duration::from_millis(100),
            component: readiness.component("election"),
        };
        let (leader_tx, leader) = watch::channel(false);
        let (session_tx, _session) = watch::channel(None);
        let shutdown = supervisor.shutdown();
        supervisor.spawn("election", election.run(leader_tx, session_tx, shutdown));
        let run = tokio::spawn(supervisor.run(tokio::time::sleep(Duration::from_secs(1)), TTL));
        run.await.unwrap().unwrap();
        assert!(!*leader.borrow());
        let states = readiness.states();
        assert!(
            states[0]
                .1
                .to_string()
                .starts_with("degraded: cannot create a Consul session"),
            "{states:?}"
        );
    }
}

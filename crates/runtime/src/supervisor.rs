//! The supervised set of tasks.
//!
//! A binary's `run()` builds every component and hands each one's future to
//! [`Supervisor::spawn`], which runs it inside a span named after it. [`Supervisor::run`] then
//! waits for a stop signal or for any task to end. Every task is critical: one that returns or
//! panics before a shutdown was asked for is a component that no longer works, so the supervisor
//! logs which one and why, asks the others to stop, and returns [`TaskFailed`], which the binary
//! turns into a non-zero exit. The process supervisor (Nomad, systemd) then restarts it, rather
//! than a process that looks alive carrying on without, say, its index.
//!
//! Tasks learn that a shutdown was asked for through a [`Shutdown`] handle; they get
//! `grace` to finish (the leader hands over, servers drain) before the rest are aborted.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{Id, JoinError, JoinSet};
use tracing::{error, info, warn, Instrument as _};

use crate::readiness::Readiness;

/// A handle that says whether a shutdown was asked for.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Completes when a shutdown is asked for (or the supervisor is gone).
    pub async fn requested(&mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }

    /// The same, consuming the handle (for servers' graceful-shutdown futures).
    pub async fn wait(mut self) {
        self.requested().await;
    }

    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }
}

/// A critical task ended before a shutdown was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailed {
    pub task: &'static str,
    /// `panicked: ...`, `failed: ...` or `ended`.
    pub how: String,
}

impl fmt::Display for TaskFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "critical task {} {}", self.task, self.how)
    }
}

impl std::error::Error for TaskFailed {}

/// Every long-running task of a binary.
#[derive(Debug)]
pub struct Supervisor {
    tasks: JoinSet<anyhow::Result<()>>,
    names: HashMap<Id, &'static str>,
    shutdown: watch::Sender<bool>,
    readiness: Readiness,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    pub fn new() -> Self {
        Supervisor {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            shutdown: watch::channel(false).0,
            readiness: Readiness::new(),
        }
    }

    /// A handle for a task to learn that it should stop.
    pub fn shutdown(&self) -> Shutdown {
        Shutdown(self.shutdown.subscribe())
    }

    /// The readiness of this binary's components.
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Spawns critical task `name`, inside a span of that name.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let handle = self
            .tasks
            .spawn(task.instrument(tracing::info_span!("task", name)));
        self.names.insert(handle.id(), name);
    }

    /// How many tasks run.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    fn outcome(&mut self, ended: Result<(Id, anyhow::Result<()>), JoinError>) -> TaskFailed {
        let (id, how) = match ended {
            Ok((id, Ok(()))) => (id, "ended".to_string()),
            Ok((id, Err(e))) => (id, format!("failed: {e:#}")),
            Err(e) => {
                let id = e.id();
                let how = if e.is_panic() {
                    let payload = e.into_panic();
                    let text = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".into());
                    format!("panicked: {text}")
                } else {
                    "was cancelled".to_string()
                };
                (id, how)
            }
        };
        let task = self.names.remove(&id).unwrap_or("unknown");
        TaskFailed { task, how }
    }

    /// Runs until `stop` completes or a task ends; then asks every task to stop and gives them
    /// `grace` to finish. Returns the task that ended the process, if one did.
    pub async fn run(
        mut self,
        stop: impl Future<Output = ()>,
        grace: Duration,
    ) -> Result<(), TaskFailed> {
        let failure = if self.tasks.is_empty() {
            None
        } else {
            tokio::select! {
                () = stop => {
                    info!("stopping");
                    None
                }
                Some(ended) = self.tasks.join_next_with_id() => Some(self.outcome(ended)),
            }
        };
        if let Some(failed) = &failure {
            self.readiness.stopped(failed.task, &failed.how);
            error!(
                task = failed.task,
                "{failed}; stopping the process so that its supervisor restarts it"
            );
        }
        self.shutdown.send_replace(true);
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                ended = self.tasks.join_next_with_id() => match ended {
                    None => break,
                    Some(ended) => {
                        let done = self.outcome(ended);
                        if done.how != "ended" {
                            warn!(task = done.task, "while stopping: {done}");
                        }
                    }
                },
                () = &mut deadline => {
                    let mut left: Vec<&str> = self.names.values().copied().collect();
                    left.sort_unstable();
                    warn!(tasks = ?left, "tasks still running {grace:?} after the stop; aborting them");
                    self.tasks.abort_all();
                    break;
                }
            }
        }
        match failure {
            Some(failed) => Err(failed),
            None => {
                info!("stopped");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(1);

    async fn forever(mut shutdown: Shutdown) -> anyhow::Result<()> {
        shutdown.requested().await;
        Ok(())
    }

    #[tokio::test]
    async fn a_stop_signal_stops_every_task_cleanly() {
        let mut s = Supervisor::new();
        s.spawn("a", forever(s.shutdown()));
        s.spawn("b", forever(s.shutdown()));
        assert_eq!(s.run(async {}, GRACE).await, Ok(()));
    }

    #[tokio::test]
    async fn a_task_that_panics_ends_the_run_naming_it() {
        let mut s = Supervisor::new();
        let readiness = s.readiness();
        let index = readiness.component("index");
        index.ready();
        s.spawn("source", forever(s.shutdown()));
        s.spawn("index", async {
            tokio::task::yield_now().await;
            panic!("boom");
        });
        let failed = s.run(std::future::pending(), GRACE).await.unwrap_err();
        assert_eq!(failed.task, "index");
        assert_eq!(failed.how, "panicked: boom");
        assert_eq!(failed.to_string(), "critical task index panicked: boom");
        assert!(!readiness.is_ready(), "the dead component is not ready");
    }

    #[tokio::test]
    async fn a_task_that_returns_or_fails_early_ends_the_run() {
        let mut s = Supervisor::new();
        s.spawn("source", forever(s.shutdown()));
        s.spawn("discovery", async { Ok(()) });
        let failed = s.run(std::future::pending(), GRACE).await.unwrap_err();
        assert_eq!((failed.task, failed.how.as_str()), ("discovery", "ended"));

        let mut s = Supervisor::new();
        s.spawn("relay", async { Err(anyhow::anyhow!("cannot bind")) });
        let failed = s.run(std::future::pending(), GRACE).await.unwrap_err();
        assert_eq!(
            failed.to_string(),
            "critical task relay failed: cannot bind"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ignores_the_stop_is_aborted_after_the_grace_period() {
        let mut s = Supervisor::new();
        s.spawn("stubborn", std::future::pending());
        assert_eq!(s.run(async {}, GRACE).await, Ok(()));
    }
}

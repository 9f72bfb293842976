//! vmesh-runtime: what `vmesh-controller` and `vmesh-agent` share to run.
//!
//! - [`logging`]: the `--log` and `--log-format` flags and the subscriber they install.
//! - [`Supervisor`]: every long-running component is a future spawned into one set, inside a
//!   span named after it. A critical task that ends or panics before a shutdown was asked for
//!   ends the process with a clear log line and a non-zero exit, so the process supervisor
//!   (Nomad, systemd) restarts it instead of leaving a process that looks alive but no longer
//!   works.
//! - [`Readiness`]: each component says whether it is starting, ready or degraded; the
//!   controller's `/readyz` shows them all.
//! - [`shutdown_signal`]: SIGTERM (Nomad stopping a task) or SIGINT.
//! - [`test_panic`]: the test hook that makes a named task panic (`VMESH_TEST_PANIC`).
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod logging;
mod readiness;
mod supervisor;

pub use logging::{LogFlags, LogFormat};
pub use readiness::{Component, ComponentState, Readiness};
pub use supervisor::{Shutdown, Supervisor, TaskFailed};

/// The variable naming the tasks that panic when they reach [`test_panic`] (comma-separated task
/// names). A test hook: end-to-end tests use it to check that a dead task ends the process.
pub const TEST_PANIC_VAR: &str = "VMESH_TEST_PANIC";

/// Panics if `task` is named in `VMESH_TEST_PANIC` (read once per process). Tasks call it where
/// they do their work, so that a test can make exactly that task die.
pub fn test_panic(task: &str) {
    static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| {
        std::env::var(TEST_PANIC_VAR)
            .map(|v| v.split(',').map(|n| n.trim().to_string()).collect())
            .unwrap_or_default()
    });
    if names.iter().any(|n| n == task) {
        panic!("{TEST_PANIC_VAR} names the task {task:?}: panicking as asked");
    }
}

/// Completes on SIGTERM (what Nomad and systemd send to stop a task) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

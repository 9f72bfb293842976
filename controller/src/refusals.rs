//! Where every refusal of a port (a TLS handshake, a registration, a stream) is counted and
//! logged: each in the port's `vmesh_<port>_refused_total{reason}`; in the log, the first of each
//! reason in a [`WINDOW`] in full and the rest as one summary line, so a flood of bad calls
//! cannot flood the log.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tracing::warn;
use vmesh_relay::{RefusalLine, RefusalLog, RefusalSummary};
use vmesh_runtime::Shutdown;

use crate::metrics::ReasonLabel;

/// How often refusals not logged one by one are summed up.
pub const WINDOW: Duration = Duration::from_secs(10);

pub struct Refusals {
    /// The port, in the summary line ("relay", "xds").
    port: &'static str,
    counter: Family<ReasonLabel, Counter>,
    log: Mutex<RefusalLog>,
}

impl Refusals {
    /// Refusals of `port`, counted in `counter`.
    pub fn new(port: &'static str, counter: Family<ReasonLabel, Counter>) -> Arc<Self> {
        Arc::new(Refusals {
            port,
            counter,
            log: Mutex::new(RefusalLog::new(WINDOW)),
        })
    }

    /// Counts a refusal, and calls `log` to log it in full unless this reason was logged in
    /// the current window already.
    pub fn note(&self, reason: &'static str, peer: Option<SocketAddr>, log: impl FnOnce()) {
        self.counter.get_or_create(&ReasonLabel { reason }).inc();
        let (line, summary) = self.log.lock().unwrap_or_else(|e| e.into_inner()).note(
            reason,
            peer.map(|p| p.ip().to_canonical()),
            Instant::now(),
        );
        if let Some(summary) = summary {
            self.say(&summary);
        }
        if line == RefusalLine::Full {
            log();
        }
    }

    /// Sums up, every window, the refusals that were not logged one by one.
    pub async fn summarize(self: Arc<Self>, mut shutdown: Shutdown) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(WINDOW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.requested() => return Ok(()),
            }
            let summary = self
                .log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .flush(Instant::now());
            if let Some(summary) = summary {
                self.say(&summary);
            }
        }
    }

    fn say(&self, summary: &RefusalSummary) {
        let reasons = summary
            .by_reason
            .iter()
            .map(|(reason, n)| format!("{reason}={n}"))
            .collect::<Vec<_>>()
            .join(" ");
        warn!(
            port = self.port,
            refused = summary.total(),
            addresses = summary.addresses,
            window_s = summary.window.as_secs(),
            %reasons,
            "more calls refused (not logged one by one)"
        );
    }
}

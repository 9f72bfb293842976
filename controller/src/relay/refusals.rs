//! Where every refusal of the relay (a handshake, a registration, a renewal, a stream) is
//! counted and logged: each in `vmesh_relay_refused_total{reason}`; in the log, the first of
//! each reason in a [`WINDOW`] in full and the rest as one summary line, so a flood of bad
//! calls cannot flood the log. Registrations are also limited per source address.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;
use vmesh_relay::{AddressLimiter, Rate, RefusalLine, RefusalLog, RefusalSummary};
use vmesh_runtime::Shutdown;

use crate::metrics::Metrics;

/// How often refusals not logged one by one are summed up.
pub const WINDOW: Duration = Duration::from_secs(10);

pub struct Refusals {
    metrics: Arc<Metrics>,
    log: Mutex<RefusalLog>,
    registrations: Mutex<AddressLimiter>,
}

impl Refusals {
    /// `registrations`: the rate of registrations allowed per source address; `addresses`: how
    /// many addresses are tracked at most.
    pub fn new(metrics: Arc<Metrics>, registrations: Rate, addresses: usize) -> Arc<Self> {
        Arc::new(Refusals {
            metrics,
            log: Mutex::new(RefusalLog::new(WINDOW)),
            registrations: Mutex::new(AddressLimiter::new(registrations, addresses)),
        })
    }

    /// Counts a refusal, and calls `log` to log it in full unless this reason was logged in
    /// the current window already.
    pub fn note(&self, reason: &'static str, peer: Option<SocketAddr>, log: impl FnOnce()) {
        self.metrics.refused(reason);
        let (line, summary) = self.log.lock().unwrap_or_else(|e| e.into_inner()).note(
            reason,
            peer.map(|p| p.ip().to_canonical()),
            Instant::now(),
        );
        if let Some(summary) = summary {
            say(&summary);
        }
        if line == RefusalLine::Full {
            log();
        }
    }

    /// Whether a registration from `address` is within its rate.
    pub fn allow_registration(&self, address: IpAddr) -> bool {
        self.registrations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow(address, Instant::now())
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
                say(&summary);
            }
        }
    }
}

fn say(summary: &RefusalSummary) {
    let reasons = summary
        .by_reason
        .iter()
        .map(|(reason, n)| format!("{reason}={n}"))
        .collect::<Vec<_>>()
        .join(" ");
    warn!(
        refused = summary.total(),
        addresses = summary.addresses,
        window_s = summary.window.as_secs(),
        %reasons,
        "more relay calls refused (not logged one by one)"
    );
}

//! What the benchmark binaries share: failing loudly, waiting for a change to show
//! through Envoy, spacing changes apart, and printing percentile tables.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use vmesh_testkit::HttpClient;

/// Stops the benchmark with a message (benchmarks fail, never skip).
#[track_caller]
pub fn fail(message: &str) -> ! {
    eprintln!("bench: {message}");
    panic!("{message}");
}

/// Polls `GET url` (with `headers`) on one kept-alive connection, without sleeping, until
/// the body is `want`; returns when it was.
pub fn wait_for_body(
    client: &HttpClient,
    url: &str,
    headers: &[(&str, &str)],
    want: &str,
    t0: Instant,
    timeout: Duration,
) -> Instant {
    loop {
        let last = match client.get(url, headers) {
            Ok(r) if r.status == 200 && r.body == want => return Instant::now(),
            Ok(r) => format!("status {} body {:?}", r.status, r.body),
            Err(e) => e,
        };
        if t0.elapsed() > timeout {
            fail(&format!(
                "{url} {headers:?} did not answer {want:?} within {timeout:?}; last: {last}"
            ));
        }
    }
}

/// The idle time before each change: uniform in [0, max), from a fixed seed (xorshift64),
/// so every run and every series waits the same and changes land at random points of any
/// periodic timer (a polling control plane's refresh, a status writer's settle). The gap is
/// never part of a sample.
pub struct Gaps {
    state: u64,
    max: Duration,
}

impl Gaps {
    pub fn new(max: Duration) -> Gaps {
        Gaps {
            state: 0x9e37_79b9_7f4a_7c15,
            max,
        }
    }

    pub fn pause(&mut self) {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let micros = self.max.as_micros().max(1) as u64;
        std::thread::sleep(Duration::from_micros(self.state % micros));
    }
}

/// One series of samples, sorted.
pub struct Row {
    pub name: &'static str,
    pub sorted: Vec<Duration>,
    pub mean: Duration,
}

impl Row {
    pub fn new(name: &'static str, mut samples: Vec<Duration>) -> Row {
        samples.sort();
        let mean = samples.iter().sum::<Duration>() / samples.len().max(1) as u32;
        Row {
            name,
            sorted: samples,
            mean,
        }
    }

    /// Nearest-rank percentile.
    pub fn pct(&self, p: f64) -> Duration {
        let n = self.sorted.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.sorted[rank.clamp(1, n) - 1]
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// A markdown table: n, min, p50, p90, p99, max and mean per series, in milliseconds.
pub fn print_rows(rows: &[Row]) {
    println!(
        "| {:<38} | {:>5} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "series", "n", "min", "p50", "p90", "p99", "max", "mean"
    );
    println!(
        "|{:-<40}|{:->7}|{:->10}|{:->10}|{:->10}|{:->10}|{:->10}|{:->10}|",
        "", "", "", "", "", "", "", ""
    );
    for r in rows {
        println!(
            "| {:<38} | {:>5} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} |",
            r.name,
            r.sorted.len(),
            ms(r.sorted[0]),
            ms(r.pct(50.0)),
            ms(r.pct(90.0)),
            ms(r.pct(99.0)),
            ms(r.pct(100.0)),
            ms(r.mean)
        );
    }
}

/// A positive number from the environment variable `name`, `default` when it is not set; fails
/// on anything else.
pub fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| fail(&format!("{name}={v:?} is not a positive number"))),
        Err(_) => default,
    }
}

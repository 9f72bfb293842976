//! Per-address rate limits and refusals logged as counts: what keeps a flood of calls from one
//! source cheap for the controller and its log.
//!
//! - [`AddressLimiter`]: a token bucket per source address. A call over its address's rate is
//!   refused before any other work. The table of addresses is bounded; when it is full, the
//!   address seen longest ago is forgotten (it starts again with a full bucket, which costs no
//!   more than the bound).
//! - [`RefusalLog`]: the first refusal of each reason in a window is logged in full; the rest
//!   are counted and summed up once the window is over.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A rate: `burst` calls at once, refilled at `per_second`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub burst: u32,
    pub per_second: f64,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    seen: Instant,
}

/// Token buckets for at most `capacity` addresses.
#[derive(Debug)]
pub struct AddressLimiter {
    rate: Rate,
    capacity: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

impl AddressLimiter {
    pub fn new(rate: Rate, capacity: usize) -> Self {
        AddressLimiter {
            rate,
            capacity: capacity.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Whether a call from `address` at `now` is within its rate (and counts it if so).
    pub fn allow(&mut self, address: IpAddr, now: Instant) -> bool {
        if !self.buckets.contains_key(&address) && self.buckets.len() >= self.capacity {
            self.forget_one(now);
        }
        let rate = self.rate;
        let bucket = self.buckets.entry(address).or_insert(Bucket {
            tokens: f64::from(rate.burst),
            seen: now,
        });
        let refill = now.saturating_duration_since(bucket.seen).as_secs_f64() * rate.per_second;
        bucket.tokens = (bucket.tokens + refill).min(f64::from(rate.burst));
        bucket.seen = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Makes room: every address whose bucket has refilled is forgotten (it would start full
    /// anyway); if none has, the one seen longest ago.
    fn forget_one(&mut self, now: Instant) {
        let rate = self.rate;
        let full = |b: &Bucket| {
            b.tokens + now.saturating_duration_since(b.seen).as_secs_f64() * rate.per_second
                >= f64::from(rate.burst)
        };
        self.buckets.retain(|_, b| !full(b));
        if self.buckets.len() >= self.capacity {
            if let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.seen)
                .map(|(a, _)| *a)
            {
                self.buckets.remove(&oldest);
            }
        }
    }
}

/// What to log about refusals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefusalLine {
    /// Log this refusal in full.
    Full,
    /// Counted; said later in a [`RefusalSummary`].
    Counted,
}

/// Refusals not logged one by one during a window: how many, by reason, and from how many
/// addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusalSummary {
    pub window: Duration,
    pub by_reason: BTreeMap<&'static str, u64>,
    pub addresses: usize,
}

impl RefusalSummary {
    pub fn total(&self) -> u64 {
        self.by_reason.values().sum()
    }
}

/// At most one log line per refusal reason per window, and one summary of the rest.
#[derive(Debug)]
pub struct RefusalLog {
    window: Duration,
    started: Option<Instant>,
    logged: BTreeSet<&'static str>,
    counted: BTreeMap<&'static str, u64>,
    /// Distinct addresses among the counted ones (bounded: past the bound, only counted).
    addresses: HashSet<IpAddr>,
}

/// The most distinct addresses a summary names the number of.
const MAX_SUMMARY_ADDRESSES: usize = 10_000;

impl RefusalLog {
    pub fn new(window: Duration) -> Self {
        RefusalLog {
            window,
            started: None,
            logged: BTreeSet::new(),
            counted: BTreeMap::new(),
            addresses: HashSet::new(),
        }
    }

    /// A refusal for `reason` from `address` at `now`: whether to log it in full, and the
    /// summary of the window that ended, if one did and had counted refusals.
    pub fn note(
        &mut self,
        reason: &'static str,
        address: Option<IpAddr>,
        now: Instant,
    ) -> (RefusalLine, Option<RefusalSummary>) {
        let summary = self.flush(now);
        self.started.get_or_insert(now);
        if self.logged.insert(reason) {
            return (RefusalLine::Full, summary);
        }
        *self.counted.entry(reason).or_default() += 1;
        if let Some(a) = address {
            if self.addresses.len() < MAX_SUMMARY_ADDRESSES {
                self.addresses.insert(a);
            }
        }
        (RefusalLine::Counted, summary)
    }

    /// Ends the window if it is over at `now`: the summary of what was counted in it, if any.
    pub fn flush(&mut self, now: Instant) -> Option<RefusalSummary> {
        let started = self.started?;
        if now.saturating_duration_since(started) < self.window {
            return None;
        }
        self.started = None;
        self.logged.clear();
        let addresses = std::mem::take(&mut self.addresses).len();
        let by_reason = std::mem::take(&mut self.counted);
        (!by_reason.is_empty()).then_some(RefusalSummary {
            window: self.window,
            by_reason,
            addresses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn an_address_gets_its_burst_then_its_rate() {
        let mut limiter = AddressLimiter::new(
            Rate {
                burst: 3,
                per_second: 2.0,
            },
            16,
        );
        let t0 = Instant::now();
        assert!((0..3).all(|_| limiter.allow(ip(1), t0)));
        assert!(!limiter.allow(ip(1), t0));
        // Another address has its own bucket.
        assert!(limiter.allow(ip(2), t0));
        // Half a second refills one call.
        let t1 = t0 + Duration::from_millis(500);
        assert!(limiter.allow(ip(1), t1));
        assert!(!limiter.allow(ip(1), t1));
        // A long pause refills no more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert!((0..3).all(|_| limiter.allow(ip(1), t2)));
        assert!(!limiter.allow(ip(1), t2));
    }

    #[test]
    fn the_table_of_addresses_stays_bounded() {
        let rate = Rate {
            burst: 1,
            per_second: 0.001,
        };
        let mut limiter = AddressLimiter::new(rate, 100);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let a = IpAddr::from(i.to_be_bytes());
            assert!(limiter.allow(a, t0 + Duration::from_millis(u64::from(i))));
            assert!(limiter.len() <= 100);
        }
        // The newest addresses are still remembered (and limited).
        let last = IpAddr::from(9_999u32.to_be_bytes());
        assert!(!limiter.allow(last, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn a_flood_of_refusals_is_one_line_per_reason_and_one_summary() {
        let mut log = RefusalLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let mut full = 0;
        for i in 0..1000u32 {
            let reason = if i % 2 == 0 {
                "token_unknown"
            } else {
                "bad_request"
            };
            let (line, summary) = log.note(reason, Some(ip((i % 7) as u8)), t0);
            assert_eq!(summary, None);
            if line == RefusalLine::Full {
                full += 1;
            }
        }
        assert_eq!(full, 2);
        // Nothing to say before the window ends ...
        assert_eq!(log.flush(t0 + Duration::from_secs(9)), None);
        // ... then the rest, in one summary.
        let summary = log.flush(t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(summary.total(), 998);
        assert_eq!(summary.by_reason["token_unknown"], 499);
        assert_eq!(summary.addresses, 7);
        // A new window logs the first of each reason again.
        let (line, _) = log.note("token_unknown", None, t0 + Duration::from_secs(11));
        assert_eq!(line, RefusalLine::Full);
    }

    #[test]
    fn a_lone_refusal_has_no_summary() {
        let mut log = RefusalLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.note("revoked", None, t0).0, RefusalLine::Full);
        assert_eq!(log.flush(t0 + Duration::from_secs(60)), None);
    }
}

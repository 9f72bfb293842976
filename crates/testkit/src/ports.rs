use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Ports handed out come from here: below Linux's ephemeral range (32768–60999 by default), so
/// the kernel never gives one of them to a `bind(…:0)` or an outgoing connection in the window
/// between this call and the caller binding it. (An Envoy admin on port 0, an echo server, an
/// HTTP client: all of those take ephemeral ports, and each once landed on a port a test had
/// chosen for a listener that was not bound yet.)
const RANGE: std::ops::Range<u16> = 20000..32000;

/// Returns a TCP port on 127.0.0.1 that was free a moment ago and that this process has not
/// handed out before. Ports come from a fixed range below the kernel's ephemeral ports, in an
/// order that differs per process, so concurrent test processes rarely try the same one.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<(HashSet<u16>, u64)>> = OnceLock::new();
    let state = HANDED_OUT.get_or_init(|| {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (u64::from(std::process::id()) << 32);
        Mutex::new((HashSet::new(), seed | 1))
    });
    let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
    let (handed_out, rng) = &mut *guard;
    let span = u64::from(RANGE.end - RANGE.start);
    for _ in 0..10_000 {
        // xorshift64: good enough to spread ports, no dependency.
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let port = RANGE.start + (*rng % span) as u16;
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("could not find a free TCP port on 127.0.0.1 in {RANGE:?}");
}

/// `n` distinct free ports (see [`free_port`]).
pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| free_port()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_not_ephemeral() {
        let ports = free_ports(50);
        let set: HashSet<_> = ports.iter().collect();
        assert_eq!(set.len(), ports.len());
        assert!(ports.iter().all(|p| RANGE.contains(p)), "{ports:?}");
        let p = free_port();
        TcpListener::bind(("127.0.0.1", p)).expect("free port is bindable");
    }
}

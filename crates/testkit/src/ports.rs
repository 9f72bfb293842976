use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};

/// Returns a TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it for a
/// `bind(127.0.0.1:0)`), and that this process has not handed out before.
///
/// There is an unavoidable window between this call and the caller binding the port; the kernel
/// hands out ephemeral ports in a way that makes a collision in that window unlikely.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Default::default);
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"));
        let port = match listener.local_addr() {
            Ok(addr) => addr.port(),
            Err(e) => panic!("local_addr of a bound listener: {e}"),
        };
        let mut set = handed_out.lock().unwrap_or_else(|p| p.into_inner());
        if set.insert(port) {
            return port;
        }
    }
    panic!("could not find a TCP port on 127.0.0.1 not already handed out by free_port()");
}

/// `n` distinct free ports (see [`free_port`]).
pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| free_port()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_bindable() {
        let ports = free_ports(50);
        let set: HashSet<_> = ports.iter().collect();
        assert_eq!(set.len(), ports.len());
        let p = free_port();
        TcpListener::bind(("127.0.0.1", p)).expect("free port is bindable");
    }
}

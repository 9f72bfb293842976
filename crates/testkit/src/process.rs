//! vmesh's own processes for end-to-end tests and benchmarks: a `vmesh-controller` on free
//! ports ([`ControllerProcess`]) and a `vmesh-agent` ([`AgentProcess`]), each with its log in a
//! temporary directory of its own, and what `/proc` says of a process ([`cpu_ticks`],
//! [`status_kib`]).
//!
//! Both take the binary's path: a test in the controller's package passes
//! `env!("CARGO_BIN_EXE_vmesh-controller")`; anything else gets a fresh one from
//! [`workspace_binary`](crate::workspace_binary).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::http::HttpClient;
use crate::ports::free_port;

static N: AtomicU32 = AtomicU32::new(0);

/// A fresh temporary directory named after `what`, this process and a counter.
pub fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "vmesh-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// CPU time (user + system) process `pid` has used, in clock ticks (`/proc/<pid>/stat`).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, `RssAnon`, ...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Waits for `child` to exit on its own; panics after `timeout` with the tail of its log.
#[track_caller]
fn wait_exit(mut child: Child, timeout: Duration, what: &str, log: &Path) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!(
                "{what} did not exit within {timeout:?}; log:\n{}",
                tail(&log, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How to start a controller.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// The `vmesh-controller` binary.
    pub binary: PathBuf,
    /// Arguments besides `--xds-addr`, `--admin-addr` and `--log` (the source, the relay, ...).
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// `--log`.
    pub log: String,
    /// Names its temporary directory.
    pub name: String,
    /// Keep the directory (and log) when dropped, and say where it is.
    pub keep: bool,
}

impl ControllerOptions {
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        ControllerOptions {
            binary: binary.into(),
            args: Vec::new(),
            env: Vec::new(),
            log: "info".into(),
            name: "controller".into(),
            keep: false,
        }
    }

    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn log(mut self, filter: &str) -> Self {
        self.log = filter.into();
        self
    }

    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    pub fn keep(mut self, keep: bool) -> Self {
        self.keep = keep;
        self
    }
}

/// A `vmesh-controller` process on free loopback ports, logging to `controller.log` in its own
/// temporary directory. Killed when dropped; its log's last lines are printed if a test panics.
pub struct ControllerProcess {
    child: Option<Child>,
    opts: ControllerOptions,
    dir: PathBuf,
    log: PathBuf,
    pub xds_port: u16,
    pub admin_port: u16,
    admin_client: HttpClient,
}

impl ControllerProcess {
    /// Starts the process (without waiting for it to be ready).
    pub fn start(opts: ControllerOptions) -> ControllerProcess {
        let dir = scratch_dir(&opts.name);
        let log = dir.join("controller.log");
        let mut c = ControllerProcess {
            child: None,
            opts,
            dir,
            log,
            xds_port: free_port(),
            admin_port: free_port(),
            admin_client: HttpClient::with_timeout(Duration::from_secs(5), true),
        };
        c.spawn();
        c
    }

    /// Starts the process again with the same arguments, ports and directory.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the controller already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("{}: {e}", self.log.display()));
        let err = log.try_clone().expect("log file handle");
        let mut command = Command::new(&self.opts.binary);
        // Nothing from the developer's environment chooses its source, token or flags.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("VMESH_") || key.starts_with("CONSUL_") || key.starts_with("VAULT_")
            {
                command.env_remove(key.as_ref());
            }
        }
        let child = command
            .args(["--xds-addr", &format!("127.0.0.1:{}", self.xds_port)])
            .args(["--admin-addr", &format!("127.0.0.1:{}", self.admin_port)])
            .args(["--log", &self.opts.log])
            .args(&self.opts.args)
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.opts.binary.display()));
        self.child = Some(child);
    }

    /// The directory this process owns (its log; callers may keep more there).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub fn xds_addr(&self) -> String {
        format!("127.0.0.1:{}", self.xds_port)
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("the controller is not running")
    }

    /// Whether `/readyz` answers 200 now.
    pub fn is_ready(&self) -> bool {
        self.admin_client
            .get(&self.admin("/readyz"), &[])
            .is_ok_and(|r| r.status == 200)
    }

    /// Waits (polling every 20 ms) until `/readyz` answers 200; returns when it did. Panics with
    /// the log's tail if the process exits or `timeout` passes first.
    #[track_caller]
    pub fn wait_ready(&mut self, timeout: Duration) -> Instant {
        let t0 = Instant::now();
        loop {
            if self.is_ready() {
                return Instant::now();
            }
            if let Some(status) = self.try_exit() {
                panic!(
                    "the controller exited ({status}) before it was ready; log:\n{}",
                    tail(&self.log(), 40)
                );
            }
            if t0.elapsed() > timeout {
                panic!(
                    "the controller was not ready within {timeout:?}; log:\n{}",
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status, if the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits for the process to exit on its own; panics after `timeout`.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.take().expect("the controller is not running");
        wait_exit(child, timeout, "the controller", &self.log)
    }

    /// SIGKILL, as a crash or a lost machine would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (as Nomad stops a task), and waits for the process to exit (panics, after killing
    /// it, if it has not within 30 s).
    #[track_caller]
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        Some(wait_exit(
            child,
            Duration::from_secs(30),
            "the controller (after SIGTERM)",
            &self.log,
        ))
    }

    /// Kills the process and starts it again on the same ports and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET <admin><path>` as JSON.
    pub fn json(&self, path: &str) -> Result<serde_json::Value, String> {
        self.admin_client.get(&self.admin(path), &[])?.json()
    }

    /// Every sample of `/metrics`, summed over label sets, by metric name.
    pub fn metrics(&self) -> Result<BTreeMap<String, f64>, String> {
        let text = self.admin_client.get(&self.admin("/metrics"), &[])?.body;
        let mut m = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name_labels, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = name_labels.split('{').next().unwrap_or(name_labels);
            if let Ok(v) = value.parse::<f64>() {
                *m.entry(name.to_string()).or_insert(0.0) += v;
            }
        }
        Ok(m)
    }

    /// One metric, summed over the label sets whose text contains `labels` (`""`: all).
    pub fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        let text = self
            .admin_client
            .get(&self.admin("/metrics"), &[])
            .ok()?
            .body;
        Some(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                        && l.contains(labels)
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        )
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- controller log (last lines; {}) ---\n{}",
                self.log.display(),
                tail(&self.log(), 40)
            );
        } else if self.opts.keep {
            eprintln!("controller log kept: {}", self.log.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A `vmesh-agent` process, logging to a file. Killed when dropped.
pub struct AgentProcess {
    child: Option<Child>,
    log: PathBuf,
    name: String,
}

impl AgentProcess {
    /// Starts `binary` with `args` (and `env`), logging to `log` (appended to).
    pub fn start(
        binary: &Path,
        name: &str,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> AgentProcess {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = file.try_clone().expect("log file handle");
        let child = Command::new(binary)
            .args(args)
            .env_remove("CONSUL_HTTP_ADDR")
            .env_remove("VMESH_AGENT_TOKEN")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        AgentProcess {
            child: Some(child),
            log: log.to_path_buf(),
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status, if the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits for the process to exit on its own; panics after `timeout`.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.take().expect("the agent is not running");
        wait_exit(
            child,
            timeout,
            &format!("vmesh-agent of {}", self.name),
            &self.log,
        )
    }

    /// SIGKILL, as a crash or a VM power-off would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- vmesh-agent log of {} (last lines) ---\n{}",
                self.name,
                tail(&self.log(), 30)
            );
        }
    }
}

//! A controller process, a real Envoy it configures, and echo upstreams: the
//! pieces every end-to-end scenario starts from.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;
use vmesh_testkit::{eventually, free_port, http_get, Envoy, Response};
use vmeshctl::bootstrap::{render, BootstrapArgs, Protocol};

pub mod vm;

pub const DEADLINE: Duration = Duration::from_secs(20);

/// A `vmesh-controller` process reading a temporary config directory.
pub struct Controller {
    child: Child,
    extra: Vec<String>,
    /// The temporary directory this controller owns (its log, its config directory).
    base: PathBuf,
    pub dir: PathBuf,
    pub xds_port: u16,
    pub admin_port: u16,
    log: PathBuf,
}

static N: AtomicU32 = AtomicU32::new(0);

impl Controller {
    /// Starts a controller on a fresh config directory holding `files` and waits until it is ready.
    pub fn start(files: &[(&str, &str)]) -> Controller {
        Self::start_with(files, &[])
    }

    /// [`Controller::start`] with extra command-line arguments.
    pub fn start_with(files: &[(&str, &str)], extra: &[&str]) -> Controller {
        let base = std::env::temp_dir().join(format!(
            "vmesh-e2e-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join("config");
        std::fs::create_dir_all(&dir).expect("create config dir");
        for (name, text) in files {
            std::fs::write(dir.join(name), text).expect("write config");
        }
        let mut args = vec!["--config-dir".to_string(), dir.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::launch(base, dir, args, true)
    }

    /// Starts a controller that reads its config from Consul KV at `consul_url`.
    pub fn consul(consul_url: &str, extra: &[&str]) -> Controller {
        let c = Self::consul_unready(consul_url, extra);
        c.wait_ready();
        c
    }

    /// [`Controller::consul`] without waiting for it to be ready.
    pub fn consul_unready(consul_url: &str, extra: &[&str]) -> Controller {
        let base = std::env::temp_dir().join(format!(
            "vmesh-e2e-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("create temp dir");
        let mut args = vec!["--consul-addr".to_string(), consul_url.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let dir = base.join("unused");
        Self::launch(base, dir, args, false)
    }

    fn launch(base: PathBuf, dir: PathBuf, args: Vec<String>, wait: bool) -> Controller {
        let xds_port = free_port();
        let admin_port = free_port();
        let log = base.join("controller.log");
        let child = spawn(xds_port, admin_port, &log, &args);
        let c = Controller {
            child,
            extra: args,
            base,
            dir,
            xds_port,
            admin_port,
            log,
        };
        if wait {
            c.wait_ready();
        }
        c
    }

    /// The temporary directory this controller owns.
    pub fn base(&self) -> &Path {
        &self.base
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the controller to stop (SIGTERM) and waits for it to exit.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    fn wait_ready(&self) {
        eventually(DEADLINE, "the controller to be ready", || {
            let r = http_get(&self.admin("/readyz"), &[])?;
            (r.status == 200)
                .then_some(())
                .ok_or(format!("readyz {}", r.status))
        });
    }

    /// Stops the controller and starts a new process on the same ports and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn(self.xds_port, self.admin_port, &self.log, &self.extra);
        self.wait_ready();
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// Writes a config file the way editors do: a temporary file, then a rename.
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write temp file");
        std::fs::rename(&tmp, self.dir.join(name)).expect("rename into place");
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.join(name)).expect("remove config file");
    }

    pub fn status(&self) -> Value {
        http_get(&self.admin("/status"), &[])
            .and_then(|r| r.json())
            .expect("controller status")
    }

    /// The status of one object, e.g. `("VirtualService", "web")`.
    pub fn object(&self, kind: &str, name: &str) -> Option<Value> {
        self.status()["objects"]
            .as_array()?
            .iter()
            .find(|o| o["kind"] == kind && o["name"] == name)
            .cloned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A real Envoy that takes its config from this controller.
    pub fn envoy(&self, proxy: &str, protocol: Protocol) -> Envoy {
        let bootstrap = render(&BootstrapArgs {
            proxy: proxy.to_string(),
            cluster: None,
            xds_addr: format!("127.0.0.1:{}", self.xds_port),
            protocol,
            admin_port: 0,
        })
        .expect("bootstrap");
        let envoy = Envoy::start(&bootstrap, proxy);
        envoy.wait_ready(DEADLINE);
        envoy
    }

    /// CPU time (user + system) the controller process has used, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("controller /proc stat");
        // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(xds_port: u16, admin_port: u16, log: &Path, args: &[String]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(env!("CARGO_BIN_EXE_vmesh-controller"))
        .args(["--xds-addr", &format!("127.0.0.1:{xds_port}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
        .args(["--log", "info,vmesh_xds=debug"])
        .args(args)
        .stdout(log)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start vmesh-controller")
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- controller log (last lines) ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }
}

/// Sends a request through Envoy's listener on `port`.
pub fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<Response, String> {
    http_get(&format!("http://127.0.0.1:{port}{path}"), headers)
}

/// The upstream that served an echo response.
pub fn served_by(r: &Response) -> String {
    r.header("x-served-by").unwrap_or("-").to_string()
}

/// Waits until a request to `path` (with `headers`) is served by `service`.
#[track_caller]
pub fn wait_served_by(port: u16, path: &str, headers: &[(&str, &str)], service: &str) {
    eventually(
        DEADLINE,
        &format!("{path} to be served by {service}"),
        || {
            let r = get(port, path, headers)?;
            if r.status == 200 && served_by(&r) == service {
                Ok(())
            } else {
                Err(format!("status {} served by {}", r.status, served_by(&r)))
            }
        },
    )
}

pub fn upstream_doc(name: &str, port: u16) -> String {
    format!(
        "kind: Upstream\nname: {name}\nspec:\n  static:\n    hosts:\n      - address: 127.0.0.1\n        port: {port}\n"
    )
}

pub fn gateway_doc(port: u16, proxy: &str) -> String {
    format!("kind: Gateway\nname: edge\nspec:\n  bindPort: {port}\n  proxyNames: [{proxy}]\n")
}

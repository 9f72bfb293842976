//! A controller process, a real Envoy it configures, and echo upstreams: the
//! pieces every end-to-end scenario starts from.
#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vmesh_testkit::process::{ControllerOptions, ControllerProcess};
use vmesh_testkit::{eventually, http_get, Envoy, Response};
use vmeshctl::bootstrap::{render, BootstrapArgs, Protocol};

pub mod vm;

pub const DEADLINE: Duration = Duration::from_secs(20);

/// The controller of this package, as built for this test run.
pub fn options() -> ControllerOptions {
    ControllerOptions::new(env!("CARGO_BIN_EXE_vmesh-controller")).log("info,vmesh_xds=debug")
}

/// A `vmesh-controller` process (the test kit's launcher) and, in directory mode, its config
/// directory.
pub struct Controller {
    pub process: ControllerProcess,
    /// The config directory (directory mode).
    pub dir: PathBuf,
}

impl Deref for Controller {
    type Target = ControllerProcess;
    fn deref(&self) -> &ControllerProcess {
        &self.process
    }
}

impl DerefMut for Controller {
    fn deref_mut(&mut self) -> &mut ControllerProcess {
        &mut self.process
    }
}

impl Controller {
    /// Starts a controller on a fresh config directory holding `files` and waits until it is ready.
    pub fn start(files: &[(&str, &str)]) -> Controller {
        Self::start_with(files, &[])
    }

    /// [`Controller::start`] with extra command-line arguments.
    pub fn start_with(files: &[(&str, &str)], extra: &[&str]) -> Controller {
        let dir = vmesh_testkit::process::scratch_dir("e2e-config");
        for (name, text) in files {
            std::fs::write(dir.join(name), text).expect("write config");
        }
        let opts = options()
            .args(["--config-dir", &dir.display().to_string()])
            .args(extra);
        let mut c = Controller {
            process: ControllerProcess::start(opts),
            dir,
        };
        c.process.wait_ready(DEADLINE);
        c
    }

    /// Starts a controller that reads its config from Consul KV at `consul_url`.
    pub fn consul(consul_url: &str, extra: &[&str]) -> Controller {
        let mut c = Self::consul_unready(consul_url, extra);
        c.process.wait_ready(DEADLINE);
        c
    }

    /// [`Controller::consul`] without waiting for it to be ready.
    pub fn consul_unready(consul_url: &str, extra: &[&str]) -> Controller {
        Self::launch(options().args(["--consul-addr", consul_url]).args(extra))
    }

    /// A controller started with `opts`, not waited for.
    pub fn launch(opts: ControllerOptions) -> Controller {
        let process = ControllerProcess::start(opts);
        let dir = process.dir().join("unused");
        Controller { process, dir }
    }

    /// The temporary directory this controller owns.
    pub fn base(&self) -> &Path {
        self.process.dir()
    }

    /// Stops the controller and starts a new process on the same ports and directory.
    pub fn restart(&mut self) {
        self.process.restart();
        self.process.wait_ready(DEADLINE);
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
        self.process.json("/status").expect("controller status")
    }

    /// The status of one object, e.g. `("VirtualService", "web")`.
    pub fn object(&self, kind: &str, name: &str) -> Option<Value> {
        self.status()["objects"]
            .as_array()?
            .iter()
            .find(|o| o["kind"] == kind && o["name"] == name)
            .cloned()
    }

    /// A real Envoy that takes its config from this controller.
    pub fn envoy(&self, proxy: &str, protocol: Protocol) -> Envoy {
        self.envoy_with(proxy, protocol, |bootstrap| bootstrap)
    }

    /// A real Envoy set up without `vmeshctl bootstrap`'s RE2 limit, which refuses regexes
    /// vmesh accepts, such as `/[^/]{1,64}` (docs/configuration.md, "Regexes"): a way to get
    /// a real refusal from Envoy.
    pub fn envoy_with_default_re2_limit(&self, proxy: &str, protocol: Protocol) -> Envoy {
        self.envoy_with(proxy, protocol, |bootstrap| {
            let ours = format!(
                "re2.max_program_size.error_level: {}",
                vmesh_model::regex::ENVOY_PROGRAM_SIZE_LIMIT
            );
            assert!(
                bootstrap.contains(&ours),
                "the bootstrap sets the RE2 limit"
            );
            // Envoy's default.
            bootstrap.replace(&ours, "re2.max_program_size.error_level: 100")
        })
    }

    /// [`Controller::envoy`], with its bootstrap changed by `edit` first (an Envoy not set up
    /// the way `vmeshctl bootstrap` does).
    pub fn envoy_with(
        &self,
        proxy: &str,
        protocol: Protocol,
        edit: impl FnOnce(String) -> String,
    ) -> Envoy {
        let bootstrap = render(&BootstrapArgs {
            protocol,
            admin_port: 0,
            ..BootstrapArgs::new(proxy.to_string(), self.process.xds_addr())
        })
        .expect("bootstrap");
        let envoy = Envoy::start(&edit(bootstrap), proxy);
        envoy.wait_ready(DEADLINE);
        envoy
    }

    /// CPU time (user + system) the controller process has used, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        vmesh_testkit::process::cpu_ticks(self.process.pid())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if !std::thread::panicking() && self.dir.starts_with(std::env::temp_dir()) {
            let _ = std::fs::remove_dir_all(&self.dir);
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

/// Requests sent continuously while a scenario runs (`send` is one request: `Ok` when it
/// succeeded), counting the ones that succeed and keeping the failures.
pub struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Traffic {
    /// Calls `send` every `pause` until [`Traffic::finish`].
    pub fn start(
        pause: Duration,
        send: impl Fn() -> Result<(), String> + Send + 'static,
    ) -> Traffic {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let (s, o) = (stop.clone(), ok.clone());
        let thread = std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match send() {
                    Ok(()) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(e),
                }
                std::thread::sleep(pause);
            }
            failures
        });
        Traffic {
            stop,
            ok,
            thread: Some(thread),
        }
    }

    /// How many requests succeeded so far.
    pub fn succeeded(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `n` more requests have succeeded.
    #[track_caller]
    pub fn wait_for(&self, n: u64) {
        let target = self.succeeded() + n;
        eventually(DEADLINE, &format!("{n} more successful requests"), || {
            let ok = self.succeeded();
            (ok >= target)
                .then_some(())
                .ok_or(format!("{ok} of {target}"))
        });
    }

    /// Stops, and asserts that more than `min_ok` requests succeeded and none failed.
    #[track_caller]
    pub fn finish_without_failures(self, min_ok: u64) {
        let (ok, failures) = self.finish();
        assert!(ok > min_ok, "only {ok} requests succeeded");
        assert!(
            failures.is_empty(),
            "{} requests failed: {failures:?}",
            failures.len()
        );
    }

    /// Stops and returns (succeeded, the failures).
    pub fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let failures = self
            .thread
            .take()
            .map(|t| t.join().expect("the traffic thread"))
            .unwrap_or_default();
        (self.succeeded(), failures)
    }
}

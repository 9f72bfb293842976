//! vmeshctl against Consul (the test kit's emulator): apply, get, delete, status, token and
//! agent as scripts use them, through the real binary; the CAS conflict through the library
//! with the real client, another writer changing the key between the read and the write.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vmesh_model::{parse_single, Parsed};
use vmesh_testkit::consul::{AclConfig, AclRules, AclToken, KeyPolicy};
use vmesh_testkit::{ConsulEmulator, ConsulOptions};
use vmeshctl::consul::{exit_code, ConsulArgs, Kv, Layout, Stored};

const UPSTREAM: &str = "\
# The shop's backend.
kind: Upstream
name: shop
spec:
  static:
    hosts:
      - address: 127.0.0.1
        port: 8080
";

const SHOP: &str = "\
kind: VirtualService
name: shop
spec:
  domains: [\"shop.example.com\"]
  routes:
    - match: {prefix: /}
      upstream: shop
";

const GATEWAY: &str = "\
kind: Gateway
name: edge
spec:
  bindPort: 10000
";

const BAD_SHOP: &str = "\
kind: VirtualService
name: shop
spec:
  domains: [\"*\"]
  routes:
    - match: {regex: \"(\"}
      upstream: shop
";

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs vmeshctl with `args`, then `--consul-addr <emulator>` unless `addr` is None, with
/// no CONSUL_* or VMESH_* variable from the environment of the test.
fn run(args: &[&str], addr: Option<&str>, envs: &[(&str, &str)], stdin: Option<&str>) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmeshctl"));
    cmd.args(args);
    if let Some(addr) = addr {
        cmd.args(["--consul-addr", addr]);
    }
    for (k, _) in std::env::vars() {
        if k.starts_with("CONSUL_") || k.starts_with("VMESH_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(envs.iter().copied());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run vmeshctl");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait for vmeshctl");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ctl(consul: &ConsulEmulator, args: &[&str]) -> Out {
    run(args, Some(&consul.url()), &[], None)
}

/// A fresh directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmeshctl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path.to_str().expect("utf-8 path").to_string()
}

fn value(consul: &ConsulEmulator, key: &str) -> Option<String> {
    consul
        .kv_get(key)
        .map(|v| String::from_utf8(v).expect("utf-8 value"))
}

#[test]
fn apply_creates_then_leaves_unchanged_then_configures() {
    let consul = ConsulEmulator::start();
    let dir = temp_dir("apply");
    let file = write(
        &dir,
        "shop.yaml",
        &format!("{SHOP}---\n{UPSTREAM}---\n{GATEWAY}"),
    );

    let out = ctl(&consul, &["apply", "-f", &file]);
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(
        out.stdout, "Upstream/shop created\nVirtualService/shop created\nGateway/edge created\n",
        "what refers to something is written after it\n{out}"
    );
    let keys: Vec<String> = consul
        .kv_list("vmesh/")
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(
        keys,
        [
            "vmesh/config/Gateway/edge",
            "vmesh/config/Upstream/shop",
            "vmesh/config/VirtualService/shop"
        ]
    );
    // One readable YAML document per key, the one the file holds.
    let stored = value(&consul, "vmesh/config/VirtualService/shop").expect("stored");
    assert!(
        stored.starts_with("kind: VirtualService\nname: shop\nspec:\n"),
        "{stored}"
    );
    assert!(stored.contains("shop.example.com"), "{stored}");
    let Ok(Parsed::Document(doc)) = parse_single(&stored) else {
        panic!("not one document: {stored}");
    };
    assert!(doc.result.is_ok(), "{stored}");
    let index_before = consul
        .kv_entry("vmesh/config/Upstream/shop")
        .expect("entry")
        .modify_index;

    let out = ctl(&consul, &["apply", "-f", &file]);
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(
        out.stdout,
        "Upstream/shop unchanged\nVirtualService/shop unchanged\nGateway/edge unchanged\n",
        "{out}"
    );

    // Edit one object; split the file in two (a directory of files works the same).
    std::fs::remove_file(&file).expect("remove");
    write(
        &dir,
        "a-shop.yaml",
        &SHOP.replace("shop.example.com", "shop.example.org"),
    );
    write(&dir, "b-rest.yml", &format!("{UPSTREAM}---\n{GATEWAY}"));
    write(&dir, "notes.txt", "not config");
    let out = ctl(&consul, &["apply", "-f", dir.to_str().expect("utf-8")]);
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(
        out.stdout,
        "Upstream/shop unchanged\nVirtualService/shop configured\nGateway/edge unchanged\n",
        "{out}"
    );
    assert!(value(&consul, "vmesh/config/VirtualService/shop")
        .expect("stored")
        .contains("shop.example.org"));
    assert_eq!(
        consul
            .kv_entry("vmesh/config/Upstream/shop")
            .expect("entry")
            .modify_index,
        index_before,
        "an unchanged object is not rewritten"
    );

    // A value written by hand with `consul kv put` (comments, flow style) is the same object.
    consul.kv_put(
        "vmesh/config/Gateway/edge",
        "# by hand\n{kind: Gateway, name: edge, spec: {bindPort: 10000}}\n",
    );
    let out = ctl(&consul, &["apply", "-f", dir.to_str().expect("utf-8")]);
    assert!(out.stdout.contains("Gateway/edge unchanged"), "{out}");
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[test]
fn an_invalid_document_means_nothing_is_written() {
    let consul = ConsulEmulator::start();
    let dir = temp_dir("invalid");
    let file = write(
        &dir,
        "shop.yaml",
        &format!("{UPSTREAM}---\n{BAD_SHOP}---\n{GATEWAY}---\nkind: Route\nname: x\nspec: {{}}\n"),
    );
    let out = ctl(&consul, &["apply", "-f", &file]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stderr.contains(&format!(
            "{file} documents[1]: spec.routes[0].match.regex: invalid regex"
        )),
        "{out}"
    );
    assert!(
        out.stderr.contains(&format!(
            "{file} documents[3]: kind: unknown kind \"Route\""
        )),
        "every problem is reported\n{out}"
    );
    assert!(out.stderr.contains("nothing was applied"), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    assert!(consul.kv_list("").is_empty(), "nothing may be written");

    // A syntax error names the file.
    let broken = write(&dir, "broken.yaml", "kind: [\n");
    let out = ctl(&consul, &["apply", "-f", &file, "-f", &broken]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stderr.contains(&format!("{broken}: invalid YAML")),
        "{out}"
    );
    assert!(consul.kv_list("").is_empty());

    // The same object twice is ambiguous.
    let twice = write(&dir, "twice.yaml", &format!("{UPSTREAM}---\n{UPSTREAM}"));
    let out = ctl(&consul, &["apply", "-f", &twice]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stderr.contains("Upstream/shop is also defined in"),
        "{out}"
    );
    assert!(consul.kv_list("").is_empty());
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[test]
fn a_dry_run_writes_nothing() {
    let consul = ConsulEmulator::start();
    let both = format!("{UPSTREAM}---\n{SHOP}");
    let out = run(
        &["apply", "--dry-run", "-f", "-"],
        Some(&consul.url()),
        &[],
        Some(&both),
    );
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(
        out.stdout, "Upstream/shop created (dry run)\nVirtualService/shop created (dry run)\n",
        "{out}"
    );
    assert!(consul.kv_list("").is_empty());

    let out = run(&["apply", "-f", "-"], Some(&consul.url()), &[], Some(&both));
    assert_eq!(out.code, 0, "{out}");
    let before = value(&consul, "vmesh/config/VirtualService/shop");
    let edited = both.replace("shop.example.com", "shop.example.org");
    let out = run(
        &["apply", "-f", "-", "--dry-run"],
        Some(&consul.url()),
        &[],
        Some(&edited),
    );
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(
        out.stdout, "Upstream/shop unchanged (dry run)\nVirtualService/shop configured (dry run)\n",
        "{out}"
    );
    assert_eq!(value(&consul, "vmesh/config/VirtualService/shop"), before);
}

#[test]
fn apply_reads_standard_input_and_honours_the_prefix() {
    let consul = ConsulEmulator::start();
    let out = run(
        &["apply", "-f", "-", "--prefix", "team-a/mesh"],
        Some(&consul.url()),
        &[],
        Some(UPSTREAM),
    );
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(out.stdout, "Upstream/shop created\n", "{out}");
    assert!(value(&consul, "team-a/mesh/config/Upstream/shop").is_some());
    // The variables work as the flags do.
    let out = run(
        &["get", "upstreams"],
        None,
        &[
            ("CONSUL_HTTP_ADDR", &consul.url()),
            ("VMESH_CONSUL_PREFIX", "team-a/mesh"),
        ],
        None,
    );
    assert_eq!((out.code, out.stdout.as_str()), (0, "shop\n"), "{out}");
    // --consul-prefix, as the controller spells it, is the same flag.
    let out = ctl(
        &consul,
        &["get", "us", "shop", "--consul-prefix", "team-a/mesh"],
    );
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.starts_with("kind: Upstream\n"), "{out}");
    // An invalid document on stdin is named as such.
    let out = run(
        &["apply", "-f", "-"],
        Some(&consul.url()),
        &[],
        Some(BAD_SHOP),
    );
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stderr
            .contains("<stdin> documents[0]: spec.routes[0].match.regex"),
        "{out}"
    );
}

#[test]
fn get_list_and_delete_with_exit_codes() {
    let consul = ConsulEmulator::start();
    let out = run(
        &["apply", "-f", "-"],
        Some(&consul.url()),
        &[],
        Some(&format!("{UPSTREAM}---\n{SHOP}")),
    );
    assert_eq!(out.code, 0, "{out}");
    consul.kv_put(
        "vmesh/config/VirtualService/api",
        r#"{"kind": "VirtualService", "name": "api", "spec": {"domains": ["api"], "routes": [{"upstream": "shop"}]}}"#,
    );

    let out = ctl(&consul, &["get", "VirtualService", "shop"]);
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(
        Some(out.stdout.clone()),
        value(&consul, "vmesh/config/VirtualService/shop")
    );
    let out = ctl(&consul, &["get", "vs", "shop", "-o", "json"]);
    assert_eq!(out.code, 0, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(json["kind"], "VirtualService");
    assert_eq!(json["spec"]["domains"][0], "shop.example.com");
    // A value stored as JSON is shown as YAML by default.
    let out = ctl(&consul, &["get", "virtualservices", "api"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(
        out.stdout.starts_with("kind: VirtualService\nname: api\n"),
        "{out}"
    );

    let out = ctl(&consul, &["get", "VIRTUALSERVICE"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "api\nshop\n"), "{out}");
    let out = ctl(&consul, &["get", "gw", "-o", "json"]);
    assert_eq!((out.code, out.stdout.trim()), (0, "[]"), "{out}");

    let out = ctl(&consul, &["get", "VirtualService", "nope"]);
    assert_eq!(out.code, 3, "{out}");
    assert!(out.stderr.contains("no VirtualService named nope"), "{out}");
    let out = ctl(&consul, &["get", "Route", "x"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("unknown kind"), "{out}");

    let out = ctl(&consul, &["delete", "vs", "shop"]);
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(out.stdout, "VirtualService/shop deleted\n", "{out}");
    assert!(value(&consul, "vmesh/config/VirtualService/shop").is_none());
    assert!(value(&consul, "vmesh/config/Upstream/shop").is_some());
    let out = ctl(&consul, &["delete", "VirtualService", "shop"]);
    assert_eq!(out.code, 3, "{out}");
    assert!(out.stderr.contains("no VirtualService named shop"), "{out}");
    let out = ctl(&consul, &["delete", "VirtualService"]);
    assert_eq!(out.code, 2, "{out}");
}

#[test]
fn status_reads_consul_and_shows_objects_without_status_as_pending() {
    let consul = ConsulEmulator::start();
    let out = run(
        &["apply", "-f", "-"],
        Some(&consul.url()),
        &[],
        Some(&format!("{UPSTREAM}---\n{SHOP}")),
    );
    assert_eq!(out.code, 0, "{out}");
    let judged = consul
        .kv_entry("vmesh/config/VirtualService/shop")
        .expect("entry")
        .modify_index;
    // What the leader writes (controller/src/status.rs ObjectStatus).
    let status = serde_json::json!({
        "kind": "VirtualService", "name": "shop", "state": "Rejected",
        "errors": [{"path": "spec.routes[0].match.regex", "message": "invalid regex: unclosed group"}],
        "warnings": [], "source": "vmesh/config/VirtualService/shop", "version": "0123456789abcdef",
        "servingLastGood": true, "servingVersion": "fedcba9876543210",
        "configModifyIndex": judged, "proxies": {"total": 2, "acked": 1}
    });
    consul.kv_put(
        "vmesh/status/VirtualService/shop",
        serde_json::to_vec_pretty(&status).expect("JSON"),
    );
    consul.kv_put("vmesh/config/Nope/x", "kind: Nope\n");

    // Something is Rejected: exit 5, for scripts.
    let out = ctl(&consul, &["status"]);
    assert_eq!(out.code, 5, "{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("KIND"), "{out}");
    assert!(
        lines[1].starts_with("Upstream        shop  Pending   0/0"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("VirtualService  shop  Rejected  1/2"),
        "{out}"
    );
    assert!(
        out.stdout
            .contains("  error: spec.routes[0].match.regex: invalid regex: unclosed group"),
        "{out}"
    );
    assert!(
        out.stdout.contains("serving the last accepted version"),
        "{out}"
    );
    assert!(
        out.stdout
            .contains("source vmesh/config/Nope/x: config keys are"),
        "{out}"
    );
    assert!(!out.stdout.contains("has not judged"), "{out}");

    // A change the controller has not judged yet says so.
    consul.kv_put(
        "vmesh/config/VirtualService/shop",
        SHOP.replace("shop.example.com", "x.example.com"),
    );
    let out = ctl(&consul, &["status", "vs", "shop"]);
    assert_eq!(out.code, 5, "{out}");
    assert!(
        out.stdout
            .contains("the controller has not judged the latest change yet"),
        "{out}"
    );
    assert!(
        !out.stdout.lines().any(|l| l.starts_with("Upstream")),
        "{out}"
    );
    // A filter shows the problems of the keys it selects only, and says what it left out.
    assert!(!out.stdout.contains("source vmesh/config/Nope/x"), "{out}");
    assert!(
        out.stdout
            .contains("(1 problem(s) of other sources not shown"),
        "{out}"
    );

    let out = ctl(&consul, &["status", "upstream", "-o", "json"]);
    assert_eq!(out.code, 0, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(json[0]["state"], "Pending", "{out}");
    assert_eq!(json[0]["name"], "shop", "{out}");

    let out = ctl(&consul, &["status", "Gateway", "edge"]);
    assert_eq!(out.code, 3, "{out}");
    assert!(out.stderr.contains("no Gateway named edge"), "{out}");

    // CONSUL_HTTP_ADDR alone chooses Consul over the admin endpoint.
    let out = run(
        &["status"],
        None,
        &[("CONSUL_HTTP_ADDR", &consul.url())],
        None,
    );
    assert_eq!(out.code, 5, "{out}");
    assert!(out.stdout.contains("Pending"), "{out}");
}

#[test]
fn consul_errors_exit_1_and_never_show_the_token() {
    let secret = "s3cret-0f-the-operator";
    let consul = ConsulEmulator::start_with(ConsulOptions {
        acl: Some(AclConfig::default().with_token(AclToken::new(
            secret,
            AclRules::default().key_prefix("vmesh/config/", KeyPolicy::Read),
        ))),
        ..ConsulOptions::default()
    });
    let out = run(
        &["apply", "-f", "-"],
        Some(&consul.url()),
        &[("CONSUL_HTTP_TOKEN", secret)],
        Some(UPSTREAM),
    );
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("403"), "{out}");
    assert!(out.stderr.contains("vmesh/config/Upstream/shop"), "{out}");
    assert!(
        out.stderr.contains("nothing was written before it"),
        "{out}"
    );
    assert!(!out.to_string().contains(secret), "{out}");
    assert!(consul.kv_list("").is_empty());

    // The token file works as the variable does; reading is allowed.
    let dir = temp_dir("token");
    let token_file = write(&dir, "token", &format!("{secret}\n"));
    let out = ctl(
        &consul,
        &["get", "upstream", "--consul-token-file", &token_file],
    );
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{out}");
    // Without a token, the anonymous token may not read.
    let out = ctl(&consul, &["get", "upstream", "shop"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("403"), "{out}");
    std::fs::remove_dir_all(&dir).expect("clean up");

    // --help documents the token without its value.
    let out = run(
        &["apply", "--help"],
        None,
        &[("CONSUL_HTTP_TOKEN", secret)],
        None,
    );
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("CONSUL_HTTP_TOKEN"), "{out}");
    assert!(out.stdout.contains("4  conflict"), "{out}");
    assert!(!out.stdout.contains(secret), "{out}");

    // Consul down.
    consul.stop();
    let out = ctl(&consul, &["get", "upstream"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("cannot reach Consul"), "{out}");
}

/// The real client and the emulator's CAS, with another writer changing a key between
/// vmeshctl reading it and writing it.
struct Racing<'a> {
    inner: vmeshctl::consul::ConsulKv,
    consul: &'a ConsulEmulator,
    key: &'a str,
    writes: std::cell::Cell<u32>,
}

impl Kv for Racing<'_> {
    fn get(&self, key: &str) -> anyhow::Result<Option<Stored>> {
        let stored = self.inner.get(key)?;
        if key == self.key {
            // A different value each time (an identical write would not move the index).
            self.writes.set(self.writes.get() + 1);
            let theirs = format!(
                "kind: Upstream\nname: shop\n# someone else {}\n",
                self.writes.get()
            );
            self.consul.kv_put(key, theirs);
        }
        Ok(stored)
    }
    fn list(&self, prefix: &str) -> anyhow::Result<Vec<Stored>> {
        self.inner.list(prefix)
    }
    fn put_cas(&self, key: &str, value: &[u8], cas: u64) -> anyhow::Result<bool> {
        self.inner.put_cas(key, value, cas)
    }
    fn delete_cas(&self, key: &str, cas: u64) -> anyhow::Result<bool> {
        self.inner.delete_cas(key, cas)
    }
}

#[test]
fn a_change_between_read_and_write_is_a_conflict() {
    let consul = ConsulEmulator::start();
    let args = ConsulArgs {
        flags: vmesh_consul::ConsulFlags {
            consul_addr: Some(consul.url()),
            ..Default::default()
        },
        prefix: "vmesh".into(),
    };
    let layout = Layout::new("vmesh");
    let text = format!("{SHOP}---\n{UPSTREAM}---\n{GATEWAY}");
    let planned = vmeshctl::apply::load(&[PathBuf::from("-")], &mut text.as_bytes())
        .expect("read")
        .expect("valid");

    // Created meanwhile (cas=0 refused).
    let kv = Racing {
        inner: args.connect().expect("client"),
        consul: &consul,
        key: "vmesh/config/VirtualService/shop",
        writes: Default::default(),
    };
    let mut out = Vec::new();
    let e = vmeshctl::apply::apply(&kv, &layout, &planned, false, &mut out).expect_err("conflict");
    assert_eq!(exit_code(&e), 4);
    let msg = format!("{e:#}");
    assert!(
        msg.contains("conflict: vmesh/config/VirtualService/shop changed after it was read"),
        "{msg}"
    );
    assert!(
        msg.contains("already written: Upstream/shop created"),
        "{msg}"
    );
    assert!(msg.contains("not attempted: Gateway/edge"), "{msg}");
    assert_eq!(
        String::from_utf8(out).expect("utf-8"),
        "Upstream/shop created\n"
    );
    assert!(value(&consul, "vmesh/config/VirtualService/shop")
        .expect("theirs")
        .contains("someone else"));
    assert!(value(&consul, "vmesh/config/Gateway/edge").is_none());

    // Modified meanwhile (cas=ModifyIndex refused), and delete the same way.
    consul.kv_put(
        "vmesh/config/Upstream/shop",
        UPSTREAM.replace("8080", "8081"),
    );
    let kv = Racing {
        inner: args.connect().expect("client"),
        consul: &consul,
        key: "vmesh/config/Upstream/shop",
        writes: Default::default(),
    };
    let e = vmeshctl::apply::apply(&kv, &layout, &planned[..1], false, &mut Vec::new())
        .expect_err("conflict");
    assert_eq!(exit_code(&e), 4, "{e:#}");
    let e = vmeshctl::get::delete(&kv, &layout, &planned[0].key).expect_err("conflict");
    assert_eq!(exit_code(&e), 4, "{e:#}");
    assert!(value(&consul, "vmesh/config/Upstream/shop").is_some());
}

/// Every key and value under `prefix`, as text.
fn kv_dump(consul: &ConsulEmulator, prefix: &str) -> String {
    consul
        .kv_list(prefix)
        .into_iter()
        .map(|e| format!("{}={}\n", e.key, String::from_utf8_lossy(&e.value)))
        .collect()
}

#[test]
fn token_create_list_revoke_and_agents() {
    let consul = ConsulEmulator::start();

    let out = ctl(&consul, &["token", "create"]);
    assert_eq!(out.code, 0, "{out}");
    let secret = out.stdout.trim_end().to_string();
    assert!(secret.starts_with("vmbt_"), "{out}");
    assert_eq!(out.stdout.lines().count(), 1, "the secret alone\n{out}");
    assert!(out.stderr.contains("VMESH_AGENT_TOKEN"), "{out}");
    assert!(out.stderr.contains("--token-file"), "{out}");
    assert!(out.stderr.contains("unlimited uses"), "{out}");
    let keys: Vec<String> = consul
        .kv_list("vmesh/tokens/")
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let id = keys[0].trim_start_matches("vmesh/tokens/").to_string();
    assert!(out.stderr.contains(&id), "the note names the id\n{out}");

    let out = ctl(&consul, &["token", "list"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.starts_with("ID "), "{out}");
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("no row for {id}\n{out}"));
    assert!(row.contains("unlimited"), "{row}");
    assert!(row.ends_with("active"), "{row}");
    let list_json = ctl(&consul, &["token", "list", "--format", "json"]);
    assert_eq!(list_json.code, 0, "{list_json}");
    let listed: serde_json::Value = serde_json::from_str(&list_json.stdout).expect("json");
    assert_eq!(listed[0]["id"], id.as_str(), "{list_json}");
    assert_eq!(listed[0]["state"], "active", "{list_json}");
    assert!(listed[0]["expires_unix"].is_u64(), "default TTL 24h");
    for text in [&out.stdout, &list_json.stdout, &kv_dump(&consul, "")] {
        assert!(!text.contains(&secret), "the secret leaked: {text}");
        assert!(!text.contains(&secret["vmbt_".len()..]), "{text}");
    }
    assert!(!list_json.stdout.contains("sha256"), "{list_json}");

    // An agent registered with the token (as the controller records it).
    let record = serde_json::json!({
        "spiffe_id": "spiffe://vmesh/dc/dc1/agent/vm-1",
        "token_id": id,
        "address": "10.0.0.7",
        "serial": "3f:0a",
        "registered_unix": 1_800_000_000u64,
        "not_after_unix": 1_800_086_400u64,
    });
    consul.kv_put("vmesh/agents/dc1/vm-1", record.to_string());
    let out = ctl(&consul, &["agent", "list"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.starts_with("NODE"), "{out}");
    let row = out.stdout.lines().nth(1).expect("a row");
    assert!(row.starts_with("vm-1  dc1  10.0.0.7"), "{out}");
    assert!(row.contains(&id) && row.ends_with("no"), "{out}");

    let out = ctl(&consul, &["token", "revoke", &id]);
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(
        out.stdout,
        format!("bootstrap token {id} revoked\nagent spiffe://vmesh/dc/dc1/agent/vm-1 revoked\n"),
        "{out}"
    );
    let out = ctl(&consul, &["token", "list"]);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with(&id) && l.ends_with("revoked")),
        "{out}"
    );
    let out = ctl(&consul, &["agent", "list", "--format", "json"]);
    let agents: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(agents[0]["node"], "vm-1", "{out}");
    assert_eq!(agents[0]["address"], "10.0.0.7", "{out}");
    assert_eq!(agents[0]["revoked"], true, "{out}");

    let out = ctl(&consul, &["token", "revoke", "0123456789abcdef"]);
    assert_eq!(out.code, 3, "{out}");
    assert!(
        out.stderr
            .contains("no bootstrap token with id 0123456789abcdef"),
        "{out}"
    );

    // Agents one by one; allow lifts a revocation, twice is not found.
    let out = ctl(&consul, &["agent", "allow", "vm-1"]);
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(
        out.stdout, "agent spiffe://vmesh/dc/dc1/agent/vm-1 allowed\n",
        "{out}"
    );
    assert!(consul.kv_get("vmesh/revoked/dc1/vm-1").is_none());
    let out = ctl(&consul, &["agent", "allow", "vm-1"]);
    assert_eq!(out.code, 3, "{out}");
    let out = run(
        &[
            "agent",
            "revoke",
            "vm-2",
            "--datacenter",
            "dc2",
            "--reason",
            "lost laptop",
        ],
        Some(&consul.url()),
        &[("VMESH_TRUST_DOMAIN", "example.org")],
        None,
    );
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(
        out.stdout, "agent spiffe://example.org/dc/dc2/agent/vm-2 revoked\n",
        "{out}"
    );
    assert!(out.stderr.contains("no agent is registered"), "{out}");
    let stored = value(&consul, "vmesh/revoked/dc2/vm-2").expect("revocation");
    let stored: serde_json::Value = serde_json::from_str(&stored).expect("json");
    assert_eq!(
        stored["spiffe_id"],
        "spiffe://example.org/dc/dc2/agent/vm-2"
    );
    assert_eq!(stored["reason"], "lost laptop");
    let out = ctl(&consul, &["agent", "list"]);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("vm-2  dc2  -") && l.ends_with("yes (lost laptop)")),
        "{out}"
    );
    let out = ctl(&consul, &["agent", "revoke", "../x"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("invalid node name"), "{out}");
}

#[test]
fn token_create_json_with_uses_and_bad_input() {
    let consul = ConsulEmulator::start();
    let out = ctl(
        &consul,
        &[
            "token", "create", "--uses", "1", "--node", "vm-1", "--ttl", "1h", "--format", "json",
            "--prefix", "mesh2",
        ],
    );
    assert_eq!(out.code, 0, "{out}");
    let created: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let secret = created["secret"].as_str().expect("secret");
    assert!(secret.starts_with("vmbt_"), "{out}");
    assert_eq!(created["uses"], 1, "{out}");
    assert_eq!(created["node"], "vm-1", "{out}");
    let id = created["id"].as_str().expect("id");
    let stored = value(&consul, &format!("mesh2/tokens/{id}")).expect("stored under the prefix");
    let record: serde_json::Value = serde_json::from_str(&stored).expect("json");
    assert_eq!(record["expires_unix"], created["expires_unix"], "{stored}");
    assert_eq!(record["uses_left"], 1, "{stored}");
    assert!(!stored.contains(secret), "{stored}");

    let out = ctl(&consul, &["token", "list", "--prefix", "mesh2"]);
    assert!(out.stdout.contains(id), "{out}");
    assert!(!out.stdout.contains(secret), "{out}");
    let out = ctl(
        &consul,
        &["token", "create", "--ttl", "never", "-o", "json"],
    );
    assert_eq!(out.code, 0, "{out}");
    let created: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert!(created["expires_unix"].is_null(), "{out}");
    assert!(created["uses"].is_null(), "{out}");

    let out = ctl(&consul, &["token", "create", "--ttl", "0"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("already expired"), "{out}");
    let out = ctl(&consul, &["token", "create", "--uses", "0"]);
    assert_eq!(out.code, 2, "{out}");
    assert_eq!(consul.kv_list("vmesh/").len(), 1, "nothing else written");
}

//! Conformance tests for the Consul HTTP API behaviours vmesh depends on (see
//! `/docs/testing-consul.md`). Raw HTTP only, no Consul client library.
//!
//! By default every test starts its own `ConsulEmulator`. With `CONSUL_HTTP_ADDR` set (and
//! `CONSUL_HTTP_TOKEN` if the server has ACLs) they run against that Consul instead, each under
//! its own random key prefix, cleaning up after themselves. Tests that need a knob only the
//! emulator has say so and, against a real server, print that they are not applicable.
//!
//! Settings for a real server: `VMESH_CONSUL_SESSION_TTL_MIN` (its `session_ttl_min`, default
//! `10s`) and `VMESH_CONSUL_DATACENTER` (default `dc1`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmesh_testkit::consul::{
    format_go_duration, new_uuid, parse_go_duration, AclConfig, AclRules, AclToken, CheckStatus,
    ConsulEmulator, ConsulOptions, KeyPolicy, ServiceRegistration,
};
use vmesh_testkit::{HttpClient, Response};

/// The short `session_ttl_min` the emulator runs with here (Consul's default is 10 s).
const EMULATOR_TTL_MIN: Duration = Duration::from_secs(1);

fn real_consul() -> Option<String> {
    let addr = std::env::var("CONSUL_HTTP_ADDR").ok()?;
    let addr = addr.trim().trim_end_matches('/');
    if addr.is_empty() {
        return None;
    }
    Some(if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    })
}

/// Where a test runs: its own emulator or the real Consul at `CONSUL_HTTP_ADDR`.
struct Target {
    emu: Option<ConsulEmulator>,
    base: String,
    token: Option<String>,
    /// Every key this test touches starts with this (`vmesh-conformance/<test>-<random>/`).
    prefix: String,
    client: HttpClient,
    sessions: Mutex<Vec<String>>,
    /// Agent services this test registered (deregistered at the end).
    services: Mutex<Vec<String>>,
    ttl_min: Duration,
    dc: String,
}

impl Target {
    /// Against the emulator (with a 1 s `session_ttl_min`) or the real Consul.
    fn new(test: &str) -> Target {
        Self::with_options(
            test,
            ConsulOptions {
                session_ttl_min: EMULATOR_TTL_MIN,
                ..Default::default()
            },
        )
    }

    fn with_options(test: &str, opts: ConsulOptions) -> Target {
        let prefix = format!("vmesh-conformance/{test}-{}/", &new_uuid()[..8]);
        let client = HttpClient::with_timeout(Duration::from_secs(30), true);
        match real_consul() {
            Some(base) => Target {
                emu: None,
                base,
                token: std::env::var("CONSUL_HTTP_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty()),
                prefix,
                client,
                sessions: Mutex::new(Vec::new()),
                services: Mutex::new(Vec::new()),
                ttl_min: std::env::var("VMESH_CONSUL_SESSION_TTL_MIN")
                    .ok()
                    .map(|s| parse_go_duration(&s).expect("VMESH_CONSUL_SESSION_TTL_MIN"))
                    .unwrap_or(Duration::from_secs(10)),
                dc: std::env::var("VMESH_CONSUL_DATACENTER").unwrap_or_else(|_| "dc1".into()),
            },
            None => {
                let ttl_min = opts.session_ttl_min;
                let dc = opts.datacenter.clone();
                let emu = ConsulEmulator::start_with(opts);
                Target {
                    base: emu.url(),
                    emu: Some(emu),
                    token: None,
                    prefix,
                    client,
                    sessions: Mutex::new(Vec::new()),
                    services: Mutex::new(Vec::new()),
                    ttl_min,
                    dc,
                }
            }
        }
    }

    /// For tests that need a knob only the emulator has: `None`, after saying so, when the
    /// target is a real Consul.
    fn emulator_only(test: &str, needs: &str, opts: ConsulOptions) -> Option<Target> {
        if real_consul().is_some() {
            println!(
                "{test}: not applicable to a real Consul server (needs the emulator's {needs})"
            );
            return None;
        }
        Some(Self::with_options(test, opts))
    }

    /// [`Target::emulator_only`] with options that depend on the test's key prefix.
    fn emulator_only_with(
        test: &str,
        needs: &str,
        make: impl FnOnce(&str) -> ConsulOptions,
    ) -> Option<Target> {
        let mut t = Self::emulator_only(test, needs, ConsulOptions::default())?;
        let emu = ConsulEmulator::start_with(make(&t.prefix));
        t.base = emu.url();
        t.emu = Some(emu);
        Some(t)
    }

    fn emu(&self) -> &ConsulEmulator {
        self.emu.as_ref().expect("emulator target")
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// `path` is below `/v1/`, with its query.
    fn req(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        self.req_token(method, path, body, self.token.as_deref())
    }

    fn req_token(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        token: Option<&str>,
    ) -> Response {
        let url = format!("{}/v1/{path}", self.base);
        let headers: Vec<(&str, &str)> = token.map(|t| ("x-consul-token", t)).into_iter().collect();
        self.client
            .request(method, &url, &headers, body)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn get(&self, path: &str) -> Response {
        self.req("GET", path, None)
    }

    fn put(&self, path: &str, body: &[u8]) -> Response {
        self.req("PUT", path, Some(body))
    }

    fn delete(&self, path: &str) -> Response {
        self.req("DELETE", path, None)
    }

    /// PUT a key and expect `true`.
    fn put_kv(&self, key: &str, value: &[u8]) {
        let r = self.put(&format!("kv/{key}"), value);
        assert_eq!((r.status, r.body.trim()), (200, "true"), "PUT {key}");
    }

    /// The single entry of a key (200 expected).
    fn entry(&self, key: &str) -> Value {
        let r = self.get(&format!("kv/{key}"));
        assert_eq!(r.status, 200, "GET {key}: {}", r.body);
        json_of(&r)[0].clone()
    }

    fn create_session(&self, body: Value) -> String {
        let r = self.put("session/create", body.to_string().as_bytes());
        assert_eq!(r.status, 200, "session create: {}", r.body);
        let id = json_of(&r)["ID"]
            .as_str()
            .expect("ID is a string")
            .to_owned();
        self.sessions.lock().expect("lock").push(id.clone());
        id
    }

    /// A service ID (and name) unique to this test run: `vmesh-conf-<test>-<random>-<suffix>`.
    fn service_id(&self, suffix: &str) -> String {
        let tail = self
            .prefix
            .trim_start_matches("vmesh-conformance/")
            .trim_end_matches('/');
        format!("vmesh-conf-{tail}-{suffix}")
    }

    /// `PUT /v1/agent/service/register` with this body (200 expected); remembers the ID for
    /// cleanup.
    fn register(&self, body: Value) {
        self.register_query(body, "");
    }

    fn register_query(&self, body: Value, query: &str) {
        let id = body["ID"]
            .as_str()
            .or(body["Name"].as_str())
            .expect("ID or Name")
            .to_owned();
        self.services.lock().expect("lock").push(id);
        let r = self.put(
            &format!("agent/service/register{query}"),
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 200, "register: {}", r.body);
    }

    /// The agent's node name (`Config.NodeName` of `/v1/agent/self`).
    fn node_name(&self) -> String {
        let r = self.get("agent/self");
        assert_eq!(r.status, 200, "agent/self: {}", r.body);
        json_of(&r)["Config"]["NodeName"]
            .as_str()
            .expect("NodeName")
            .to_owned()
    }

    /// `GET /v1/agent/checks` (a map from check ID to check).
    fn agent_checks(&self) -> Value {
        let r = self.get("agent/checks");
        assert_eq!(r.status, 200, "agent/checks: {}", r.body);
        json_of(&r)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if self.emu.is_some() {
            return;
        }
        for id in self.services.lock().map(|s| s.clone()).unwrap_or_default() {
            let _ = self.client.request(
                "PUT",
                &format!("{}/v1/agent/service/deregister/{id}", self.base),
                &self
                    .token
                    .as_deref()
                    .map(|t| ("x-consul-token", t))
                    .into_iter()
                    .collect::<Vec<_>>(),
                None,
            );
        }
        for id in self.sessions.lock().map(|s| s.clone()).unwrap_or_default() {
            let _ = self.client.request(
                "PUT",
                &format!("{}/v1/session/destroy/{id}", self.base),
                &self
                    .token
                    .as_deref()
                    .map(|t| ("x-consul-token", t))
                    .into_iter()
                    .collect::<Vec<_>>(),
                None,
            );
        }
        let _ = self.client.request(
            "DELETE",
            &format!("{}/v1/kv/{}?recurse", self.base, self.prefix),
            &self
                .token
                .as_deref()
                .map(|t| ("x-consul-token", t))
                .into_iter()
                .collect::<Vec<_>>(),
            None,
        );
    }
}

fn json_of(r: &Response) -> Value {
    r.json().unwrap_or_else(|e| panic!("{e}"))
}

#[track_caller]
fn index_of(r: &Response) -> u64 {
    r.header("x-consul-index")
        .unwrap_or_else(|| panic!("no X-Consul-Index (status {}): {:?}", r.status, r.headers))
        .parse()
        .expect("X-Consul-Index is a u64")
}

fn b64(bytes: &[u8]) -> String {
    use std::fmt::Write;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                let _ = out.write_char(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The parts of a recurse read a client compares: key, ModifyIndex, value, session.
fn content(v: &Value) -> Vec<(String, u64, Value, Value)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["Key"].as_str().unwrap_or_default().to_owned(),
                        e["ModifyIndex"].as_u64().unwrap_or_default(),
                        e["Value"].clone(),
                        e["Session"].clone(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// KV

#[test]
fn kv_put_then_get_returns_one_entry_with_consul_shape() {
    let t = Target::new("shape");
    let key = t.key("config/Route/a");
    t.put_kv(&key, b"hello");
    let r = t.get(&format!("kv/{key}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-consul-knownleader"), Some("true"));
    assert!(r.header("x-consul-lastcontact").is_some());
    let v = json_of(&r);
    let arr = v.as_array().expect("an array");
    assert_eq!(arr.len(), 1, "{v}");
    let e = &arr[0];
    assert_eq!(e["Key"], key.as_str());
    assert_eq!(e["Value"], b64(b"hello"));
    assert_eq!(e["Flags"], 0);
    assert_eq!(e["LockIndex"], 0);
    assert!(
        e.get("Session").is_none(),
        "no Session on an unlocked key: {e}"
    );
    let modify = e["ModifyIndex"].as_u64().expect("ModifyIndex");
    assert!(modify > 0);
    assert_eq!(
        e["CreateIndex"].as_u64(),
        Some(modify),
        "new key: created when modified"
    );
    assert_eq!(
        index_of(&r),
        modify,
        "a single-key read's index is its ModifyIndex"
    );
}

#[test]
fn kv_values_are_base64_and_empty_is_null() {
    let t = Target::new("base64");
    let bin: Vec<u8> = (0u8..=255).collect();
    t.put_kv(&t.key("bin"), &bin);
    assert_eq!(t.entry(&t.key("bin"))["Value"], b64(&bin));
    t.put_kv(&t.key("empty"), b"");
    assert_eq!(t.entry(&t.key("empty"))["Value"], Value::Null);
    t.put_kv(&t.key("utf8"), "grüße ✓".as_bytes());
    assert_eq!(t.entry(&t.key("utf8"))["Value"], b64("grüße ✓".as_bytes()));
}

#[test]
fn kv_missing_key_is_404_with_index() {
    let t = Target::new("missing");
    t.put_kv(&t.key("present"), b"x");
    let written = t.entry(&t.key("present"))["ModifyIndex"]
        .as_u64()
        .expect("index");
    let r = t.get(&format!("kv/{}", t.key("absent")));
    assert_eq!(r.status, 404);
    assert_eq!(r.body, "");
    // Consul answers a missing key with the KV store's index (at least every KV write so far).
    assert!(index_of(&r) >= written, "{} < {written}", index_of(&r));
    let r = t.get(&format!("kv/{}?recurse", t.key("nothing/")));
    assert_eq!(r.status, 404);
    assert!(index_of(&r) >= 1);
}

#[test]
fn kv_recurse_keys_separator_and_raw() {
    let t = Target::new("listing");
    for (k, v) in [
        ("a", "1"),
        ("dir/b", "2"),
        ("dir/c", "3"),
        ("dir/sub/d", "4"),
        ("e", "5"),
    ] {
        t.put_kv(&t.key(k), v.as_bytes());
    }
    let r = t.get(&format!("kv/{}?recurse", t.prefix));
    assert_eq!(r.status, 200);
    let keys: Vec<String> = json_of(&r)
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["Key"].as_str().expect("Key").to_owned())
        .collect();
    let want: Vec<String> = ["a", "dir/b", "dir/c", "dir/sub/d", "e"]
        .iter()
        .map(|k| t.key(k))
        .collect();
    assert_eq!(keys, want, "every key under the prefix, in order");

    let r = t.get(&format!("kv/{}?keys", t.prefix));
    assert_eq!(json_of(&r), json!(want));
    let r = t.get(&format!("kv/{}?keys&separator=/", t.prefix));
    assert_eq!(
        json_of(&r),
        json!([t.key("a"), t.key("dir/"), t.key("e")]),
        "one level"
    );
    let r = t.get(&format!("kv/{}?keys&separator=/", t.key("dir/")));
    assert_eq!(
        json_of(&r),
        json!([t.key("dir/b"), t.key("dir/c"), t.key("dir/sub/")])
    );
    let r = t.get(&format!("kv/{}?keys", t.key("none/")));
    assert_eq!(r.status, 404, "no keys under a prefix: 404");

    let r = t.get(&format!("kv/{}?raw", t.key("dir/c")));
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "3"),
        "raw: the bytes alone"
    );
    assert!(r.header("x-consul-index").is_some());
    let r = t.get(&format!("kv/{}?raw", t.key("dir/zzz")));
    assert_eq!(r.status, 404);

    // Recurse on a key name is a prefix match, not a directory match.
    let r = t.get(&format!("kv/{}?recurse", t.key("di")));
    assert_eq!(json_of(&r).as_array().map(Vec::len), Some(3));
}

#[test]
fn kv_modify_index_moves_on_write_and_create_index_stays() {
    let t = Target::new("index-moves");
    let key = t.key("k");
    t.put_kv(&key, b"v1");
    let first = t.entry(&key);
    t.put_kv(&key, b"v2");
    let second = t.entry(&key);
    assert!(
        second["ModifyIndex"].as_u64() > first["ModifyIndex"].as_u64(),
        "{first} -> {second}"
    );
    assert_eq!(second["CreateIndex"], first["CreateIndex"]);
    // Another key's write moves the store's index past this one too.
    t.put_kv(&t.key("other"), b"x");
    let other = t.entry(&t.key("other"));
    assert!(other["ModifyIndex"].as_u64() > second["ModifyIndex"].as_u64());
    // Sessions share the same raft index.
    let s = t.create_session(json!({"Name": "index-moves"}));
    let info = t.get(&format!("session/info/{s}"));
    let created = json_of(&info)[0]["CreateIndex"]
        .as_u64()
        .expect("CreateIndex");
    assert!(created > other["ModifyIndex"].as_u64().expect("index"));
}

#[test]
fn kv_prefix_index_is_highest_modify_index_under_prefix() {
    let t = Target::new("prefix-index");
    let dir = t.key("dir/");
    for k in ["a", "b", "c"] {
        t.put_kv(&format!("{dir}{k}"), k.as_bytes());
    }
    t.put_kv(&format!("{dir}a"), b"again");
    let r = t.get(&format!("kv/{dir}?recurse"));
    let max = json_of(&r)
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|e| e["ModifyIndex"].as_u64())
        .max()
        .expect("entries");
    assert_eq!(index_of(&r), max);
    let r = t.get(&format!("kv/{dir}?keys"));
    assert_eq!(index_of(&r), max, "?keys has the same index");
    // A write outside the prefix does not move it.
    t.put_kv(&t.key("elsewhere"), b"x");
    let r = t.get(&format!("kv/{dir}?recurse"));
    assert_eq!(index_of(&r), max);
}

#[test]
fn kv_delete_moves_prefix_index() {
    let t = Target::new("delete-index");
    let dir = t.key("dir/");
    t.put_kv(&format!("{dir}a"), b"1");
    t.put_kv(&format!("{dir}b"), b"2");
    let before = index_of(&t.get(&format!("kv/{dir}?recurse")));
    let r = t.delete(&format!("kv/{dir}b"));
    assert_eq!((r.status, r.body.trim()), (200, "true"));
    let r = t.get(&format!("kv/{dir}?recurse"));
    let after = index_of(&r);
    assert!(
        after > before,
        "a delete moves the prefix index: {before} -> {after}"
    );
    let remaining = json_of(&r);
    assert_eq!(remaining.as_array().map(Vec::len), Some(1));
    assert!(
        after > remaining[0]["ModifyIndex"].as_u64().expect("index"),
        "tombstone index"
    );
    // Deleting a missing key still answers true; recurse delete empties the prefix.
    assert_eq!(t.delete(&format!("kv/{dir}nope")).body.trim(), "true");
    assert_eq!(t.delete(&format!("kv/{dir}?recurse")).body.trim(), "true");
    let r = t.get(&format!("kv/{dir}?recurse"));
    assert_eq!(r.status, 404);
    assert!(index_of(&r) > after);
}

#[test]
fn cas_writes_only_at_the_given_index() {
    let t = Target::new("cas");
    let key = t.key("k");
    let r = t.put(&format!("kv/{key}?cas=0"), b"first");
    assert_eq!(r.body.trim(), "true", "cas=0 creates an absent key");
    let r = t.put(&format!("kv/{key}?cas=0"), b"second");
    assert_eq!(r.body.trim(), "false", "cas=0 on an existing key");
    let idx = t.entry(&key)["ModifyIndex"].as_u64().expect("index");
    let r = t.put(&format!("kv/{key}?cas={}", idx + 1000), b"x");
    assert_eq!(r.body.trim(), "false", "wrong index");
    let r = t.put(&format!("kv/{key}?cas={idx}"), b"third");
    assert_eq!(r.body.trim(), "true");
    let e = t.entry(&key);
    assert_eq!(e["Value"], b64(b"third"));
    let r = t.put(&format!("kv/{key}?cas={idx}"), b"stale");
    assert_eq!(r.body.trim(), "false", "the old index is stale now");
    let now = e["ModifyIndex"].as_u64().expect("index");
    let r = t.delete(&format!("kv/{key}?cas={idx}"));
    assert_eq!(r.body.trim(), "false", "delete with a stale index");
    let r = t.delete(&format!("kv/{key}?cas={now}"));
    assert_eq!(r.body.trim(), "true");
    assert_eq!(t.get(&format!("kv/{key}")).status, 404);
    let r = t.put(&format!("kv/{}?cas=5", t.key("absent")), b"x");
    assert_eq!(r.body.trim(), "false", "cas=N on a missing key");
}

#[test]
fn flags_are_stored_and_reset_by_a_plain_put() {
    let t = Target::new("flags");
    let key = t.key("k");
    let r = t.put(&format!("kv/{key}?flags=42"), b"v");
    assert_eq!(r.body.trim(), "true");
    assert_eq!(t.entry(&key)["Flags"], 42);
    t.put_kv(&key, b"v2");
    assert_eq!(t.entry(&key)["Flags"], 0, "flags default to 0 on every PUT");
    let r = t.put(&format!("kv/{key}?flags=18446744073709551615"), b"v3");
    assert_eq!(r.body.trim(), "true");
    assert_eq!(t.entry(&key)["Flags"], u64::MAX);
}

#[test]
fn values_over_the_limit_get_413() {
    let t = Target::new("limit");
    let limit = 512 * 1024;
    let r = t.put(&format!("kv/{}", t.key("max")), &vec![b'x'; limit]);
    assert_eq!(
        (r.status, r.body.trim()),
        (200, "true"),
        "exactly 512 KiB is allowed"
    );
    let r = t.put(&format!("kv/{}", t.key("over")), &vec![b'x'; limit + 1]);
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body.contains("524288"), "names the limit: {}", r.body);
    assert_eq!(t.get(&format!("kv/{}", t.key("over"))).status, 404);
    if t.emu.is_some() {
        assert!(r.body.contains("too large"), "{}", r.body);
        // The limit is configurable (Consul: kv_max_value_size).
        let small = Target::with_options(
            "limit-small",
            ConsulOptions {
                max_value_size: 10,
                ..Default::default()
            },
        );
        let r = small.put(&format!("kv/{}", small.key("k")), b"01234567890");
        assert_eq!(r.status, 413);
        assert!(r.body.contains("max size: 10 bytes"), "{}", r.body);
    }
}

#[test]
fn request_errors_are_400() {
    let t = Target::new("errors");
    assert_eq!(t.get("kv/").status, 400, "GET without a key");
    assert_eq!(t.put("kv/", b"x").status, 400, "PUT without a key");
    let r = t.put(&format!("kv/{}?cas=0&acquire=x", t.key("k")), b"x");
    assert_eq!(r.status, 400, "conflicting flags: {}", r.body);
    let r = t.get(&format!("kv/{}?index=abc", t.key("k")));
    assert_eq!(r.status, 400, "bad index: {}", r.body);
}

// ---------------------------------------------------------------------------------------------
// Blocking queries

#[test]
fn blocking_query_returns_when_the_prefix_changes() {
    let t = Target::new("block-change");
    let dir = t.key("dir/");
    t.put_kv(&format!("{dir}a"), b"1");
    let idx = index_of(&t.get(&format!("kv/{dir}?recurse")));
    let (r, elapsed) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let start = Instant::now();
            let r = t.get(&format!("kv/{dir}?recurse&index={idx}&wait=10s"));
            (r, start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        t.put_kv(&format!("{dir}a"), b"2");
        h.join().expect("blocking thread")
    });
    assert_eq!(r.status, 200);
    assert!(
        elapsed < Duration::from_secs(5),
        "returned on change, not at the wait end: {elapsed:?}"
    );
    assert!(index_of(&r) > idx);
    assert_eq!(json_of(&r)[0]["Value"], b64(b"2"));
    // A single key blocks the same way.
    let key_idx = index_of(&r);
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| t.get(&format!("kv/{dir}a?index={key_idx}&wait=10s")));
        std::thread::sleep(Duration::from_millis(300));
        t.put_kv(&format!("{dir}a"), b"3");
        h.join().expect("blocking thread")
    });
    assert_eq!(json_of(&r)[0]["Value"], b64(b"3"));
}

#[test]
fn blocking_query_returns_at_wait_end_with_same_index_and_body() {
    let t = Target::new("block-timeout");
    let dir = t.key("dir/");
    t.put_kv(&format!("{dir}a"), b"1");
    let first = t.get(&format!("kv/{dir}?recurse"));
    let idx = index_of(&first);
    let start = Instant::now();
    let r = t.get(&format!("kv/{dir}?recurse&index={idx}&wait=1s"));
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(950),
        "waited the whole wait: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(1000 + 1000 / 16 + 1500),
        "wait + jitter: {elapsed:?}"
    );
    assert_eq!(r.status, 200);
    assert_eq!(index_of(&r), idx);
    assert_eq!(json_of(&r), json_of(&first), "same body");
}

/// Consul's guidance: a blocking query can return with nothing changed for it, so clients
/// compare content. Two ways this happens with every Consul version are checked.
#[test]
fn wakeup_without_change_returns_same_content() {
    let t = Target::new("block-same");
    let dir = t.key("dir/");
    t.put_kv(&format!("{dir}a"), b"1");
    let first = t.get(&format!("kv/{dir}?recurse"));
    let idx = index_of(&first);

    // 1. A key is created and deleted again under the prefix before the client's next query:
    //    the tombstone moves the index, the query returns at once, the content is what it was.
    t.put_kv(&format!("{dir}tmp"), b"t");
    assert_eq!(t.delete(&format!("kv/{dir}tmp")).body.trim(), "true");
    let start = Instant::now();
    let r = t.get(&format!("kv/{dir}?recurse&index={idx}&wait=5s"));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "index moved: returns at once"
    );
    assert!(index_of(&r) > idx);
    assert_eq!(
        content(&json_of(&r)),
        content(&json_of(&first)),
        "same content"
    );

    // 2. An empty prefix: its index is the whole KV store's, so a write elsewhere moves it. (Older
    //    Consul versions wake such a query at once; newer ones may keep blocking on a not-found
    //    result until the wait ends. Either way the answer is still "nothing here".)
    let empty = t.key("empty/");
    let r0 = t.get(&format!("kv/{empty}?recurse"));
    assert_eq!(r0.status, 404);
    let idx0 = index_of(&r0);
    let (r, elapsed) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let start = Instant::now();
            (
                t.get(&format!("kv/{empty}?recurse&index={idx0}&wait=2s")),
                start.elapsed(),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        t.put_kv(&t.key("unrelated"), b"x");
        h.join().expect("blocking thread")
    });
    assert_eq!(
        (r.status, r.body.as_str()),
        (404, ""),
        "still nothing under the prefix"
    );
    assert!(index_of(&r) >= idx0);
    if t.emu.is_some() {
        assert!(
            elapsed < Duration::from_millis(1500),
            "emulator wakes at once: {elapsed:?}"
        );
        assert!(
            index_of(&r) > idx0,
            "with a higher index and the same (empty) body"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions and locks

#[test]
fn session_create_info_renew_list_destroy() {
    let t = Target::new("sessions");
    let ttl = format_go_duration(t.ttl_min * 2);
    let id = t.create_session(
        json!({"Name": "vmesh-test", "TTL": ttl, "Behavior": "delete", "LockDelay": "2s"}),
    );
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(id.matches('-').count(), 4, "a UUID: {id}");

    let r = t.get(&format!("session/info/{id}"));
    assert_eq!(r.status, 200);
    let idx = index_of(&r);
    let v = json_of(&r);
    let s = &v[0];
    assert_eq!(s["ID"], id.as_str());
    assert_eq!(s["Name"], "vmesh-test");
    assert_eq!(s["Behavior"], "delete");
    assert_eq!(s["TTL"], ttl.as_str());
    assert_eq!(s["LockDelay"], 2_000_000_000u64, "LockDelay in nanoseconds");
    assert!(s["Node"].as_str().is_some_and(|n| !n.is_empty()));
    assert_eq!(s["CreateIndex"].as_u64(), Some(idx));

    let r = t.put(&format!("session/renew/{id}"), b"");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        json_of(&r)[0]["ID"],
        id.as_str(),
        "renew answers with the session"
    );

    let list = json_of(&t.get("session/list"));
    assert!(list
        .as_array()
        .expect("array")
        .iter()
        .any(|s| s["ID"] == id.as_str()));

    let r = t.put(&format!("session/destroy/{id}"), b"");
    assert_eq!((r.status, r.body.trim()), (200, "true"));
    let r = t.get(&format!("session/info/{id}"));
    assert_eq!(
        (r.status, json_of(&r)),
        (200, json!([])),
        "unknown session: empty list"
    );
    assert!(index_of(&r) > idx, "destroy moves the sessions index");
    let r = t.put(&format!("session/renew/{id}"), b"");
    assert_eq!(r.status, 404, "renewing an unknown session: {}", r.body);

    // Defaults: release behaviour, 15 s lock delay, no TTL.
    let d = t.create_session(json!({}));
    let s = &json_of(&t.get(&format!("session/info/{d}")))[0];
    assert_eq!(s["Behavior"], "release");
    assert_eq!(s["LockDelay"], 15_000_000_000u64);
    assert_eq!(s["TTL"], "");
}

#[test]
fn session_ttl_below_minimum_is_rejected() {
    let t = Target::new("ttl-min");
    let short = format!("{}ms", (t.ttl_min / 2).as_millis().max(1));
    let r = t.put(
        "session/create",
        json!({"TTL": short}).to_string().as_bytes(),
    );
    assert!(
        r.status >= 400,
        "TTL {short} below the minimum accepted: {}",
        r.body
    );
    assert!(r.body.contains("Invalid Session TTL"), "{}", r.body);
    let too_long = t.put(
        "session/create",
        json!({"TTL": "25h"}).to_string().as_bytes(),
    );
    assert!(too_long.status >= 400, "above 24h: {}", too_long.body);
}

#[test]
fn session_ttl_expiry_releases_or_deletes_locks() {
    // Against a real Consul this takes up to 2 x its session_ttl_min (Consul may invalidate
    // anywhere between TTL and 2 x TTL); the emulator runs with a 1 s minimum.
    let t = Target::new("ttl-expiry");
    let ttl = format_go_duration(t.ttl_min);
    let release = t.create_session(json!({"TTL": ttl, "Behavior": "release", "LockDelay": "1s"}));
    let delete = t.create_session(json!({"TTL": ttl, "Behavior": "delete", "LockDelay": "1s"}));
    let kept = t.create_session(json!({"TTL": ttl, "LockDelay": "1s"}));
    let (k1, k2, k3) = (t.key("released"), t.key("deleted"), t.key("kept"));
    for (k, s) in [(&k1, &release), (&k2, &delete), (&k3, &kept)] {
        let r = t.put(&format!("kv/{k}?acquire={s}"), b"held");
        assert_eq!(r.body.trim(), "true", "acquire {k}");
    }
    let held_index = t.entry(&k1)["ModifyIndex"].as_u64().expect("index");
    let start = Instant::now();
    let limit = t.ttl_min * 2 + Duration::from_secs(3);
    loop {
        // Renew `kept` well within its TTL.
        assert_eq!(
            t.put(&format!("session/renew/{kept}"), b"").status,
            200,
            "kept session renewed"
        );
        let e = t.entry(&k1);
        if e.get("Session").is_none() {
            assert_eq!(e["LockIndex"], 1, "released, LockIndex unchanged");
            assert!(e["ModifyIndex"].as_u64().expect("index") > held_index);
            break;
        }
        assert!(
            start.elapsed() < limit,
            "session not invalidated after {limit:?}"
        );
        std::thread::sleep(t.ttl_min / 5);
    }
    vmesh_testkit::eventually(
        Duration::from_secs(3),
        "the delete-behaviour key deleted",
        || match t.get(&format!("kv/{k2}")).status {
            404 => Ok(()),
            s => Err(format!("status {s}")),
        },
    );
    assert_eq!(
        json_of(&t.get(&format!("session/info/{release}"))),
        json!([])
    );
    assert_eq!(
        t.entry(&k3)["Session"],
        kept.as_str(),
        "the renewed session keeps its lock"
    );
}

#[test]
fn acquire_release_lock_index_and_lock_delay() {
    let t = Target::new("locks");
    let a = t.create_session(json!({"Name": "a", "LockDelay": "1s"}));
    let b = t.create_session(json!({"Name": "b", "LockDelay": "1s"}));
    let key = t.key("leader");
    let acquire = |s: &str, v: &str| {
        t.put(&format!("kv/{key}?acquire={s}"), v.as_bytes())
            .body
            .trim()
            .to_owned()
    };
    let release = |s: &str| {
        t.put(&format!("kv/{key}?release={s}"), b"")
            .body
            .trim()
            .to_owned()
    };

    assert_eq!(acquire(&a, "a"), "true");
    let e = t.entry(&key);
    assert_eq!(
        (e["LockIndex"].as_u64(), e["Session"].as_str()),
        (Some(1), Some(a.as_str()))
    );
    assert_eq!(e["Value"], b64(b"a"), "acquire writes the value");
    assert_eq!(acquire(&b, "b"), "false", "held by another session");
    assert_eq!(acquire(&a, "a2"), "true", "the holder may acquire again");
    assert_eq!(t.entry(&key)["LockIndex"], 1, "re-acquire keeps LockIndex");
    // A plain PUT does not take the lock away.
    t.put_kv(&key, b"plain");
    assert_eq!(t.entry(&key)["Session"], a.as_str());
    assert_eq!(release(&b), "false", "only the holder releases");
    assert_eq!(release(&a), "true");
    let e = t.entry(&key);
    assert!(e.get("Session").is_none(), "{e}");
    assert_eq!(e["LockIndex"], 1);
    // An explicit release has no lock delay.
    assert_eq!(acquire(&b, "b"), "true");
    assert_eq!(t.entry(&key)["LockIndex"], 2);

    // Invalidating the holder releases the lock and starts its lock delay.
    assert_eq!(
        t.put(&format!("session/destroy/{b}"), b"").body.trim(),
        "true"
    );
    let destroyed_at = Instant::now();
    let e = t.entry(&key);
    assert!(e.get("Session").is_none(), "destroy released the lock: {e}");
    assert_eq!(acquire(&a, "a3"), "false", "within the lock delay");
    let mut ok = false;
    while destroyed_at.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(100));
        if acquire(&a, "a3") == "true" {
            ok = true;
            break;
        }
    }
    assert!(ok, "acquirable after the lock delay");
    assert!(
        destroyed_at.elapsed() >= Duration::from_millis(900),
        "not before the delay"
    );
    assert_eq!(t.entry(&key)["LockIndex"], 3);

    let r = t.put(
        &format!("kv/{}?acquire={}", t.key("other"), new_uuid()),
        b"",
    );
    assert!(
        r.status >= 400,
        "acquire with an unknown session: {} {}",
        r.status,
        r.body
    );
}

// ---------------------------------------------------------------------------------------------
// The local agent

#[test]
fn agent_self_reports_datacenter_node_and_member_addr() {
    let t = Target::new("agent-self");
    let r = t.get("agent/self");
    assert_eq!(r.status, 200, "{}", r.body);
    let v = json_of(&r);
    assert_eq!(v["Config"]["Datacenter"], t.dc.as_str());
    let node = v["Config"]["NodeName"].as_str().expect("NodeName");
    assert!(!node.is_empty());
    let id = v["Config"]["NodeID"].as_str().expect("NodeID");
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let addr = v["Member"]["Addr"].as_str().expect("Member.Addr");
    addr.parse::<std::net::IpAddr>()
        .unwrap_or_else(|e| panic!("Member.Addr {addr:?}: {e}"));
    if let Some(emu) = &t.emu {
        assert_eq!(node, emu.node_name());
        assert_eq!(id, emu.node_id());
        assert_eq!(addr, "127.0.0.1");
        assert_eq!(v["Member"]["Name"], node);
    }
}

#[test]
fn agent_register_lists_service_with_consul_shape() {
    let t = Target::new("agent-register");
    let id = t.service_id("web-1");
    let name = t.service_id("web");
    t.register(json!({
        "ID": id, "Name": name, "Tags": ["v1", "primary"], "Meta": {"version": "1"},
        "Address": "", "Port": 8080,
    }));
    // Without an ID the name is the ID; TaggedAddresses and Weights come back as given.
    let bare = t.service_id("bare");
    let tagged = json!({"lan": {"Address": "10.0.0.1", "Port": 80}});
    t.register(json!({
        "Name": bare, "Port": 9000, "Address": "10.0.0.1",
        "TaggedAddresses": tagged, "Weights": {"Passing": 3, "Warning": 2},
    }));
    let r = t.get("agent/services");
    assert_eq!(r.status, 200);
    let v = json_of(&r);
    let s = &v[id.as_str()];
    assert_eq!(s["ID"], id.as_str(), "{v}");
    assert_eq!(s["Service"], name.as_str());
    assert_eq!(s["Tags"], json!(["v1", "primary"]));
    assert_eq!(s["Meta"], json!({"version": "1"}));
    assert_eq!(s["Port"], 8080);
    assert_eq!(
        s["Address"], "",
        "an empty Address stays empty (the node's address)"
    );
    assert_eq!(s["Weights"], json!({"Passing": 1, "Warning": 1}));
    assert_eq!(s["EnableTagOverride"], false);
    assert_eq!(s["Datacenter"], t.dc.as_str());
    assert!(
        s.get("TaggedAddresses").is_none(),
        "omitted when not given: {s}"
    );
    let b = &v[bare.as_str()];
    assert_eq!(b["ID"], bare.as_str());
    assert_eq!(b["Service"], bare.as_str());
    assert_eq!(b["Tags"], json!([]));
    assert_eq!(b["Meta"], json!({}));
    assert_eq!(b["Address"], "10.0.0.1");
    assert_eq!(b["TaggedAddresses"], tagged);
    assert_eq!(b["Weights"], json!({"Passing": 3, "Warning": 2}));
    let r = t.put(
        "agent/service/register",
        json!({"Port": 1}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 400, "no Name: {}", r.body);
}

#[test]
fn agent_ttl_check_starts_critical_and_follows_pass_warn_fail() {
    let t = Target::new("agent-ttl");
    let id = t.service_id("api");
    t.register(json!({"ID": id, "Name": id, "Tags": ["t1"], "Port": 1, "Check": {"TTL": "30s"}}));
    let check_id = format!("service:{id}");
    let node = t.node_name();
    let c = t.agent_checks()[check_id.as_str()].clone();
    assert_eq!(c["CheckID"], check_id.as_str(), "{c}");
    assert_eq!(c["Status"], "critical", "a TTL check starts critical");
    assert_eq!(c["Name"], format!("Service '{id}' check"));
    assert_eq!(c["Node"], node.as_str());
    assert_eq!(c["ServiceID"], id.as_str());
    assert_eq!(c["ServiceName"], id.as_str());
    assert_eq!(c["ServiceTags"], json!(["t1"]));
    assert_eq!(c["Type"], "ttl");
    assert_eq!(
        (c["Notes"].clone(), c["Output"].clone()),
        (json!(""), json!(""))
    );
    for (op, status, note) in [
        ("pass", "passing", "all good"),
        ("warn", "warning", "slow"),
        ("fail", "critical", "down"),
        ("pass", "passing", ""),
    ] {
        let q = if note.is_empty() {
            String::new()
        } else {
            format!("?note={}", note.replace(' ', "%20"))
        };
        let r = t.put(&format!("agent/check/{op}/{check_id}{q}"), b"");
        assert_eq!(r.status, 200, "{op}: {}", r.body);
        let c = t.agent_checks()[check_id.as_str()].clone();
        assert_eq!(
            (c["Status"].as_str(), c["Output"].as_str()),
            (Some(status), Some(note)),
            "{op}"
        );
    }
    let r = t.put(
        &format!("agent/check/pass/{}", t.service_id("no-such-check")),
        b"",
    );
    assert!(r.status >= 400, "unknown check: {} {}", r.status, r.body);
}

#[test]
fn agent_check_ids_with_several_checks() {
    let t = Target::new("agent-check-ids");
    let id = t.service_id("multi");
    let custom = t.service_id("custom-check");
    t.register(json!({"ID": id, "Name": id, "Port": 1, "Checks": [
        {"TTL": "30s"},
        {"TTL": "30s", "CheckID": custom, "Name": "mine", "Notes": "n", "Status": "passing"},
    ]}));
    let checks = t.agent_checks();
    let first = &checks[format!("service:{id}:1").as_str()];
    assert_eq!(first["Status"], "critical", "{checks}");
    let c = &checks[custom.as_str()];
    assert_eq!(
        (
            c["Name"].as_str(),
            c["Notes"].as_str(),
            c["Status"].as_str()
        ),
        (Some("mine"), Some("n"), Some("passing")),
        "{checks}"
    );
    assert_eq!(c["ServiceID"], id.as_str());
}

#[test]
fn agent_reregister_keeps_checks_unless_replace_existing_checks() {
    let t = Target::new("agent-reregister");
    let id = t.service_id("svc");
    let check_id = format!("service:{id}");
    t.register(json!({"ID": id, "Name": id, "Port": 1, "Check": {"TTL": "30s"}}));
    t.register(json!({"ID": id, "Name": id, "Port": 2}));
    assert!(
        t.agent_checks().get(check_id.as_str()).is_some(),
        "kept without the flag"
    );
    assert_eq!(json_of(&t.get("agent/services"))[id.as_str()]["Port"], 2);
    t.register_query(
        json!({"ID": id, "Name": id, "Port": 2}),
        "?replace-existing-checks",
    );
    assert!(
        t.agent_checks().get(check_id.as_str()).is_none(),
        "removed with ?replace-existing-checks"
    );
}

#[test]
fn agent_deregister_removes_service_and_its_checks() {
    let t = Target::new("agent-deregister");
    let id = t.service_id("gone");
    t.register(json!({"ID": id, "Name": id, "Port": 1, "Check": {"TTL": "30s"}}));
    assert!(json_of(&t.get("agent/services")).get(id.as_str()).is_some());
    let r = t.put(&format!("agent/service/deregister/{id}"), b"");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(json_of(&t.get("agent/services")).get(id.as_str()).is_none());
    let checks = t.agent_checks();
    assert!(
        checks
            .as_object()
            .expect("map")
            .values()
            .all(|c| c["ServiceID"] != id.as_str()),
        "{checks}"
    );
    let r = t.put(&format!("agent/service/deregister/{id}"), b"");
    assert!(r.status >= 400, "unknown service: {} {}", r.status, r.body);
}

#[test]
fn agent_ttl_check_goes_critical_when_ttl_runs_out() {
    let t = Target::new("agent-ttl-expiry");
    let id = t.service_id("beat");
    let check_id = format!("service:{id}");
    t.register(json!({"ID": id, "Name": id, "Port": 1, "Check": {"TTL": "1s"}}));
    let r = t.put(&format!("agent/check/pass/{check_id}?note=alive"), b"");
    assert_eq!(r.status, 200);
    assert_eq!(t.agent_checks()[check_id.as_str()]["Status"], "passing");
    vmesh_testkit::eventually(Duration::from_secs(5), "the TTL check expired", || {
        let c = t.agent_checks()[check_id.as_str()].clone();
        match c["Status"].as_str() {
            Some("critical") => Ok(()),
            _ => Err(format!("{c}")),
        }
    });
    let out = t.agent_checks()[check_id.as_str()]["Output"].clone();
    assert!(
        out.as_str().is_some_and(|o| o.starts_with("TTL expired")),
        "{out}"
    );
}

/// The services of `node-services` with these IDs (other services may be on a real node).
fn node_services_with(v: &Value, ids: &[&str]) -> Vec<Value> {
    v["Services"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|s| s["ID"].as_str().is_some_and(|id| ids.contains(&id)))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn catalog_node_services_blocks_until_a_registration() {
    let t = Target::new("node-services");
    let node = t.node_name();
    let id = t.service_id("late");
    let r = t.get(&format!("catalog/node-services/{node}"));
    assert_eq!(r.status, 200, "{}", r.body);
    let before = index_of(&r);
    let v = json_of(&r);
    assert_eq!(v["Node"]["Node"], node.as_str(), "{v}");
    assert!(v["Node"]["Address"].as_str().is_some_and(|a| !a.is_empty()));
    assert_eq!(v["Node"]["Datacenter"], t.dc.as_str());
    assert!(node_services_with(&v, &[&id]).is_empty());
    // Nothing changes: the wait ends with the same index.
    let start = Instant::now();
    let r = t.get(&format!(
        "catalog/node-services/{node}?index={before}&wait=1s"
    ));
    assert!(start.elapsed() >= Duration::from_millis(900), "blocked");
    assert_eq!(index_of(&r), before);
    // A registration wakes it (the agent syncs it to the catalog).
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| {
            t.get(&format!(
                "catalog/node-services/{node}?index={before}&wait=10s"
            ))
        });
        std::thread::sleep(Duration::from_millis(300));
        t.register(json!({"ID": id, "Name": id, "Tags": ["a"], "Port": 7000, "Meta": {"m": "1"}}));
        h.join().expect("blocking thread")
    });
    assert!(index_of(&r) > before);
    // A real agent may sync in more than one step: wait for the service itself.
    vmesh_testkit::eventually(Duration::from_secs(5), "the service in the catalog", || {
        let v = json_of(&t.get(&format!("catalog/node-services/{node}")));
        match node_services_with(&v, &[&id]).first() {
            Some(s) => {
                assert_eq!(s["Service"], id.as_str());
                assert_eq!(s["Tags"], json!(["a"]));
                assert_eq!(s["Port"], 7000);
                assert_eq!(s["Meta"], json!({"m": "1"}));
                assert_eq!(s["Address"], "");
                Ok(())
            }
            None => Err(format!("{v}")),
        }
    });
}

#[test]
fn health_node_has_serf_health_and_blocks_on_check_changes() {
    let t = Target::new("health-node");
    let node = t.node_name();
    let id = t.service_id("checked");
    let check_id = format!("service:{id}");
    let r = t.get(&format!("health/node/{node}"));
    assert_eq!(r.status, 200);
    let v = json_of(&r);
    let serf = v
        .as_array()
        .expect("array")
        .iter()
        .find(|c| c["CheckID"] == "serfHealth")
        .unwrap_or_else(|| panic!("serfHealth in {v}"))
        .clone();
    assert_eq!(serf["Status"], "passing");
    assert_eq!(serf["Node"], node.as_str());
    assert_eq!(serf["ServiceID"], "");
    t.register(json!({"ID": id, "Name": id, "Port": 1, "Check": {"TTL": "30s"}}));
    let find = |v: &Value| {
        v.as_array().and_then(|a| {
            a.iter()
                .find(|c| c["CheckID"] == check_id.as_str())
                .cloned()
        })
    };
    let index = vmesh_testkit::eventually(Duration::from_secs(5), "the check in health", || {
        let r = t.get(&format!("health/node/{node}"));
        match find(&json_of(&r)) {
            Some(c) if c["Status"] == "critical" => Ok(index_of(&r)),
            other => Err(format!("{other:?}")),
        }
    });
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| t.get(&format!("health/node/{node}?index={index}&wait=10s")));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            t.put(&format!("agent/check/pass/{check_id}"), b"").status,
            200
        );
        h.join().expect("blocking thread")
    });
    assert!(index_of(&r) > index, "a check change moves the index");
    vmesh_testkit::eventually(
        Duration::from_secs(5),
        "the check passing in health",
        || {
            let c = find(&json_of(&t.get(&format!("health/node/{node}"))));
            match c {
                Some(c) if c["Status"] == "passing" => {
                    assert_eq!(c["ServiceName"], id.as_str());
                    assert_eq!(c["Type"], "ttl");
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Common parameters

#[test]
fn datacenter_and_consistency_params() {
    let t = Target::new("dc");
    let key = t.key("k");
    let r = t.put(&format!("kv/{key}?dc={}", t.dc), b"v");
    assert_eq!(r.body.trim(), "true");
    for q in ["stale", "consistent", "stale=", "consistent="] {
        let r = t.get(&format!("kv/{key}?{q}"));
        assert_eq!(r.status, 200, "?{q}");
        assert!(r.header("x-consul-index").is_some());
    }
    let r = t.get(&format!("kv/{key}?dc=no-such-dc-{}", &new_uuid()[..6]));
    assert_eq!(r.status, 500);
    assert!(r.body.contains("No path to datacenter"), "{}", r.body);
}

// ---------------------------------------------------------------------------------------------
// Emulator-only knobs

#[test]
fn emulator_failing_answers_500_no_cluster_leader_and_counts_requests() {
    // Emulator only: set_failing and requests() are test knobs.
    let Some(t) = Target::emulator_only(
        "failing",
        "set_failing and requests()",
        ConsulOptions::default(),
    ) else {
        return;
    };
    let key = t.key("k");
    t.put_kv(&key, b"v");
    let before = t.emu().requests();
    t.emu().set_failing(true);
    for _ in 0..3 {
        let r = t.get(&format!("kv/{key}"));
        assert_eq!((r.status, r.body.as_str()), (500, "No cluster leader"));
    }
    t.emu().set_failing(false);
    assert_eq!(t.get(&format!("kv/{key}")).status, 200);
    assert_eq!(t.emu().requests() - before, 4);
}

#[test]
fn emulator_stop_and_restart_keep_port_and_data() {
    // Emulator only: stop/restart simulate Consul going down and coming back.
    let Some(t) =
        Target::emulator_only("restart", "stop() and restart()", ConsulOptions::default())
    else {
        return;
    };
    let key = t.key("k");
    t.put_kv(&key, b"v");
    let idx = t.entry(&key)["ModifyIndex"].clone();
    let addr = t.emu().addr();
    t.emu().stop();
    assert!(!t.emu().is_running());
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "connection refused while down"
    );
    t.emu().restart();
    assert_eq!(t.emu().addr(), addr);
    let e = t.entry(&key);
    assert_eq!(
        (e["Value"].clone(), e["ModifyIndex"].clone()),
        (json!(b64(b"v")), idx)
    );
    // A blocking query in flight when it stops gets its connection closed.
    let url = format!("{}/v1/kv/{key}?index=999999&wait=10s", t.base);
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| t.client.request("GET", &url, &[], None));
        std::thread::sleep(Duration::from_millis(300));
        t.emu().stop();
        h.join().expect("blocking thread")
    });
    assert!(
        r.is_err(),
        "in-flight request fails when Consul goes down: {r:?}"
    );
    t.emu().restart();
    assert_eq!(t.get(&format!("kv/{key}")).status, 200);
}

#[test]
fn emulator_restore_index_goes_backwards() {
    // Emulator only: restore_index_to simulates a snapshot restore.
    let Some(t) = Target::emulator_only("restore", "restore_index_to()", ConsulOptions::default())
    else {
        return;
    };
    let dir = t.key("dir/");
    for i in 0..10 {
        t.put_kv(&format!("{dir}k"), format!("{i}").as_bytes());
    }
    let high = index_of(&t.get(&format!("kv/{dir}?recurse")));
    assert_eq!(high, 10);
    t.emu().restore_index_to(3);
    let r = t.get(&format!("kv/{dir}?recurse"));
    assert_eq!(index_of(&r), 3, "the index went backwards");
    assert_eq!(json_of(&r)[0]["Value"], b64(b"9"), "the data stayed");
    // A client still blocking on the old, higher index gets the lower one at its wait end.
    let start = Instant::now();
    let r = t.get(&format!("kv/{dir}?recurse&index={high}&wait=1s"));
    assert!(start.elapsed() >= Duration::from_millis(950));
    assert_eq!(index_of(&r), 3);
    t.put_kv(&format!("{dir}k"), b"new");
    assert_eq!(
        t.entry(&format!("{dir}k"))["ModifyIndex"],
        4,
        "the next write gets n + 1"
    );
}

#[test]
fn emulator_direct_helpers_share_state_with_http() {
    // Emulator only: kv_put/kv_get/kv_delete are Rust helpers.
    let Some(t) = Target::emulator_only(
        "helpers",
        "kv_put/kv_get/kv_delete",
        ConsulOptions::default(),
    ) else {
        return;
    };
    let key = t.key("k");
    let idx = t.emu().kv_put(&key, b"direct");
    let r = t.get(&format!("kv/{key}"));
    assert_eq!(index_of(&r), idx);
    assert_eq!(json_of(&r)[0]["Value"], b64(b"direct"));
    t.put_kv(&key, b"http");
    assert_eq!(t.emu().kv_get(&key).as_deref(), Some(&b"http"[..]));
    assert_eq!(t.emu().kv_entry(&key).map(|e| e.flags), Some(0));
    // A blocking query wakes on a direct write.
    let cur = index_of(&t.get(&format!("kv/{key}")));
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| t.get(&format!("kv/{key}?index={cur}&wait=10s")));
        std::thread::sleep(Duration::from_millis(300));
        t.emu().kv_delete(&key);
        h.join().expect("blocking thread")
    });
    assert_eq!(r.status, 404);
    assert!(index_of(&r) > cur);
    assert_eq!(t.emu().kv_get(&key), None);
}

#[test]
fn emulator_acl_denies_with_consul_message_and_filters_lists() {
    // Emulator only: the tokens are set up through ConsulOptions (a real Consul would need them
    // created through /v1/acl, which the emulator does not implement).
    let Some(t) = Target::emulator_only_with("acl", "ACL token setup", |prefix| {
        let mut reader = AclToken::new(
            "reader-secret",
            AclRules::default()
                .key_prefix(prefix, KeyPolicy::Read)
                .key_prefix(&format!("{prefix}secret/"), KeyPolicy::Deny),
        );
        reader.accessor_id = "11111111-2222-4333-8444-555555555555".into();
        ConsulOptions {
            acl: Some(
                AclConfig::default()
                    .with_token(reader)
                    .with_token(AclToken::new("admin-secret", AclRules::management())),
            ),
            ..Default::default()
        }
    }) else {
        return;
    };
    let (admin, reader) = (Some("admin-secret"), Some("reader-secret"));
    for k in ["open/a", "open/b"] {
        let r = t.req_token("PUT", &format!("kv/{}", t.key(k)), Some(b"v"), admin);
        assert_eq!(r.body.trim(), "true");
    }
    let secret = t.key("secret/x");
    let url = format!("{}/v1/kv/{secret}", t.base);
    let r = t
        .client
        .request(
            "PUT",
            &url,
            &[("authorization", "Bearer admin-secret")],
            Some(b"s"),
        )
        .expect("put");
    assert_eq!(
        r.body.trim(),
        "true",
        "Authorization: Bearer accepted: {}",
        r.body
    );

    let open = t.key("open/a");
    // No token: the anonymous token, which has no rules here.
    let r = t.req_token("GET", &format!("kv/{open}"), None, None);
    assert_eq!(r.status, 403);
    assert!(
        r.body.starts_with(&format!(
            "Permission denied: anonymous token lacks permission 'key:read' on \"{open}\""
        )),
        "{}",
        r.body
    );
    let r = t.req_token("GET", &format!("kv/{open}"), None, Some("made-up"));
    assert_eq!(
        (r.status, r.body.as_str()),
        (403, "ACL not found"),
        "unknown token"
    );

    // The reader reads open/ but not secret/, and writes nothing.
    assert_eq!(
        t.req_token("GET", &format!("kv/{open}"), None, reader)
            .status,
        200
    );
    let r = t.req_token("GET", &format!("kv/{secret}"), None, reader);
    assert_eq!(r.status, 403);
    assert_eq!(
        r.body,
        format!(
            "Permission denied: token with AccessorID '11111111-2222-4333-8444-555555555555' \
             lacks permission 'key:read' on \"{secret}\""
        )
    );
    let r = t.req_token("PUT", &format!("kv/{open}"), Some(b"x"), reader);
    assert_eq!(r.status, 403);
    assert!(
        r.body.contains("lacks permission 'key:write'"),
        "{}",
        r.body
    );
    let r = t.req_token("DELETE", &format!("kv/{}?recurse", t.prefix), None, reader);
    assert_eq!(
        r.status, 403,
        "recursive delete needs write on the whole prefix"
    );
    let r = t.req_token("PUT", "session/create", Some(b"{}"), reader);
    assert_eq!(r.status, 403);
    assert!(
        r.body.contains("lacks permission 'session:write'"),
        "{}",
        r.body
    );

    // Lists are filtered to what the token can read.
    let r = t.req_token("GET", &format!("kv/{}?recurse", t.prefix), None, reader);
    assert_eq!(r.status, 200);
    let keys: Vec<Value> = json_of(&r)
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["Key"].clone())
        .collect();
    assert_eq!(keys, vec![json!(t.key("open/a")), json!(t.key("open/b"))]);
    assert_eq!(r.header("x-consul-results-filtered-by-acls"), Some("true"));
    let r = t.req_token(
        "GET",
        &format!("kv/{}?keys&separator=/", t.prefix),
        None,
        reader,
    );
    assert_eq!(json_of(&r), json!([t.key("open/")]));
    let r = t.req_token(
        "GET",
        &format!("kv/{}?recurse", t.key("secret/")),
        None,
        reader,
    );
    assert_eq!(r.status, 404, "everything filtered: 404");
    let r = t.req_token("GET", &format!("kv/{}?recurse", t.prefix), None, admin);
    assert_eq!(json_of(&r).as_array().map(Vec::len), Some(3));
    assert_eq!(r.header("x-consul-results-filtered-by-acls"), None);
}

#[test]
fn emulator_agent_helpers_share_state_with_http() {
    // Emulator only: register_service/set_check_status/deregister_service are Rust helpers.
    let Some(t) = Target::emulator_only(
        "agent-helpers",
        "register_service/set_check_status/deregister_service",
        ConsulOptions::default(),
    ) else {
        return;
    };
    let emu = t.emu();
    let node = emu.node_name().to_owned();
    let id = emu.register_service(
        ServiceRegistration::new("web", 8080)
            .with_id("web-1")
            .with_tags(&["v1"])
            .with_meta("k", "v")
            .with_ttl_check(Duration::from_secs(30)),
    );
    assert_eq!(id, "web-1");
    let s = json_of(&t.get("agent/services"))["web-1"].clone();
    assert_eq!(
        (s["Service"].as_str(), s["Port"].as_u64()),
        (Some("web"), Some(8080))
    );
    assert_eq!(
        emu.check_status("service:web-1"),
        Some(CheckStatus::Critical)
    );
    let r = t.get(&format!("health/node/{node}"));
    let cur = index_of(&r);
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| t.get(&format!("health/node/{node}?index={cur}&wait=10s")));
        std::thread::sleep(Duration::from_millis(300));
        assert!(emu.set_check_status("service:web-1", CheckStatus::Passing));
        h.join().expect("blocking thread")
    });
    assert!(index_of(&r) > cur);
    assert_eq!(t.agent_checks()["service:web-1"]["Status"], "passing");
    assert!(!emu.set_check_status("nope", CheckStatus::Passing));
    assert!(emu.deregister_service("web-1"));
    assert!(emu.services().is_empty() && emu.checks().is_empty());
    assert_eq!(json_of(&t.get("agent/services")), json!({}));
}

#[test]
fn emulator_node_address_is_where_it_listens_and_what_it_reports() {
    // Emulator only: node_address is an emulator option (a test "VM" on its own loopback).
    let Some(t) = Target::emulator_only(
        "node-address",
        "ConsulOptions::node_address",
        ConsulOptions {
            node_name: "vm-2".into(),
            node_address: std::net::IpAddr::from([127, 0, 0, 2]),
            ..Default::default()
        },
    ) else {
        return;
    };
    assert_eq!(t.emu().addr().ip().to_string(), "127.0.0.2");
    let v = json_of(&t.get("agent/self"));
    assert_eq!(v["Member"]["Addr"], "127.0.0.2");
    assert_eq!(v["Config"]["NodeName"], "vm-2");
    let v = json_of(&t.get("catalog/node-services/vm-2"));
    assert_eq!(v["Node"]["Address"], "127.0.0.2");
    assert_eq!(v["Services"], json!([]));
    let v = json_of(&t.get("catalog/node-services/other-node"));
    assert_eq!(
        v["Node"],
        Value::Null,
        "another node is unknown to this agent"
    );
    let v = json_of(&t.get("health/node/other-node"));
    assert_eq!(v, json!([]));
}

/// What the controller asks to tell a hung Consul from a quiet one: the leader's Raft address,
/// as a JSON string.
#[test]
fn status_leader_names_the_leader() {
    let t = Target::new("leader");
    let r = t.get("status/leader");
    assert_eq!(r.status, 200, "{}", r.body);
    let leader = json_of(&r);
    let leader = leader.as_str().expect("a JSON string");
    assert!(
        leader
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()),
        "{leader}"
    );
}

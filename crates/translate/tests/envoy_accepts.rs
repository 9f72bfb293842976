//! Whatever vmesh accepts, Envoy accepts: documents generated over every field of
//! `docs/configuration.md` (and the edges: bodies at the size limit, zero weights, many domains,
//! wildcards, unicode, IPv6) are translated, and a real Envoy checks each proxy's resources with
//! `envoy --mode validate`. A refusal fails with the (shrunk) documents and Envoy's message.
//!
//! `VMESH_ENVOY_ACCEPTS_CASES` sets the number of generated configs (default 96).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use envoy_types::pb::envoy::config::bootstrap::v3::{
    bootstrap::StaticResources, runtime_layer::LayerSpecifier, Bootstrap, LayeredRuntime,
    RuntimeLayer,
};
use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use envoy_types::pb::google::protobuf::{value, Any, Struct, Value as PbValue};
use proptest::prelude::*;
use prost::Message;
use serde_json::{json, Value};
use vmesh_model::{ConfigSet, SourceMode, State};
use vmesh_translate::{translate, ProxyOutput};
use vmesh_xds::resource::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

const UPSTREAMS: [&str; 4] = ["u0", "u1", "u2", "u3"];
const VIRTUAL_SERVICES: [&str; 4] = ["v0", "v1", "v2", "v3"];
const PROXIES: [&str; 2] = ["p0", "p1"];

// ---- generators: valid documents only ----

fn duration(max_secs: u64) -> impl Strategy<Value = (String, u64)> {
    // (text, milliseconds)
    prop::sample::select(vec![
        ("1ms", 1),
        ("250ms", 250),
        ("1s", 1000),
        ("5s", 5000),
        ("1m30s", 90_000),
        ("15s", 15_000),
        ("1h", 3_600_000),
    ])
    .prop_filter("within bound", move |(_, ms)| *ms <= max_secs * 1000)
    .prop_map(|(t, ms)| (t.to_string(), ms))
}

fn host() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec![
            "10.0.0.1",
            "127.0.0.1",
            "192.0.2.200",
            "2001:db8::1",
            "::1",
            "fe80::1",
        ]),
        1u16..=65535,
        prop::option::of(1u32..=128),
    )
        .prop_map(|(address, port, weight)| {
            let mut h = json!({"address": address, "port": port});
            if let Some(w) = weight {
                h["weight"] = json!(w);
            }
            h
        })
}

fn upstream() -> impl Strategy<Value = Value> {
    let static_hosts = prop::collection::vec(host(), 1..5).prop_map(|hosts| {
        // No two hosts with the same address and port.
        let mut seen = std::collections::BTreeSet::new();
        let hosts: Vec<Value> = hosts
            .into_iter()
            .filter(|h| seen.insert((h["address"].to_string(), h["port"].to_string())))
            .collect();
        json!({"static": {"hosts": hosts}})
    });
    let consul = (
        prop::sample::select(vec!["orders", "web_v2", "api.internal", "x"]),
        prop::sample::subsequence(vec!["v2", "canary", "zone=a", "ü"], 0..3),
        prop::option::of(prop::sample::subsequence(
            vec!["dc1", "dc-2", "eu_west"],
            1..3,
        )),
        any::<bool>(),
    )
        .prop_map(|(service, tags, dcs, warning)| {
            let mut c = json!({"service": service, "tags": tags, "includeWarning": warning});
            if let Some(dcs) = dcs {
                c["datacenters"] = json!(dcs);
            }
            json!({ "consul": c })
        });
    (
        prop_oneof![3 => static_hosts, 1 => consul],
        prop::option::of(duration(3600)),
        prop::option::of(prop::sample::select(vec![
            "roundRobin",
            "leastRequest",
            "random",
        ])),
    )
        .prop_map(|(mut spec, timeout, lb)| {
            if let Some((t, _)) = timeout {
                spec["connectTimeout"] = json!(t);
            }
            if let Some(lb) = lb {
                spec["loadBalancer"] = json!(lb);
            }
            spec
        })
}

fn domain() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_string()),
        (0u8..50).prop_map(|i| format!("h{i}.example.com")),
        Just("*.example.com".to_string()),
        Just("*-api.example.com".to_string()),
        Just("shop-*".to_string()),
        Just("10.0.0.1".to_string()),
        Just("[2001:db8::1]".to_string()),
        Just("shop.example.com:8080".to_string()),
        Just("xn--bcher-kva.example".to_string()),
    ]
}

/// The path part of a match: (field, value).
fn path_match() -> impl Strategy<Value = Option<(&'static str, String)>> {
    prop::option::of(prop_oneof![
        prop::sample::select(vec!["/", "/api/", "/café/", "/a b", "/%2F"])
            .prop_filter("no spaces", |p| !p.contains(' '))
            .prop_map(|p| ("prefix", p.to_string())),
        prop::sample::select(vec!["/login", "/ünïcode", "/x.json"])
            .prop_map(|p| ("exact", p.to_string())),
        prop::sample::select(vec![
            "^/api/v[0-9]+/.*$",
            "/(?i)caf\\xC3\\xA9/.*",
            "/[^/]{1,64}",
            "/a|/b",
            "/(a|b|c){1,200}",
            "/.{1,400}",
            "/(?P<v>v[0-9]+)/[[:alnum:]_-]*",
        ])
        .prop_map(|p| ("regex", p.to_string())),
    ])
}

fn value_matcher() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec!["v2", "ünï", "a b", ""]).prop_map(|v| json!({"value": v})),
        prop::sample::select(vec!["^(acme|globex)$", ".*", "[0-9]{1,3}"])
            .prop_map(|r| json!({"regex": r})),
        any::<bool>().prop_map(|p| json!({"present": p})),
    ]
}

fn matcher() -> impl Strategy<Value = (Value, bool)> {
    // (match, is a prefix match)
    (
        path_match(),
        prop::option::of(any::<bool>()),
        prop::collection::vec(
            (
                prop::sample::select(vec!["x-tenant", "x-debug", ":authority", "user-agent"]),
                value_matcher(),
                any::<bool>(),
            ),
            0..3,
        ),
        prop::collection::vec(
            (
                prop::sample::select(vec!["preview", "q", "ü"]),
                value_matcher(),
            ),
            0..3,
        ),
        prop::sample::subsequence(vec!["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"], 0..3),
    )
        .prop_map(|(path, case, headers, query, methods)| {
            let mut m = json!({});
            let is_prefix = matches!(path, None | Some(("prefix", _)));
            if let Some((field, value)) = &path {
                m[*field] = json!(value);
            }
            if let Some(case) = case {
                // With regex, only `true` is allowed.
                if !matches!(path, Some(("regex", _))) || case {
                    m["caseSensitive"] = json!(case);
                }
            }
            if !headers.is_empty() {
                m["headers"] = Value::Array(
                    headers
                        .into_iter()
                        .map(|(name, mut v, invert)| {
                            v["name"] = json!(name);
                            if invert {
                                v["invert"] = json!(true);
                            }
                            v
                        })
                        .collect(),
                );
            }
            if !query.is_empty() {
                m["queryParameters"] = Value::Array(
                    query
                        .into_iter()
                        .map(|(name, mut v)| {
                            v["name"] = json!(name);
                            v
                        })
                        .collect(),
                );
            }
            if !methods.is_empty() {
                m["methods"] = json!(methods);
            }
            (m, is_prefix)
        })
}

fn header_mutations() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(
            (
                prop::sample::select(vec!["x-request-source", "cache-control", "x-ü-not"])
                    .prop_filter("lowercase ascii names", |n| n.is_ascii()),
                prop::sample::select(vec!["vmesh", "no-store", "ünïcode ✓", ""]),
                prop::option::of(any::<bool>()),
            ),
            0..3,
        ),
        prop::sample::subsequence(vec!["x-debug", "server", "x-powered-by"], 0..2),
    )
        .prop_map(|(add, remove)| {
            let mut seen = std::collections::BTreeSet::new();
            let add: Vec<Value> = add
                .into_iter()
                .filter(|(n, _, _)| seen.insert(*n))
                .map(|(name, value, append)| {
                    let mut a = json!({"name": name, "value": value});
                    if let Some(append) = append {
                        a["append"] = json!(append);
                    }
                    a
                })
                .collect();
            json!({"add": add, "remove": remove})
        })
}

fn retries(timeout_ms: Option<u64>) -> impl Strategy<Value = Value> {
    // No longer than the route's timeout: 15 s when unset, any length when disabled.
    let per_try_max = match timeout_ms {
        None => 15_000,
        Some(0) => u64::MAX,
        Some(ms) => ms,
    };
    (
        1u32..=10,
        prop::option::of(duration(3600)),
        prop::option::of(prop::sample::subsequence(
            vmesh_model::RETRY_ON_VALUES.to_vec(),
            1..4,
        )),
        prop::collection::btree_set(100u16..600, 1..4),
        prop::sample::subsequence(vec!["x-retry", "retry-after"], 1..3),
    )
        .prop_map(move |(attempts, per_try, on, codes, headers)| {
            let mut r = json!({ "attempts": attempts });
            if let Some((t, ms)) = per_try {
                if ms <= per_try_max {
                    r["perTryTimeout"] = json!(t);
                }
            }
            if let Some(on) = on {
                if on.contains(&"retriable-status-codes") {
                    r["retriableStatusCodes"] = json!(codes);
                }
                if on.contains(&"retriable-headers") {
                    r["retriableHeaders"] = json!(headers);
                }
                r["retryOn"] = json!(on.join(","));
            }
            r
        })
}

fn body() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some(String::new())),
        Just(Some("hello, wörld ✓\n".to_string())),
        Just(Some("x".repeat(4097))),
        Just(Some("y".repeat(64 * 1024))),
    ]
}

fn redirect() -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop::sample::select(vec![
            "example.org",
            "example.org:8443",
        ])),
        prop::option::of(prop_oneof![
            Just(("pathRedirect", "/new")),
            Just(("prefixRewrite", "/v2/")),
        ]),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec![301u16, 302, 303, 307, 308])),
    )
        .prop_map(|(host, path, https, strip, code)| {
            let mut r = json!({});
            if let Some(h) = host {
                r["hostRedirect"] = json!(h);
            }
            if let Some((f, v)) = path {
                r[f] = json!(v);
            }
            if https {
                r["httpsRedirect"] = json!(true);
            }
            if strip || r.as_object().unwrap().is_empty() {
                r["stripQuery"] = json!(true);
            }
            if let Some(c) = code {
                r["responseCode"] = json!(c);
            }
            r
        })
}

/// An upstream name: usually one of the generated upstreams, sometimes one that does not exist.
fn upstream_name() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["u0", "u1", "u2", "u3", "ghost"])
}

fn route() -> impl Strategy<Value = Value> {
    let forward = prop_oneof![
        upstream_name().prop_map(|u| json!({ "upstream": u })),
        prop::collection::btree_map(upstream_name(), 0u32..=100, 1..5).prop_map(|split| {
            let mut entries: Vec<Value> = split
                .iter()
                .map(|(u, w)| json!({"upstream": u, "weight": w}))
                .collect();
            // The weights must add up to more than 0.
            if split.values().all(|w| *w == 0) {
                entries[0]["weight"] = json!(1);
            }
            json!({ "split": entries })
        }),
    ];
    let options = (
        prop::option::of(prop_oneof![Just(("0s".to_string(), 0)), duration(3600)]),
        any::<bool>(),
        prop::option::of(header_mutations()),
        prop::option::of(header_mutations()),
    )
        .prop_flat_map(|(timeout, rewrite, req, resp)| {
            let timeout_ms = timeout.as_ref().map(|(_, ms)| *ms);
            (
                Just((timeout, rewrite, req, resp)),
                prop::option::of(retries(timeout_ms)),
            )
        });
    prop_oneof![
        4 => (matcher(), forward, options).prop_map(
            |((m, is_prefix), mut route, ((timeout, rewrite, req, resp), retries))| {
                route["match"] = m;
                let mut o = json!({});
                if let Some((t, _)) = timeout {
                    o["timeout"] = json!(t);
                }
                if let Some(r) = retries {
                    o["retries"] = r;
                }
                if rewrite && is_prefix {
                    o["prefixRewrite"] = json!("/v2/");
                }
                if let Some(h) = req {
                    o["requestHeaders"] = h;
                }
                if let Some(h) = resp {
                    o["responseHeaders"] = h;
                }
                route["options"] = o;
                route
            }
        ),
        1 => (matcher(), redirect()).prop_map(|((m, _), r)| json!({"match": m, "redirect": r})),
        1 => (matcher(), 200u16..600, body()).prop_map(|((m, _), status, body)| {
            let mut d = json!({ "status": status });
            if let Some(b) = body {
                d["body"] = json!(b);
            }
            json!({"match": m, "directResponse": d})
        }),
    ]
}

fn virtual_service() -> impl Strategy<Value = Value> {
    (
        prop::collection::btree_set(domain(), 1..30),
        prop::collection::vec(route(), 1..6),
    )
        .prop_map(|(domains, routes)| {
            // No duplicates, case-insensitive, and not one domain twice with and without port.
            let mut seen = std::collections::BTreeSet::new();
            let domains: Vec<String> = domains
                .into_iter()
                .filter(|d| seen.insert(d.split(':').next().unwrap_or(d).to_lowercase()))
                .collect();
            json!({"domains": domains, "routes": routes})
        })
}

fn access_log(dir: PathBuf) -> impl Strategy<Value = Value> {
    let operator = prop_oneof![
        prop::sample::select(vec![
            "%START_TIME%",
            "%PROTOCOL%",
            "%RESPONSE_CODE%",
            "%RESPONSE_CODE_DETAILS%",
            "%RESPONSE_FLAGS%",
            "%RESPONSE_FLAGS_LONG%",
            "%BYTES_RECEIVED%",
            "%BYTES_SENT%",
            "%DURATION%",
            "%REQUEST_DURATION%",
            "%REQUEST_TX_DURATION%",
            "%RESPONSE_DURATION%",
            "%RESPONSE_TX_DURATION%",
            "%UPSTREAM_HOST%",
            "%UPSTREAM_CLUSTER%",
            "%UPSTREAM_LOCAL_ADDRESS%",
            "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
            "%ROUTE_NAME%",
            "%DOWNSTREAM_REMOTE_ADDRESS%",
            "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
            "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%",
            "%DOWNSTREAM_LOCAL_ADDRESS%",
            "%CONNECTION_ID%",
            "%REQUESTED_SERVER_NAME%",
            "%HOSTNAME%",
            "%CONNECTION_TERMINATION_DETAILS%",
            "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
        ])
        .prop_map(str::to_string),
        (
            prop::sample::select(vec!["REQ", "RESP", "TRAILER"]),
            prop::sample::select(vec!["user-agent", ":path", "x-envoy-original-path?:path"]),
            prop::option::of(1u32..300),
        )
            .prop_map(|(c, h, n)| match n {
                Some(n) => format!("%{c}({h}):{n}%"),
                None => format!("%{c}({h})%"),
            }),
        prop::sample::select(vec!["literal ✓", "code=%RESPONSE_CODE% in %DURATION%ms"])
            .prop_map(str::to_string),
    ];
    (
        any::<bool>(),
        prop::option::of(prop::collection::btree_map(
            "[a-z][a-z0-9_-]{0,8}",
            operator,
            1..8,
        )),
    )
        .prop_map(move |(to_file, fields)| {
            let mut log = json!({});
            if to_file {
                log["to"] = json!(dir.join("access.log").display().to_string());
            }
            if let Some(f) = fields {
                log["fields"] = json!(f);
            }
            log
        })
}

fn gateway(log_dir: PathBuf) -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop::sample::select(vec![
            "0.0.0.0",
            "::",
            "127.0.0.1",
            "::1",
        ])),
        prop::option::of(prop::sample::subsequence(PROXIES.to_vec(), 1..=2)),
        prop::option::of(prop::sample::subsequence(
            vec!["v0", "v1", "v2", "v3", "missing"],
            1..4,
        )),
        0u32..=10,
        prop::option::of(access_log(log_dir)),
    )
        .prop_map(|(addr, proxies, vss, hops, log)| {
            let mut g = json!({});
            if let Some(a) = addr {
                g["bindAddress"] = json!(a);
            }
            if let Some(p) = proxies {
                g["proxyNames"] = json!(p);
            }
            if let Some(v) = vss {
                g["virtualServices"] = json!(v);
            }
            if hops > 0 {
                g["xffNumTrustedHops"] = json!(hops);
            }
            if let Some(l) = log {
                g["accessLog"] = l;
            }
            g
        })
}

/// A whole config: up to 4 upstreams, 4 virtual services and 2 gateways (on distinct ports, so
/// that none loses its socket).
fn documents(log_dir: PathBuf) -> impl Strategy<Value = Vec<Value>> {
    (
        prop::collection::vec(prop::option::of(upstream()), UPSTREAMS.len()),
        prop::collection::vec(prop::option::of(virtual_service()), VIRTUAL_SERVICES.len()),
        prop::collection::vec(gateway(log_dir), 1..=2),
    )
        .prop_map(|(ups, vss, gws)| {
            let mut docs = Vec::new();
            for (name, spec) in UPSTREAMS.iter().zip(ups) {
                if let Some(spec) = spec {
                    docs.push(json!({"kind": "Upstream", "name": name, "spec": spec}));
                }
            }
            for (name, spec) in VIRTUAL_SERVICES.iter().zip(vss) {
                if let Some(spec) = spec {
                    docs.push(json!({"kind": "VirtualService", "name": name, "spec": spec}));
                }
            }
            for (i, mut spec) in gws.into_iter().enumerate() {
                spec["bindPort"] = json!(10_000 + i);
                docs.push(json!({"kind": "Gateway", "name": format!("g{i}"), "spec": spec}));
            }
            docs
        })
}

// ---- Envoy's judgement ----

fn decode<M: Message + Default>(any: &Any) -> M {
    M::decode(any.value.as_slice()).unwrap()
}

/// A bootstrap holding a proxy's resources as static ones: EDS clusters become STATIC with
/// their assignment, and each connection manager carries its route configuration inline.
fn bootstrap(proxy: &ProxyOutput) -> Bootstrap {
    let of = |type_url| {
        proxy
            .snapshot
            .of_type(type_url)
            .into_iter()
            .flat_map(|m| m.values())
    };
    let assignments: BTreeMap<String, ClusterLoadAssignment> = of(ENDPOINT)
        .map(|r| (r.name.clone(), decode(&r.body)))
        .collect();
    let routes: BTreeMap<String, RouteConfiguration> = of(ROUTE)
        .map(|r| (r.name.clone(), decode(&r.body)))
        .collect();
    let clusters = of(CLUSTER)
        .map(|r| {
            let mut c: Cluster = decode(&r.body);
            let eds = cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32);
            if c.cluster_discovery_type == Some(eds) {
                c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::Static as i32,
                ));
                c.eds_cluster_config = None;
                c.load_assignment = Some(assignments.get(&c.name).cloned().unwrap_or_else(|| {
                    ClusterLoadAssignment {
                        cluster_name: c.name.clone(),
                        ..Default::default()
                    }
                }));
            }
            c
        })
        .collect();
    let listeners = of(LISTENER)
        .map(|r| {
            let mut l: Listener = decode(&r.body);
            for chain in &mut l.filter_chains {
                for f in &mut chain.filters {
                    let Some(filter::ConfigType::TypedConfig(any)) = &mut f.config_type else {
                        continue;
                    };
                    let mut hcm: HttpConnectionManager = decode(any);
                    if let Some(RouteSpecifier::Rds(rds)) = &hcm.route_specifier {
                        let rc = routes
                            .get(&rds.route_config_name)
                            .unwrap_or_else(|| panic!("no route {}", rds.route_config_name))
                            .clone();
                        hcm.route_specifier = Some(RouteSpecifier::RouteConfig(rc));
                    }
                    any.value = hcm.encode_to_vec();
                }
            }
            l
        })
        .collect();
    // What `vmeshctl bootstrap` sets for regexes.
    let re2_limit = PbValue {
        kind: Some(value::Kind::NumberValue(
            vmesh_model::regex::ENVOY_PROGRAM_SIZE_LIMIT as f64,
        )),
    };
    Bootstrap {
        static_resources: Some(StaticResources {
            listeners,
            clusters,
            ..Default::default()
        }),
        layered_runtime: Some(LayeredRuntime {
            layers: vec![RuntimeLayer {
                name: "vmesh".into(),
                layer_specifier: Some(LayerSpecifier::StaticLayer(Struct {
                    fields: [("re2.max_program_size.error_level".to_string(), re2_limit)]
                        .into_iter()
                        .collect(),
                })),
            }],
        }),
        ..Default::default()
    }
}

/// `Err(Envoy's message)` when Envoy refuses the bootstrap at `path`.
fn envoy_validate(envoy: &Path, path: &Path) -> Result<(), String> {
    let out = Command::new(envoy)
        .args(["--mode", "validate", "-l", "error", "-c"])
        .arg(path)
        .output()
        .unwrap();
    if out.status.success() {
        return Ok(());
    }
    Err(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmesh-envoy-accepts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn cases() -> u32 {
    std::env::var("VMESH_ENVOY_ACCEPTS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // Each case runs Envoy once per proxy: keep shrinking affordable.
        max_shrink_iters: 256,
        // The shrunk documents are in the failure message; nothing is written to the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_config_vmesh_accepts_envoy_accepts(docs in documents(scratch())) {
        let envoy = vmesh_testkit::require_envoy();
        let dir = scratch();
        let mut set = ConfigSet::new();
        for (i, doc) in docs.iter().enumerate() {
            set.upsert_source(&format!("doc-{i}.json"), &doc.to_string(), SourceMode::MultiDoc);
        }
        let translation = translate(&set.snapshot());
        let shown = serde_json::to_string_pretty(&docs).unwrap();
        // The generator makes valid documents only: a rejection is a bug in it or in vmesh.
        for (key, report) in &translation.reports {
            prop_assert!(
                report.state != State::Rejected,
                "vmesh rejected {key}: {:?}\n{shown}", report.errors
            );
        }
        for (name, proxy) in &translation.proxies {
            let path = dir.join(format!("{name}.pb"));
            std::fs::write(&path, bootstrap(proxy).encode_to_vec()).unwrap();
            let judged = envoy_validate(&envoy, &path);
            prop_assert!(
                judged.is_ok(),
                "Envoy refused proxy {name}'s config:\n{}\ndocuments:\n{shown}",
                judged.unwrap_err()
            );
        }
    }
}

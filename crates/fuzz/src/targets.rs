//! The fuzz targets, and the seeds each starts from.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use vmesh_consul::KvEntry;
use vmesh_layout::{Layout, ObjectStatus};
use vmesh_model::{ConfigSet, ObjectKey, ParsedSource, SourceMode};
use vmesh_proto::v1::{
    agent_message, AgentMessage, DiscoveryDelta, DiscoverySnapshot, Health, Hello, RegisterRequest,
    ServiceInstance,
};
use vmesh_registry::Registry;
use vmesh_relay::{DiscoveryRecord, HubState, RemoteView};
use vmesh_tls::SpiffeId;
use vmesh_xds::stream::{Mode, Stream};
use vmesh_xds::ProxySnapshot;

/// A fuzz target: its name, the function, and its seeds. The function says whether the input
/// got past decoding into the code under test (a text that is a document, a message that
/// decodes), so the harness can tell that its cases reach it.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]) -> bool,
    pub seeds: fn() -> Vec<Vec<u8>>,
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "document",
        run: document,
        seeds: document_seeds,
    },
    Target {
        name: "kv_value",
        run: kv_value,
        seeds: kv_seeds,
    },
    Target {
        name: "relay_message",
        run: relay_message,
        seeds: relay_seeds,
    },
    Target {
        name: "xds_request",
        run: xds_request,
        seeds: xds_seeds,
    },
];

const GATEWAY: &str =
    "kind: Gateway\nname: edge\nspec:\n  bindPort: 10000\n  proxyNames: [edge-proxy]\n";
const UPSTREAM: &str =
    "kind: Upstream\nname: web\nspec:\n  static:\n    hosts: [{address: 10.0.0.1, port: 80}]\n";

/// The config documents of `examples/`, the seeds of [`document`].
const EXAMPLES: &[&str] = &[
    include_str!("../../../examples/demo/gateway.yaml"),
    include_str!("../../../examples/demo/upstreams.yaml"),
    include_str!("../../../examples/demo/web.yaml"),
    include_str!("../../../examples/reference/everything.yaml"),
    GATEWAY,
    UPSTREAM,
];

fn document_seeds() -> Vec<Vec<u8>> {
    EXAMPLES.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// A config document: read and judged as a Consul KV value (under the key its first byte picks)
/// and as a file of the config directory, then translated with a gateway and an upstream.
pub fn document(data: &[u8]) -> bool {
    let Ok(text) = vmesh_model::limits::document_text(data.to_vec()) else {
        return false;
    };
    let key = match data.first().copied().unwrap_or_default() % 3 {
        0 => ObjectKey::virtual_service("web"),
        1 => ObjectKey::upstream("web"),
        _ => ObjectKey::gateway("edge"),
    };
    let mut set = ConfigSet::new();
    set.upsert_source("gateway.yaml", GATEWAY, SourceMode::MultiDoc);
    set.upsert_source("upstream.yaml", UPSTREAM, SourceMode::MultiDoc);
    set.apply("value", ParsedSource::keyed(&key, &text));
    set.apply("file.yaml", ParsedSource::file(&text));
    let config = set.snapshot();
    let translation = vmesh_translate::translate(&config);
    // What the xDS server would send must encode.
    for proxy in translation.proxies.values() {
        for resources in proxy.snapshot.resources.values() {
            for resource in resources.values() {
                let _ = resource.body.encode_to_vec();
            }
        }
    }
    // Reached: the text is YAML or JSON (whatever the documents say).
    vmesh_model::read_documents(&text).is_ok_and(|d| !d.is_empty())
}

/// A registry to decode records with (it needs a client; none is ever called).
fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<(tokio::runtime::Runtime, Registry)> = OnceLock::new();
    &REGISTRY
        .get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap_or_else(|e| panic!("a runtime: {e}"));
            let config = vmesh_consul::ConsulConfig::from_env(vmesh_consul::ConsulEnv {
                http_addr: Some("127.0.0.1:1".into()),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("a Consul config: {e}"));
            let client = runtime
                .block_on(async { vmesh_consul::Client::new(&config) })
                .unwrap_or_else(|e| panic!("a Consul client: {e}"));
            (runtime, Registry::new(client, "vmesh"))
        })
        .1
}

/// The keys a value is decoded under: a token's, an agent's, a gateway's, a revocation's.
fn record_keys() -> Vec<String> {
    let layout = Layout::new("vmesh");
    vec![
        layout.token_key("0123456789abcdef"),
        layout.agent_key("dc1", "vm-1"),
        layout.gateway_key("dc1", "edge"),
        layout.revocation_key("dc1", "vm-1"),
    ]
}

fn kv_seeds() -> Vec<Vec<u8>> {
    let token = r#"{"id":"0123456789abcdef","created_unix":1700000000,"expires_unix":1800000000,"uses_left":2,"node":"vm-1","revoked":false,"secret_sha256":"00000000000000000000000000000000000000000000000000000000000000ff"}"#;
    let agent = r#"{"spiffe_id":"spiffe://vmesh/dc/dc1/agent/vm-1","token_id":"0123456789abcdef","address":"10.0.0.7","serial":"3f:0a","registered_unix":1700000000,"not_after_unix":1700086400}"#;
    let revocation = r#"{"spiffe_id":"spiffe://vmesh/dc/dc1/agent/vm-1","revoked_unix":1700000000,"reason":"x"}"#;
    let status = r#"{"kind":"VirtualService","name":"web","state":"Rejected","errors":[{"path":"spec.routes[0]","message":"x"}],"source":"vmesh/config/VirtualService/web","version":"ab12","servingLastGood":true,"configModifyIndex":7}"#;
    let record = r#"{"spiffe_id":"spiffe://vmesh/dc/dc1/agent/vm-1","replica":"a","connected_unix":1700000000,"disconnected_unix":1700000100,"instances":[{"service":"web","node":"vm-1","datacenter":"dc1","id":"web-1","address":"10.0.0.1","port":8080,"tags":[],"health":"passing"}]}"#;
    let listing = r#"[{"LockIndex":0,"Key":"vmesh/config/Upstream/web","Flags":0,"Value":"a2luZDogVXBzdHJlYW0K","CreateIndex":5,"ModifyIndex":7},{"LockIndex":0,"Key":"vmesh/config/","Flags":0,"Value":null,"CreateIndex":3,"ModifyIndex":3}]"#;
    [token, agent, revocation, status, record, listing]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect()
}

/// A Consul KV value or listing: decoded as Consul's listing (JSON, base64 values), and each
/// value as every kind of record the registry keeps and as an object's status.
pub fn kv_value(data: &[u8]) -> bool {
    let listing = vmesh_consul::decode_entries(data).ok();
    let mut entries = listing.clone().unwrap_or_default();
    entries.extend(record_keys().into_iter().map(|key| KvEntry {
        key,
        value: data.to_vec(),
        create_index: 1,
        modify_index: 1,
        lock_index: 0,
        flags: 0,
        session: None,
    }));
    let registry = registry();
    // Reached: the records' decoders got JSON to judge.
    let mut decoded =
        listing.is_some() || serde_json::from_slice::<serde_json::Value>(data).is_ok();
    for entry in &entries {
        decoded |= registry.decode_token(entry).is_ok();
        decoded |= registry.decode_registration(entry).is_ok();
        decoded |= registry.decode_revocation(entry).is_ok();
        decoded |= serde_json::from_slice::<ObjectStatus>(&entry.value).is_ok();
        // Another replica's discovery record, into this replica's view and the catalog.
        if let Ok(record) = serde_json::from_slice::<DiscoveryRecord>(&entry.value) {
            decoded = true;
            let mut view = RemoteView::new("fuzz", Duration::from_secs(60));
            let now = Instant::now();
            view.set(vec![record], now, SystemTime::now());
            let mut catalog = vmesh_model::Catalog::new();
            view.add_to(&mut catalog, |_| false, now);
            let _ = view.expire(&vmesh_tls::DenyList::new(), now + Duration::from_secs(61));
        }
    }
    decoded
}

/// `messages`, each prefixed with its length (two bytes, little-endian): how the targets that
/// take a sequence of messages read their input.
pub fn frames(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        let n = m.len().min(u16::MAX as usize);
        out.extend((n as u16).to_le_bytes());
        out.extend(&m[..n]);
    }
    out
}

/// The messages of an input made by [`frames`] (a last, cut message included as it is).
fn unframe(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let n = u16::from_le_bytes([data[0], data[1]]) as usize;
        let rest = &data[2..];
        let n = n.min(rest.len());
        out.push(&rest[..n]);
        data = &rest[n..];
    }
    out
}

fn instance(id: &str, port: u32) -> ServiceInstance {
    ServiceInstance {
        id: id.into(),
        service: "web".into(),
        tags: vec!["v1".into()],
        address: "10.0.0.1".into(),
        port,
        health: Health::Passing as i32,
        ..Default::default()
    }
}

fn relay_seeds() -> Vec<Vec<u8>> {
    let hello = AgentMessage {
        message: Some(agent_message::Message::Hello(Hello {
            agent_version: "0.1.0".into(),
            ..Default::default()
        })),
    };
    let snapshot = AgentMessage {
        message: Some(agent_message::Message::Snapshot(DiscoverySnapshot {
            seq: 1,
            instances: vec![instance("web-1", 8080), instance("web-2", 8081)],
        })),
    };
    let delta = AgentMessage {
        message: Some(agent_message::Message::Delta(DiscoveryDelta {
            seq: 2,
            base_seq: 1,
            upserts: vec![instance("web-3", 8082)],
            removed_ids: vec!["web-1".into()],
        })),
    };
    let register = RegisterRequest {
        token: "vmbt_00".into(),
        node: "vm-1".into(),
        datacenter: "dc1".into(),
        csr_der: vec![0x30, 0x82, 0x01, 0x00],
        gateway: String::new(),
    };
    vec![
        frames(&[
            hello.encode_to_vec(),
            snapshot.encode_to_vec(),
            delta.encode_to_vec(),
        ]),
        frames(&[hello.encode_to_vec(), delta.encode_to_vec()]),
        register.encode_to_vec(),
    ]
}

/// Messages of one agent's `Relay.Connect` stream, fed to the controller's hub (as the relay
/// does, a millisecond apart), then the stream's end; and the input as a `RegisterRequest`.
pub fn relay_message(data: &[u8]) -> bool {
    let mut decoded = false;
    if let Ok(request) = RegisterRequest::decode(data) {
        decoded = true;
        let _ = SpiffeId::agent("vmesh", &request.datacenter, &request.node);
        let _ = SpiffeId::gateway("vmesh", &request.datacenter, &request.gateway);
        let _ = vmesh_tls::check_csr(&request.csr_der);
    }
    let mut hub = HubState::new("fuzz", Duration::from_secs(60), Duration::ZERO);
    let Ok(id) = SpiffeId::agent("vmesh", "dc1", "vm-1") else {
        return decoded;
    };
    let t0 = Instant::now();
    let Ok(stream) = hub.attach(&id, "01", IpAddr::from([10, 0, 0, 1]), SystemTime::now()) else {
        return decoded;
    };
    let mut now = t0;
    for message in unframe(data) {
        if let Ok(message) = AgentMessage::decode(message) {
            decoded |= message.message.is_some();
            let _ = hub.on_message(&id, stream, &message);
        }
        now += Duration::from_millis(1);
        let _ = hub.poll(now);
    }
    hub.detach(&id, stream, now);
    let _ = hub.poll(now + Duration::from_secs(61));
    decoded
}

/// The resources of `examples/demo` for its proxy, the target of [`xds_request`]'s streams.
fn demo_snapshot() -> Arc<ProxySnapshot> {
    static SNAPSHOT: OnceLock<Arc<ProxySnapshot>> = OnceLock::new();
    SNAPSHOT
        .get_or_init(|| {
            let mut set = ConfigSet::new();
            for (i, text) in EXAMPLES[..3].iter().enumerate() {
                set.upsert_source(&format!("{i}.yaml"), text, SourceMode::MultiDoc);
            }
            let translation = vmesh_translate::translate(&set.snapshot());
            Arc::new(
                translation
                    .proxies
                    .into_values()
                    .next()
                    .map(|p| p.snapshot)
                    .unwrap_or_default(),
            )
        })
        .clone()
}

const TYPES: [&str; 4] = [
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
];

fn node() -> Option<Node> {
    Some(Node {
        id: "gateway-proxy".into(),
        ..Default::default()
    })
}

fn xds_seeds() -> Vec<Vec<u8>> {
    let sotw: Vec<Vec<u8>> = TYPES
        .iter()
        .enumerate()
        .flat_map(|(i, t)| {
            let subscribe = DiscoveryRequest {
                node: node(),
                type_url: (*t).into(),
                ..Default::default()
            };
            let ack = DiscoveryRequest {
                type_url: (*t).into(),
                version_info: "v".into(),
                response_nonce: (i + 1).to_string(),
                ..Default::default()
            };
            let nack = DiscoveryRequest {
                type_url: (*t).into(),
                response_nonce: (i + 1).to_string(),
                error_detail: Some(RpcStatus {
                    code: 3,
                    message: "rejected".into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            [subscribe, ack, nack].map(|r| r.encode_to_vec())
        })
        .collect();
    let delta: Vec<Vec<u8>> = TYPES
        .iter()
        .enumerate()
        .flat_map(|(i, t)| {
            let subscribe = DeltaDiscoveryRequest {
                node: node(),
                type_url: (*t).into(),
                resource_names_subscribe: vec!["*".into()],
                ..Default::default()
            };
            let ack = DeltaDiscoveryRequest {
                type_url: (*t).into(),
                response_nonce: (i + 1).to_string(),
                ..Default::default()
            };
            [subscribe, ack].map(|r| r.encode_to_vec())
        })
        .collect();
    let mut sotw_input = vec![0u8];
    sotw_input.extend(frames(&sotw));
    let mut delta_input = vec![1u8];
    delta_input.extend(frames(&delta));
    vec![sotw_input, delta_input]
}

/// An ADS stream: the first byte picks state of the world or delta, the rest is the proxy's
/// requests, each handled by the stream state machine serving `examples/demo`, and whatever it
/// would send taken after each.
pub fn xds_request(data: &[u8]) -> bool {
    let Some((&first, rest)) = data.split_first() else {
        return false;
    };
    let mut decoded = false;
    let mode = if first % 2 == 0 {
        Mode::Sotw
    } else {
        Mode::Delta
    };
    let mut stream = Stream::new(mode, demo_snapshot());
    for message in unframe(rest) {
        match mode {
            Mode::Sotw => {
                if let Ok(request) = DiscoveryRequest::decode(message) {
                    decoded = true;
                    let _ = stream.handle_sotw(&request);
                }
            }
            Mode::Delta => {
                if let Ok(request) = DeltaDiscoveryRequest::decode(message) {
                    decoded = true;
                    let _ = stream.handle_delta(&request);
                }
            }
        }
        let _ = stream.poll();
    }
    // A change of target mid-stream, as a new config would bring.
    stream.set_target(Arc::new(ProxySnapshot::default()));
    let _ = stream.poll();
    decoded
}

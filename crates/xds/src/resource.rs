//! xDS resources as the transport sees them: a name, a content-hash version,
//! the encoded body, and the other resources it refers to.
//!
//! References let the stream state machine order pushes make-before-break
//! (a route is sent only once the clusters it uses are acknowledged) and
//! keep a resource alive while anything the proxy holds still refers to it.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The order in which types are pushed: what is referred to before what refers to it.
pub const PUSH_ORDER: [&str; 5] = [CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE];

/// Types a proxy subscribes to as a whole (wildcard). The others it asks for by name,
/// once something it holds refers to them.
pub fn is_wildcard_type(type_url: &str) -> bool {
    type_url == CLUSTER || type_url == LISTENER
}

/// Short name of a type URL for logs, metrics labels and status output.
pub fn short_type(type_url: &str) -> &'static str {
    match type_url {
        CLUSTER => "cluster",
        ENDPOINT => "endpoint",
        LISTENER => "listener",
        ROUTE => "route",
        SECRET => "secret",
        _ => "other",
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceRef {
    pub type_url: &'static str,
    pub name: String,
}

impl ResourceRef {
    pub fn new(type_url: &'static str, name: impl Into<String>) -> Self {
        Self {
            type_url,
            name: name.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub type_url: &'static str,
    pub name: String,
    /// Content hash of the encoded body: equal bodies have equal versions on every replica.
    pub version: String,
    pub body: Any,
    pub refs: Vec<ResourceRef>,
    /// The pieces the body is made of, when it is composed ([`Resource::from_parts`]); empty
    /// otherwise.
    pub parts: Vec<Part>,
}

/// One piece of a composed resource that a proxy's refusal can be narrowed down to: a virtual
/// host of a route configuration, or the fields around them. When a proxy refuses a composed
/// resource, the stream finds the part at fault and sends the others on, with that part at the
/// content the proxy last accepted (the stream's `parts` module).
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    /// What produced the part, as `Kind/name` (`VirtualService/web`): who a refusal is blamed on.
    pub key: String,
    /// Content hash of `bytes`.
    pub version: String,
    /// Encoded protobuf fields; the body is the concatenation of its parts' bytes.
    pub bytes: Arc<[u8]>,
    pub refs: Vec<ResourceRef>,
}

impl Part {
    /// Fields of the message (every field but the repeated ones given as parts).
    pub fn fields<M: Message>(key: impl Into<String>, message: &M) -> Self {
        Self::of_bytes(key.into(), message.encode_to_vec(), Vec::new())
    }

    /// One element of the repeated message field `tag`.
    pub fn element<M: Message>(
        key: impl Into<String>,
        tag: u32,
        message: &M,
        refs: Vec<ResourceRef>,
    ) -> Self {
        let mut bytes = Vec::with_capacity(message.encoded_len() + 8);
        prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut bytes);
        message
            .encode_length_delimited(&mut bytes)
            .expect("a Vec grows as needed");
        Self::of_bytes(key.into(), bytes, refs)
    }

    fn of_bytes(key: String, bytes: Vec<u8>, refs: Vec<ResourceRef>) -> Self {
        Part {
            key,
            version: content_version(&bytes),
            bytes: bytes.into(),
            refs,
        }
    }
}

impl Resource {
    /// Encodes `message`, versions it by content and records what it refers to.
    pub fn new<M: Message + Name>(
        type_url: &'static str,
        name: impl Into<String>,
        message: &M,
        refs: Vec<ResourceRef>,
    ) -> Self {
        debug_assert_eq!(M::type_url(), type_url);
        let value = message.encode_to_vec();
        Self {
            type_url,
            name: name.into(),
            version: content_version(&value),
            body: Any {
                type_url: type_url.to_string(),
                value,
            },
            refs,
            parts: Vec::new(),
        }
    }

    /// A resource of type `M` whose encoding is its parts' bytes, in order (protobuf reads
    /// fields in any order and appends repeated ones), referring to what they refer to.
    pub fn from_parts<M: Name>(
        type_url: &'static str,
        name: impl Into<String>,
        parts: Vec<Part>,
    ) -> Self {
        debug_assert_eq!(M::type_url(), type_url);
        Self::composed(type_url, name.into(), parts)
    }

    /// The same resource made of other parts (the stream's substitutions).
    pub fn with_parts(&self, parts: Vec<Part>) -> Self {
        Self::composed(self.type_url, self.name.clone(), parts)
    }

    fn composed(type_url: &'static str, name: String, parts: Vec<Part>) -> Self {
        let value: Vec<u8> = parts.iter().flat_map(|p| p.bytes.iter().copied()).collect();
        let mut refs: Vec<ResourceRef> =
            parts.iter().flat_map(|p| p.refs.iter().cloned()).collect();
        refs.sort();
        refs.dedup();
        Self {
            type_url,
            name,
            version: content_version(&value),
            body: Any {
                type_url: type_url.to_string(),
                value,
            },
            refs,
            parts,
        }
    }
}

/// A stable content hash, printed as 16 hex digits.
pub fn content_version(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// Resources of one type, by name.
pub type TypeResources = BTreeMap<String, Arc<Resource>>;

/// Everything one proxy should have, by type URL.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxySnapshot {
    pub resources: BTreeMap<&'static str, TypeResources>,
}

impl ProxySnapshot {
    pub fn insert(&mut self, resource: Resource) {
        self.insert_shared(Arc::new(resource));
    }

    /// Inserts a resource that other snapshots share (one upstream's cluster on many proxies).
    pub fn insert_shared(&mut self, resource: Arc<Resource>) {
        self.resources
            .entry(resource.type_url)
            .or_default()
            .insert(resource.name.clone(), resource);
    }

    pub fn of_type(&self, type_url: &str) -> Option<&TypeResources> {
        self.resources.get(type_url)
    }

    pub fn get(&self, type_url: &str, name: &str) -> Option<&Arc<Resource>> {
        self.resources.get(type_url).and_then(|m| m.get(name))
    }

    pub fn len(&self) -> usize {
        self.resources.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

//! Wire-level properties of the generated messages that other crates rely on.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use prost::Message;
use vmesh_proto::v1::{Health, Resource, ServiceInstance};

/// `google.protobuf.Any` as its .proto declares it; stands in for envoy-types' `Any` so this crate
/// need not depend on envoy-types.
#[derive(Clone, PartialEq, Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[test]
fn resource_and_any_share_their_wire_format() {
    let any = Any {
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".to_string(),
        value: vec![10, 3, b'w', b'e', b'b'],
    };
    let resource = Resource::decode(any.encode_to_vec().as_slice()).unwrap();
    assert_eq!(resource.type_url, any.type_url);
    assert_eq!(resource.value, any.value);

    let named = Resource {
        name: "web".to_string(),
        version: "h1".to_string(),
        ..resource
    };
    // An Any decoder skips `name` and `version` as unknown fields.
    assert_eq!(Any::decode(named.encode_to_vec().as_slice()).unwrap(), any);
}

#[test]
fn encoding_is_deterministic_and_round_trips() {
    let meta: BTreeMap<String, String> = (0..20)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    let instance = ServiceInstance {
        id: "web-1".to_string(),
        service: "web".to_string(),
        tags: vec!["v1".to_string()],
        meta: meta.clone(),
        address: "10.0.0.7".to_string(),
        port: 8080,
        health: Health::Warning as i32,
    };
    // Built again with the map filled in another order: same bytes.
    let other = ServiceInstance {
        meta: meta.into_iter().rev().collect(),
        ..instance.clone()
    };
    let bytes = instance.encode_to_vec();
    assert_eq!(bytes, other.encode_to_vec());
    let decoded = ServiceInstance::decode(bytes.as_slice()).unwrap();
    assert_eq!(decoded, instance);
    assert_eq!(decoded.health(), Health::Warning);
}

//! Envoy's JSON form of the xDS resources vmesh encodes: proto3 JSON with the .proto field names
//! and `@type` in every `Any`, as Envoy's own `/config_dump` prints them, for the controller's
//! `/config_dump?proxy=`.
//!
//! The messages are known by descriptors compiled at build time from the .proto files envoy-types
//! ships (build.rs), so what is printed is exactly what was encoded, field by field.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::Value;

const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy.bin"));

fn pool() -> Result<&'static DescriptorPool, String> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(DESCRIPTORS).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| format!("the Envoy descriptors built into vmesh do not decode: {e}"))
}

/// The JSON of `bytes`, an encoded message of `type_url`
/// (`type.googleapis.com/envoy.config.cluster.v3.Cluster`).
pub fn to_json(type_url: &str, bytes: &[u8]) -> Result<Value, String> {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    let descriptor = pool()?
        .get_message_by_name(name)
        .ok_or_else(|| format!("{name} is not a message vmesh knows"))?;
    let message = DynamicMessage::decode(descriptor, bytes).map_err(|e| format!("{name}: {e}"))?;
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true);
    message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| format!("{name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
    use envoy_types::pb::google::protobuf::{Any, Duration};
    use prost::{Message, Name};

    #[test]
    fn a_cluster_reads_like_envoys_config_dump() {
        let cluster = Cluster {
            name: "web".into(),
            connect_timeout: Some(Duration {
                seconds: 5,
                nanos: 0,
            }),
            ..Default::default()
        };
        let json = to_json(&Cluster::type_url(), &cluster.encode_to_vec()).unwrap();
        assert_eq!(json["name"], "web");
        assert_eq!(json["connect_timeout"], "5s");
        assert!(
            json.get("lb_policy").is_none(),
            "defaults are left out: {json}"
        );
    }

    #[test]
    fn an_embedded_message_is_printed_with_its_type() {
        let hcm = HttpConnectionManager {
            stat_prefix: "edge".into(),
            ..Default::default()
        };
        let listener = Listener {
            name: "gw-edge".into(),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(Any {
                        type_url: HttpConnectionManager::type_url(),
                        value: hcm.encode_to_vec(),
                    })),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let json = to_json(&Listener::type_url(), &listener.encode_to_vec()).unwrap();
        let typed = &json["filter_chains"][0]["filters"][0]["typed_config"];
        assert_eq!(typed["@type"], HttpConnectionManager::type_url());
        assert_eq!(typed["stat_prefix"], "edge");
    }

    #[test]
    fn an_unknown_type_or_bad_bytes_is_an_error() {
        assert!(to_json("type.googleapis.com/no.Such", b"").is_err());
        assert!(to_json(&Cluster::type_url(), &[0xff, 0xff, 0xff]).is_err());
    }
}

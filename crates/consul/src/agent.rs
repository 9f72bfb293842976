//! Reads of the local Consul agent (`/v1/agent/...`): what a `vmesh-agent` on a VM polls.
//!
//! These endpoints are answered by the agent itself, from its local state: they keep answering
//! when the Consul servers are unreachable and show a registration at once (no anti-entropy
//! delay). They support no blocking queries, so callers poll; the raw bodies are returned as well
//! so a poller can skip parsing an answer that is byte-identical to the previous one.

use std::collections::BTreeMap;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::client::SLACK;
use crate::{Client, ConsulError};

/// What `/v1/agent/self` says about the agent's node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSelf {
    /// `Config.NodeName`.
    pub node_name: String,
    /// `Config.Datacenter`.
    pub datacenter: String,
    /// `Config.NodeID` (may be empty).
    pub node_id: String,
    /// `Member.Addr`: the node's address (what an empty service `Address` means).
    pub address: String,
}

/// One entry of `GET /v1/agent/services`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct LocalService {
    #[serde(rename = "ID")]
    pub id: String,
    /// The service name.
    pub service: String,
    #[serde(deserialize_with = "null_default")]
    pub tags: Vec<String>,
    #[serde(deserialize_with = "null_default")]
    pub meta: BTreeMap<String, String>,
    pub port: u32,
    /// Empty: the node's address.
    pub address: String,
    /// Empty for a typical service; `connect-proxy`, `mesh-gateway`, ... otherwise.
    #[serde(deserialize_with = "null_default")]
    pub kind: String,
}

/// One entry of `GET /v1/agent/checks`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct LocalCheck {
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub name: String,
    /// `passing`, `warning` or `critical`.
    pub status: String,
    /// Empty for a node-level check.
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    pub service_name: String,
}

fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Parses the body of `GET /v1/agent/services` (a map from service ID to service).
pub fn parse_agent_services(body: &[u8]) -> Result<BTreeMap<String, LocalService>, ConsulError> {
    serde_json::from_slice(body)
        .map_err(|e| ConsulError::Decode(format!("/v1/agent/services: {e}")))
}

/// Parses the body of `GET /v1/agent/checks` (a map from check ID to check).
pub fn parse_agent_checks(body: &[u8]) -> Result<BTreeMap<String, LocalCheck>, ConsulError> {
    serde_json::from_slice(body).map_err(|e| ConsulError::Decode(format!("/v1/agent/checks: {e}")))
}

/// Parses the body of `GET /v1/agent/self`.
pub fn parse_agent_self(body: &[u8]) -> Result<AgentSelf, ConsulError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Wire {
        config: WireConfig,
        #[serde(default)]
        member: WireMember,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct WireConfig {
        node_name: String,
        datacenter: String,
        #[serde(rename = "NodeID", default)]
        node_id: String,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "PascalCase", default)]
    struct WireMember {
        addr: String,
    }
    let wire: Wire = serde_json::from_slice(body)
        .map_err(|e| ConsulError::Decode(format!("/v1/agent/self: {e}")))?;
    Ok(AgentSelf {
        node_name: wire.config.node_name,
        datacenter: wire.config.datacenter,
        node_id: wire.config.node_id,
        address: wire.member.addr,
    })
}

impl Client {
    /// `GET /v1/agent/self`: the local agent's node name, datacenter and address.
    pub async fn agent_self(&self) -> Result<AgentSelf, ConsulError> {
        parse_agent_self(&self.agent_get("/v1/agent/self").await?)
    }

    /// `GET /v1/agent/services`, the raw body (parse it with [`parse_agent_services`]).
    pub async fn agent_services_raw(&self) -> Result<Bytes, ConsulError> {
        self.agent_get("/v1/agent/services").await
    }

    /// `GET /v1/agent/checks`, the raw body (parse it with [`parse_agent_checks`]).
    pub async fn agent_checks_raw(&self) -> Result<Bytes, ConsulError> {
        self.agent_get("/v1/agent/checks").await
    }

    /// `GET /v1/agent/services`, parsed.
    pub async fn agent_services(&self) -> Result<BTreeMap<String, LocalService>, ConsulError> {
        parse_agent_services(&self.agent_services_raw().await?)
    }

    /// `GET /v1/agent/checks`, parsed.
    pub async fn agent_checks(&self) -> Result<BTreeMap<String, LocalCheck>, ConsulError> {
        parse_agent_checks(&self.agent_checks_raw().await?)
    }

    async fn agent_get(&self, path: &str) -> Result<Bytes, ConsulError> {
        let answer = self.call(Method::GET, path, &[], None, SLACK).await?;
        if answer.status != StatusCode::OK {
            return Err(ConsulError::status(answer.status, &answer.body));
        }
        Ok(answer.body)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn services_decode_with_nulls_and_kinds() {
        let body = br#"{
            "web-1": {"ID":"web-1","Service":"web","Tags":["a"],"Meta":{"zone":"z"},"Port":8080,
                      "Address":"10.0.0.5","Weights":{"Passing":1,"Warning":1},"EnableTagOverride":false,
                      "Datacenter":"dc1"},
            "db": {"ID":"db","Service":"db","Tags":null,"Meta":null,"Port":5432,"Address":""},
            "web-sidecar-proxy": {"ID":"web-sidecar-proxy","Service":"web-sidecar-proxy","Kind":"connect-proxy",
                      "Port":21000,"Address":"","Proxy":{"DestinationServiceName":"web"}}
        }"#;
        let services = parse_agent_services(body).unwrap();
        assert_eq!(services.len(), 3);
        assert_eq!(services["web-1"].tags, ["a"]);
        assert_eq!(services["web-1"].meta["zone"], "z");
        assert_eq!(services["web-1"].port, 8080);
        assert!(services["db"].tags.is_empty() && services["db"].meta.is_empty());
        assert_eq!(services["db"].kind, "");
        assert_eq!(services["web-sidecar-proxy"].kind, "connect-proxy");
    }

    #[test]
    fn checks_and_self_decode() {
        let checks = parse_agent_checks(
            br#"{"serfHealth":{"Node":"n1","CheckID":"serfHealth","Name":"Serf","Status":"passing",
                 "ServiceID":"","ServiceName":"","ServiceTags":[]},
                 "service:web":{"CheckID":"service:web","Status":"critical","ServiceID":"web"}}"#,
        )
        .unwrap();
        assert_eq!(checks["serfHealth"].service_id, "");
        assert_eq!(checks["service:web"].status, "critical");

        let me = parse_agent_self(
            br#"{"Config":{"Datacenter":"dc2","NodeName":"vm-7","NodeID":"abc"},
                 "Member":{"Name":"vm-7","Addr":"10.1.2.3","Port":8301}}"#,
        )
        .unwrap();
        assert_eq!(
            me,
            AgentSelf {
                node_name: "vm-7".into(),
                datacenter: "dc2".into(),
                node_id: "abc".into(),
                address: "10.1.2.3".into(),
            }
        );
        assert!(parse_agent_self(b"{}").is_err());
    }
}

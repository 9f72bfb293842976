//! SPIFFE identities: `spiffe://<trust-domain>/dc/<dc>/svc/<service>` for workloads,
//! `spiffe://<trust-domain>/dc/<dc>/agent/<node>` for agents and
//! `spiffe://<trust-domain>/dc/<dc>/gateway/<proxy>` for edge gateways that take their config
//! from the controller's xDS port.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";
/// The SPIFFE standard limits a trust domain name to 255 bytes and a whole id to 2048 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const MAX_ID_LEN: usize = 2048;

/// Why a SPIFFE id (or one of its parts) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("SPIFFE id {input:?} must start with \"spiffe://\"")]
    Scheme { input: String },
    #[error("SPIFFE id {input:?} is longer than {MAX_ID_LEN} bytes")]
    TooLong { input: String },
    #[error(
        "invalid trust domain {value:?}: {reason} (allowed: lowercase letters, digits, '.', '-', '_'; at most {MAX_TRUST_DOMAIN_LEN} bytes)"
    )]
    TrustDomain { value: String, reason: &'static str },
    #[error(
        "SPIFFE id {input:?} has an unsupported path: expected /dc/<dc>/svc/<service>, /dc/<dc>/agent/<node> or /dc/<dc>/gateway/<proxy>"
    )]
    Path { input: String },
    #[error(
        "invalid {what} {value:?}: {reason} (allowed: letters, digits, '.', '-', '_'; not \".\" or \"..\")"
    )]
    Segment {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Who an identity belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Principal {
    /// A workload (a service's proxies): `/dc/<dc>/svc/<service>`.
    Service(String),
    /// The vmesh agent of a node: `/dc/<dc>/agent/<node>`.
    Agent(String),
    /// An edge gateway's Envoy, named by its proxy id (Envoy's node id):
    /// `/dc/<dc>/gateway/<proxy>`.
    Gateway(String),
}

/// A validated vmesh SPIFFE id. Parsing is strict: only the three path shapes vmesh issues are
/// accepted, so anything that parses can be formatted back to the same string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    dc: String,
    principal: Principal,
}

impl SpiffeId {
    /// The id of a workload: `spiffe://<trust_domain>/dc/<dc>/svc/<service>`.
    pub fn service(trust_domain: &str, dc: &str, service: &str) -> Result<Self, IdError> {
        Self::new(trust_domain, dc, Principal::Service(service.to_owned()))
    }

    /// The id of a node's agent: `spiffe://<trust_domain>/dc/<dc>/agent/<node>`.
    pub fn agent(trust_domain: &str, dc: &str, node: &str) -> Result<Self, IdError> {
        Self::new(trust_domain, dc, Principal::Agent(node.to_owned()))
    }

    /// The id of an edge gateway: `spiffe://<trust_domain>/dc/<dc>/gateway/<proxy>`.
    pub fn gateway(trust_domain: &str, dc: &str, proxy: &str) -> Result<Self, IdError> {
        Self::new(trust_domain, dc, Principal::Gateway(proxy.to_owned()))
    }

    /// Validates every part and builds the id.
    pub fn new(trust_domain: &str, dc: &str, principal: Principal) -> Result<Self, IdError> {
        validate_trust_domain(trust_domain)?;
        validate_segment("datacenter", dc)?;
        match &principal {
            Principal::Service(s) => validate_segment("service name", s)?,
            Principal::Agent(n) => validate_segment("node name", n)?,
            Principal::Gateway(p) => validate_segment("proxy name", p)?,
        }
        let id = SpiffeId {
            trust_domain: trust_domain.to_owned(),
            dc: dc.to_owned(),
            principal,
        };
        let len = id.to_string().len();
        if len > MAX_ID_LEN {
            return Err(IdError::TooLong {
                input: id.to_string(),
            });
        }
        Ok(id)
    }

    /// Parses `spiffe://<trust-domain>/dc/<dc>/(svc|agent|gateway)/<name>`, nothing else: no query,
    /// fragment, port, user info, trailing slash, empty or dot segments, or upper-case scheme.
    pub fn parse(input: &str) -> Result<Self, IdError> {
        if input.len() > MAX_ID_LEN {
            return Err(IdError::TooLong {
                input: input.chars().take(64).collect::<String>() + "...",
            });
        }
        let rest = input.strip_prefix(SCHEME).ok_or_else(|| IdError::Scheme {
            input: input.to_owned(),
        })?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(trust_domain)?;
        let path_err = || IdError::Path {
            input: input.to_owned(),
        };
        let segments: Vec<&str> = path
            .strip_prefix('/')
            .ok_or_else(path_err)?
            .split('/')
            .collect();
        let [dc_literal, dc, kind, name] = segments.as_slice() else {
            return Err(path_err());
        };
        if *dc_literal != "dc" {
            return Err(path_err());
        }
        let principal = match *kind {
            "svc" => Principal::Service((*name).to_owned()),
            "agent" => Principal::Agent((*name).to_owned()),
            "gateway" => Principal::Gateway((*name).to_owned()),
            _ => return Err(path_err()),
        };
        Self::new(trust_domain, dc, principal)
    }

    /// Reads the SPIFFE id from a certificate's URI SAN. The certificate must carry exactly one
    /// URI SAN (as an X.509-SVID does) and it must be a vmesh id.
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, crate::CaError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| crate::CaError::InvalidCertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| crate::CaError::InvalidCertificate(e.to_string()))?;
        let uris: Vec<&str> = san
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        match uris.as_slice() {
            [uri] => Ok(Self::parse(uri)?),
            [] => Err(crate::CaError::InvalidCertificate(
                "certificate has no URI SAN (no SPIFFE id)".into(),
            )),
            _ => Err(crate::CaError::InvalidCertificate(format!(
                "certificate has {} URI SANs; an X.509-SVID has exactly one",
                uris.len()
            ))),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn dc(&self) -> &str {
        &self.dc
    }

    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// The service name, if this is a workload id.
    pub fn service_name(&self) -> Option<&str> {
        match &self.principal {
            Principal::Service(s) => Some(s),
            _ => None,
        }
    }

    /// The node name, if this is an agent id.
    pub fn agent_node(&self) -> Option<&str> {
        match &self.principal {
            Principal::Agent(n) => Some(n),
            _ => None,
        }
    }

    /// The proxy id, if this is a gateway id.
    pub fn gateway_proxy(&self) -> Option<&str> {
        match &self.principal {
            Principal::Gateway(p) => Some(p),
            _ => None,
        }
    }

    pub fn is_agent(&self) -> bool {
        matches!(self.principal, Principal::Agent(_))
    }

    pub fn is_gateway(&self) -> bool {
        matches!(self.principal, Principal::Gateway(_))
    }
}

pub(crate) fn validate_trust_domain(td: &str) -> Result<(), IdError> {
    let err = |reason| {
        Err(IdError::TrustDomain {
            value: td.to_owned(),
            reason,
        })
    };
    if td.is_empty() {
        return err("empty");
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return err("too long");
    }
    if td.contains(':') {
        return err("a port is not allowed");
    }
    if td.contains('@') {
        return err("user info is not allowed");
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return err("invalid character");
    }
    Ok(())
}

fn validate_segment(what: &'static str, value: &str) -> Result<(), IdError> {
    let err = |reason| {
        Err(IdError::Segment {
            what,
            value: value.to_owned(),
            reason,
        })
    };
    if value.is_empty() {
        return err("empty");
    }
    if value == "." || value == ".." {
        return err("dot segment");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return err("invalid character");
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, name) = match &self.principal {
            Principal::Service(s) => ("svc", s),
            Principal::Agent(n) => ("agent", n),
            Principal::Gateway(p) => ("gateway", p),
        };
        write!(
            f,
            "{SCHEME}{}/dc/{}/{kind}/{name}",
            self.trust_domain, self.dc
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in [
            "spiffe://vmesh.local/dc/dc1/svc/web",
            "spiffe://example.org/dc/eu-west_1/agent/node-1.internal",
            "spiffe://a/dc/X/svc/Billing_API",
            "spiffe://vmesh/dc/dc1/gateway/edge-proxy",
        ] {
            let id = SpiffeId::parse(s).expect(s);
            assert_eq!(id.to_string(), s);
            assert_eq!(s.parse::<SpiffeId>().expect(s), id);
            let json = serde_json::to_string(&id).expect("json");
            assert_eq!(serde_json::from_str::<SpiffeId>(&json).expect("json"), id);
        }
    }

    #[test]
    fn constructors_match_parse() {
        let svc = SpiffeId::service("vmesh.local", "dc1", "web").expect("svc");
        assert_eq!(svc.to_string(), "spiffe://vmesh.local/dc/dc1/svc/web");
        assert_eq!(svc.service_name(), Some("web"));
        assert_eq!(svc.agent_node(), None);
        assert!(!svc.is_agent());
        let agent = SpiffeId::agent("vmesh.local", "dc1", "vm-7").expect("agent");
        assert_eq!(agent.to_string(), "spiffe://vmesh.local/dc/dc1/agent/vm-7");
        assert_eq!(agent.agent_node(), Some("vm-7"));
        assert_eq!(agent.trust_domain(), "vmesh.local");
        assert_eq!(agent.dc(), "dc1");
        assert_eq!(agent.principal(), &Principal::Agent("vm-7".into()));
        let gateway = SpiffeId::gateway("vmesh", "dc1", "edge-proxy").expect("gateway");
        assert_eq!(
            gateway.to_string(),
            "spiffe://vmesh/dc/dc1/gateway/edge-proxy"
        );
        assert_eq!(gateway.gateway_proxy(), Some("edge-proxy"));
        assert_eq!(gateway.agent_node(), None);
        assert!(gateway.is_gateway() && !gateway.is_agent());
        assert!(SpiffeId::gateway("vmesh", "dc1", "a/b").is_err());
        assert!(SpiffeId::agent("Bad", "dc1", "n").is_err());
        assert!(SpiffeId::service("td", "dc1", "a/b").is_err());
    }

    #[test]
    fn rejections() {
        let cases = [
            ("", "spiffe://"),
            ("http://td/dc/dc1/svc/web", "spiffe://"),
            ("SPIFFE://td/dc/dc1/svc/web", "spiffe://"),
            ("spiffe:/td/dc/dc1/svc/web", "spiffe://"),
            ("spiffe://", "trust domain"),
            ("spiffe:///dc/dc1/svc/web", "trust domain"),
            ("spiffe://Example.org/dc/dc1/svc/web", "trust domain"),
            ("spiffe://td:8443/dc/dc1/svc/web", "port"),
            ("spiffe://user@td/dc/dc1/svc/web", "user info"),
            ("spiffe://td", "unsupported path"),
            ("spiffe://td/", "unsupported path"),
            ("spiffe://td/dc/dc1/svc/web/", "unsupported path"),
            ("spiffe://td/dc/dc1/svc", "unsupported path"),
            ("spiffe://td/dc/dc1/ns/default/svc/web", "unsupported path"),
            ("spiffe://td/dc/dc1/pod/web", "unsupported path"),
            ("spiffe://td/DC/dc1/svc/web", "unsupported path"),
            ("spiffe://td/dc//svc/web", "datacenter"),
            ("spiffe://td/dc/../svc/web", "dot segment"),
            ("spiffe://td/dc/dc1/svc/.", "dot segment"),
            ("spiffe://td/dc/dc1/svc/web?x=1", "invalid character"),
            ("spiffe://td/dc/dc1/svc/web#f", "invalid character"),
            ("spiffe://td/dc/dc1/agent/n%41", "invalid character"),
            ("spiffe://td/dc/dc 1/svc/web", "invalid character"),
        ];
        for (input, want) in cases {
            let err = SpiffeId::parse(input).expect_err(input).to_string();
            assert!(
                err.contains(want),
                "{input:?}: {err:?} should mention {want:?}"
            );
        }
        let long = format!("spiffe://td/dc/dc1/svc/{}", "a".repeat(MAX_ID_LEN));
        assert!(matches!(
            SpiffeId::parse(&long),
            Err(IdError::TooLong { .. })
        ));
        let long_td = format!("spiffe://{}/dc/dc1/svc/web", "a".repeat(256));
        assert!(matches!(
            SpiffeId::parse(&long_td),
            Err(IdError::TrustDomain { .. })
        ));
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://td/x\"").is_err());
    }
}

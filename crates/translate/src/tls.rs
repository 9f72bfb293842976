//! TLS: SDS secrets, a gateway's TLS termination (one filter chain per certificate, chosen by
//! SNI), and an upstream's TLS origination.
//!
//! Certificates and keys reach Envoy only as SDS `Secret`s on the ADS stream, named
//! `cert:<secret>` (chain and key) and `ca:<secret>` (CA bundle); listeners and clusters refer
//! to them by name. A proxy gets a secret only when a listener or cluster it holds refers to it.
//! When the controller may not send secrets at all ([`Secrets::refused`]), nothing that needs
//! one is produced, and the object says why.

use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    data_source::Specifier, transport_socket, DataSource, TransportSocket,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    secret,
    subject_alt_name_matcher::SanType,
    tls_parameters::TlsProtocol,
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret,
    SubjectAltNameMatcher, TlsCertificate as EnvoyTlsCertificate, TlsParameters,
    UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher};
use envoy_types::pb::google::protobuf::{Any, BoolValue};
use prost::{Message, Name};
use vmesh_model::{
    name_covers, CaBundle, CertificateInfo, GatewayTls, ObjectKey, SecretEntry, Secrets,
    TlsCertificate, TlsVersion, UpstreamTls,
};
use vmesh_xds::resource::SECRET;
use vmesh_xds::{Resource, ResourceRef};

use crate::{ads_config_source, Reports};

/// What an object that refers to secrets is told offline.
const OFFLINE: &str =
    "its secrets are not read offline: the controller checks them (and serves it only if they are good)";

/// Name of the SDS secret with the certificate and key of secret `secret`.
pub fn certificate_secret_name(secret: &str) -> String {
    format!("cert:{secret}")
}

/// Name of the SDS secret with the CA bundle of secret `secret`.
pub fn ca_secret_name(secret: &str) -> String {
    format!("ca:{secret}")
}

fn any<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

fn inline(text: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineString(text.to_string())),
        ..Default::default()
    })
}

fn sds(name: String) -> SdsSecretConfig {
    SdsSecretConfig {
        name,
        sds_config: Some(ads_config_source()),
    }
}

fn certificate_resource(secret: &str, cert: &TlsCertificate) -> Arc<Resource> {
    let body = Secret {
        name: certificate_secret_name(secret),
        r#type: Some(secret::Type::TlsCertificate(EnvoyTlsCertificate {
            certificate_chain: inline(&cert.chain_pem),
            private_key: inline(cert.key_pem.expose()),
            ..Default::default()
        })),
    };
    Arc::new(Resource::new(SECRET, body.name.clone(), &body, vec![]))
}

fn ca_resource(secret: &str, ca: &CaBundle) -> Arc<Resource> {
    let body = Secret {
        name: ca_secret_name(secret),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(&ca.pem),
                ..Default::default()
            },
        )),
    };
    Arc::new(Resource::new(SECRET, body.name.clone(), &body, vec![]))
}

fn tls_protocol(v: TlsVersion) -> i32 {
    match v {
        TlsVersion::V1_2 => TlsProtocol::TlSv12 as i32,
        TlsVersion::V1_3 => TlsProtocol::TlSv13 as i32,
    }
}

/// What a secret offers, or why it offers nothing usable. Problems with a version that is not
/// served (while an older one is) and warnings about what is served go to `reports`.
fn usable<'a>(
    secrets: &'a Secrets,
    name: &str,
    key: &ObjectKey,
    path: &str,
    reports: &mut Reports,
) -> Result<&'a SecretEntry, String> {
    let Some(entry) = secrets.entries.get(name) else {
        return Err(format!("secret {name:?} has not been read yet"));
    };
    let Some(serving) = &entry.serving else {
        return Err(format!(
            "secret {name:?}: {}",
            entry.problem.as_deref().unwrap_or("not found")
        ));
    };
    if let Some(problem) = &entry.problem {
        reports.warn(
            key.clone(),
            path,
            format!(
                "secret {name:?}: the latest version is not used: {problem}; serving {}, the last good one",
                serving.revision
            ),
        );
    }
    if let Some(warning) = &entry.warning {
        reports.warn(key.clone(), path, format!("secret {name:?}: {warning}"));
    }
    Ok(entry)
}

/// One certificate of a gateway, ready to serve.
pub(crate) struct ServedCertificate {
    /// Server names it is chosen for (the names no earlier certificate took).
    pub server_names: Vec<String>,
    /// All its names, for the domain coverage check.
    pub names: Vec<String>,
    pub sds_name: String,
}

/// A gateway's TLS, resolved against the secrets.
pub(crate) struct GatewayTlsResources {
    /// In the order of `spec.tls.certificates`; the first is the default.
    pub certificates: Vec<ServedCertificate>,
    pub client_ca: Option<String>,
    pub secrets: Vec<Arc<Resource>>,
    pub infos: Vec<CertificateInfo>,
}

/// Resolves `spec.tls` of gateway `key`. `Err` when the gateway cannot serve TLS at all (the
/// errors are reported): no listener is made for it.
pub(crate) fn resolve_gateway(
    key: &ObjectKey,
    tls: &GatewayTls,
    secrets: &Secrets,
    reports: &mut Reports,
) -> Result<GatewayTlsResources, ()> {
    if let Some(reason) = &secrets.refused {
        reports.error(key.clone(), "spec.tls", reason.clone());
        return Err(());
    }
    if secrets.offline {
        reports.warn(key.clone(), "spec.tls", OFFLINE);
        return Err(());
    }
    let mut out = GatewayTlsResources {
        certificates: Vec::new(),
        client_ca: None,
        secrets: Vec::new(),
        infos: Vec::new(),
    };
    let mut taken: BTreeSet<String> = BTreeSet::new();
    let mut unusable = Vec::new();
    for (i, cert_ref) in tls.certificates.iter().enumerate() {
        let path = format!("spec.tls.certificates[{i}].secret");
        let name = cert_ref.secret.as_str();
        let entry = match usable(secrets, name, key, &path, reports) {
            Ok(entry) => entry,
            Err(e) => {
                unusable.push((path, e));
                continue;
            }
        };
        let Some(material) = &entry.serving else {
            continue;
        };
        let Some(cert) = &material.certificate else {
            unusable.push((
                path,
                format!("secret {name:?} has no cert and key (a certificate needs both)"),
            ));
            continue;
        };
        let server_names: Vec<String> = cert
            .names
            .iter()
            .filter(|n| taken.insert((*n).clone()))
            .cloned()
            .collect();
        if server_names.is_empty() && !out.certificates.is_empty() {
            reports.warn(
                key.clone(),
                &path,
                format!(
                    "every name of secret {name:?} ({}) is served by an earlier certificate; this one is never chosen",
                    cert.names.join(", ")
                ),
            );
        }
        out.secrets.push(certificate_resource(name, cert));
        out.infos.push(CertificateInfo::of(name, material, cert));
        out.certificates.push(ServedCertificate {
            server_names,
            names: cert.names.clone(),
            sds_name: certificate_secret_name(name),
        });
    }
    let mut fatal = out.certificates.is_empty();
    for (path, message) in unusable {
        if fatal {
            reports.error(key.clone(), path, message);
        } else {
            reports.warn(key.clone(), path, format!("{message}; not served"));
        }
    }
    if let Some(client) = &tls.client_certificate {
        let path = "spec.tls.clientCertificate.ca";
        match usable(secrets, &client.ca, key, path, reports) {
            Ok(entry) => match entry.serving.as_ref().and_then(|m| m.ca.as_ref()) {
                Some(ca) => {
                    out.secrets.push(ca_resource(&client.ca, ca));
                    out.client_ca = Some(ca_secret_name(&client.ca));
                }
                None => {
                    reports.error(
                        key.clone(),
                        path,
                        format!("secret {:?} has no ca field", client.ca),
                    );
                    fatal = true;
                }
            },
            Err(e) => {
                reports.error(key.clone(), path, e);
                fatal = true;
            }
        }
    }
    if fatal {
        return Err(());
    }
    Ok(out)
}

/// Warns about each served domain that no certificate carries.
pub(crate) fn check_coverage(
    key: &ObjectKey,
    resolved: &GatewayTlsResources,
    domains: &[(String, String)],
    reports: &mut Reports,
) {
    for (vs, host) in domains {
        if host == "*" {
            continue;
        }
        let lower = host.to_ascii_lowercase();
        let covered = resolved
            .certificates
            .iter()
            .flat_map(|c| c.names.iter())
            .any(|n| n == &lower || name_covers(n, &lower));
        if !covered {
            reports.warn(
                key.clone(),
                "spec.tls.certificates",
                format!(
                    "no certificate carries {host:?} (VirtualService {vs:?}): clients asking for it get the first certificate and will refuse it"
                ),
            );
        }
    }
}

/// The transport socket of a filter chain serving `cert`.
pub(crate) fn downstream_socket(
    tls: &GatewayTls,
    cert: &ServedCertificate,
    client_ca: Option<&str>,
) -> TransportSocket {
    let common = CommonTlsContext {
        tls_params: Some(TlsParameters {
            tls_minimum_protocol_version: tls_protocol(tls.min_version),
            tls_maximum_protocol_version: tls.max_version.map_or(0, tls_protocol),
            cipher_suites: tls.cipher_suites.clone().unwrap_or_default(),
            ..Default::default()
        }),
        tls_certificate_sds_secret_configs: vec![sds(cert.sds_name.clone())],
        validation_context_type: client_ca
            .map(|ca| ValidationContextType::ValidationContextSdsSecretConfig(sds(ca.into()))),
        alpn_protocols: vec!["h2".into(), "http/1.1".into()],
        ..Default::default()
    };
    let context = DownstreamTlsContext {
        common_tls_context: Some(common),
        require_client_certificate: Some(BoolValue {
            value: tls.client_certificate.as_ref().is_some_and(|c| !c.optional),
        }),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(&context))),
    }
}

/// The secrets a resolved gateway's listener refers to.
pub(crate) fn refs(resolved: &GatewayTlsResources) -> Vec<ResourceRef> {
    resolved
        .secrets
        .iter()
        .map(|s| ResourceRef::new(SECRET, s.name.clone()))
        .collect()
}

/// An upstream's TLS: its transport socket and the CA secret, or why it cannot be used.
pub(crate) fn upstream(
    key: &ObjectKey,
    tls: &UpstreamTls,
    secrets: &Secrets,
    reports: &mut Reports,
) -> Option<(TransportSocket, Arc<Resource>)> {
    let path = "spec.tls.ca";
    if secrets.offline {
        reports.warn(key.clone(), "spec.tls", OFFLINE);
        return None;
    }
    if let Some(reason) = &secrets.refused {
        reports.error(
            key.clone(),
            "spec.tls",
            format!("{reason}; no traffic is sent to it"),
        );
        return None;
    }
    let ca = match usable(secrets, &tls.ca, key, path, reports) {
        Ok(entry) => entry.serving.as_ref().and_then(|m| m.ca.as_ref()),
        Err(e) => {
            reports.error(key.clone(), path, format!("{e}; no traffic is sent to it"));
            return None;
        }
    };
    let Some(ca) = ca else {
        reports.error(
            key.clone(),
            path,
            format!(
                "secret {:?} has no ca field; no traffic is sent to it",
                tls.ca
            ),
        );
        return None;
    };
    let resource = ca_resource(&tls.ca, ca);
    let san = tls
        .sni
        .iter()
        .map(|sni| SubjectAltNameMatcher {
            san_type: SanType::Dns as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(sni.clone())),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let common = CommonTlsContext {
        validation_context_type: Some(ValidationContextType::CombinedValidationContext(
            CombinedCertificateValidationContext {
                default_validation_context: Some(CertificateValidationContext {
                    match_typed_subject_alt_names: san,
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(sds(resource.name.clone())),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    let context = UpstreamTlsContext {
        common_tls_context: Some(common),
        sni: tls.sni.clone().unwrap_or_default(),
        ..Default::default()
    };
    let socket = TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(&context))),
    };
    Some((socket, resource))
}

/// What a private key is replaced with wherever a secret is shown (`/config_dump`, renderings).
pub const REDACTED: &str = "[redacted]";

/// The body of an SDS secret with its private key replaced by [`REDACTED`], for showing it;
/// `None` when it is not a secret that decodes.
pub fn redacted_secret(bytes: &[u8]) -> Option<Secret> {
    let mut secret = Secret::decode(bytes).ok()?;
    if let Some(secret::Type::TlsCertificate(cert)) = &mut secret.r#type {
        if cert.private_key.is_some() {
            cert.private_key = inline(REDACTED);
        }
    }
    Some(secret)
}

//! vmesh-model: the config model.
//!
//! A config object is one YAML or JSON document with the envelope
//! `kind` / `name` / `spec`. This crate owns:
//!
//! - the spec types ([`UpstreamSpec`], [`VirtualServiceSpec`], [`GatewaySpec`]),
//!   deserialized strictly (unknown fields are errors);
//! - parsing ([`parse_multi`], [`parse_single`]) that reads the key first, so a
//!   bad spec is still reported on the right object, with field paths such as
//!   `spec.routes[2].match.regex`;
//! - semantic validation that collects every problem of an object;
//! - [`Catalog`], the discovered instances of Consul services that `consul`
//!   upstreams use (input to translation, filled by the controller, not config);
//! - [`ConfigSet`], the store that keeps the last good version of each object
//!   across edits, and resolves objects defined twice.
//!
//! It is pure: no IO, no runtime, no Envoy types.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod catalog;
mod document;
mod duration;
mod gateway;
pub mod limits;
mod problem;
mod read;
pub mod regex;
mod secret;
mod store;
mod tls;
mod upstream;
mod validate;
mod virtual_service;

pub use catalog::{Catalog, Health, ServiceInstance};
pub use document::{
    parse_multi, parse_single, parse_value, read_documents_as, Document, Kind, Object, ObjectKey,
    Parsed,
};
pub use duration::Duration;
pub use gateway::{
    AccessLog, GatewaySpec, DEFAULT_ACCESS_LOG_FIELDS, DEFAULT_BIND_ADDRESS, DEFAULT_PROXY_NAME,
    MAX_TRUSTED_HOPS,
};
pub use problem::Problem;
pub use read::read_documents;
pub use secret::{
    name_covers, CaBundle, CertificateInfo, KeyPem, SecretEntry, SecretMaterial, Secrets,
    TlsCertificate,
};
pub use store::{Claim, Config, ConfigSet, ObjectReport, ParsedSource, SourceMode, State};
pub use tls::{
    is_valid_secret_name, CertificateRef, ClientCertificate, GatewayTls, HttpsRedirect, TlsVersion,
    UpstreamTls, CIPHER_SUITES, MAX_GATEWAY_CERTIFICATES, MAX_SECRET_NAME_BYTES,
};
pub use upstream::{
    is_valid_consul_datacenter, is_valid_consul_service, ConsulDiscovery, Discovery, LoadBalancer,
    StaticDiscovery, StaticHost, UpstreamSpec, DEFAULT_CONNECT_TIMEOUT,
};
pub use validate::is_valid_name;
pub use virtual_service::domain_host;
pub use virtual_service::{
    DirectResponse, HeaderAdd, HeaderMatch, HeaderMutations, Method, PathMatch,
    QueryParameterMatch, Redirect, Retries, Route, RouteAction, RouteMatch, RouteOptions,
    SplitBackend, ValueMatch, VirtualServiceSpec, DEFAULT_RETRY_ON, DEFAULT_ROUTE_TIMEOUT,
    MAX_ROUTE_TIMEOUT, RETRY_ON_VALUES,
};

/// A stable content hash (xxh3, 16 hex digits), the same on every machine and process.
pub fn content_hash(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

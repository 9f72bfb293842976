//! Gateways → per-proxy Listener and RouteConfiguration, plus the clusters and
//! endpoints those routes use.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    http_protocol_options::HeadersWithUnderscoresAction, Http2ProtocolOptions, HttpProtocolOptions,
};
use envoy_types::pb::envoy::config::listener::v3::{
    filter, listener_filter, Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
};
use envoy_types::pb::envoy::config::route::v3::{
    redirect_action::{RedirectResponseCode, SchemeRewriteSpecifier},
    route,
    route_match::PathSpecifier,
    RedirectAction, Route, RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{CodecType, PathWithEscapedSlashesAction, RouteSpecifier},
    http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as PbDuration, UInt32Value};
use prost::{Message, Name};
use vmesh_model::limits::MAX_DIRECT_RESPONSE_BODY;
use vmesh_model::{domain_host, Config, GatewaySpec, ObjectKey, VirtualServiceSpec};
use vmesh_xds::resource::{CLUSTER, LISTENER, ROUTE};
use vmesh_xds::{Part, Resource, ResourceRef};

use crate::access_log::access_log;
use crate::routes::VirtualServiceRoutes;
use crate::tls::GatewayTlsResources;
use crate::upstream::{
    socket_address, unavailable_cluster, UpstreamResources, CONNECTION_BUFFER_BYTES,
    UNAVAILABLE_CLUSTER,
};
use crate::{ads_config_source, ProxyOutput, Reports};

/// Name of the Listener of gateway `gateway`.
pub fn listener_name(gateway: &str) -> String {
    format!("gw-{gateway}")
}

/// Name of the RouteConfiguration of gateway `gateway`.
pub fn route_config_name(gateway: &str) -> String {
    format!("gw-{gateway}-routes")
}

/// `RouteConfiguration.virtual_hosts`.
const VIRTUAL_HOSTS_FIELD: u32 = 2;

/// What one gateway produces, the same on each of its proxies.
struct GatewayResources {
    listener: Arc<Resource>,
    route_config: Arc<Resource>,
    /// Config objects behind the route configuration.
    route_origins: BTreeSet<ObjectKey>,
    clusters: BTreeSet<String>,
    /// The SDS secrets the listener refers to.
    secrets: Vec<Arc<Resource>>,
}

pub(crate) fn translate_all(
    config: &Config,
    virtual_services: &BTreeMap<String, VirtualServiceRoutes>,
    upstreams: &BTreeMap<String, UpstreamResources>,
    reports: &mut Reports,
) -> BTreeMap<String, ProxyOutput> {
    let mut proxies: BTreeMap<String, ProxyOutput> = BTreeMap::new();
    // Per proxy, the sockets taken so far, with the gateway that took each.
    let mut sockets: BTreeMap<&str, Vec<(IpAddr, u16, &str)>> = BTreeMap::new();
    let mut served: BTreeSet<&str> = BTreeSet::new();
    // The cluster of unavailable upstreams, made once if any route needs it.
    let mut unavailable: Option<Arc<Resource>> = None;

    for (name, spec) in &config.gateways {
        let key = ObjectKey::gateway(name);
        let bind_ip = spec
            .bind_address
            .parse::<IpAddr>()
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let mut on_proxies = Vec::new();
        for proxy in &spec.proxy_names {
            proxies.entry(proxy.clone()).or_default();
            let taken = sockets.entry(proxy.as_str()).or_default();
            if let Some((_, _, other)) = taken
                .iter()
                .find(|(ip, port, _)| *port == spec.bind_port && overlaps(*ip, bind_ip))
            {
                reports.error(
                    key.clone(),
                    "spec.bindPort",
                    format!(
                        "{}:{} on proxy {proxy:?} is already used by Gateway {other:?}; this gateway is not served on that proxy",
                        spec.bind_address, spec.bind_port
                    ),
                );
                continue;
            }
            taken.push((bind_ip, spec.bind_port, name.as_str()));
            on_proxies.push(proxy);
        }
        if on_proxies.is_empty() {
            continue;
        }
        let Some(resources) =
            translate_gateway(config, name, spec, virtual_services, reports, &mut served)
        else {
            continue;
        };
        for proxy in on_proxies {
            let Some(out) = proxies.get_mut(proxy.as_str()) else {
                continue;
            };
            out.insert(&resources.listener, BTreeSet::from([key.clone()]));
            for secret in &resources.secrets {
                out.insert(secret, BTreeSet::from([key.clone()]));
            }
            out.insert(&resources.route_config, resources.route_origins.clone());
            for cluster in &resources.clusters {
                if let Some(u) = upstreams.get(cluster) {
                    let origin = BTreeSet::from([ObjectKey::upstream(cluster)]);
                    out.insert(&u.cluster, origin.clone());
                    for secret in &u.secrets {
                        out.insert(secret, origin.clone());
                    }
                    out.insert(&u.endpoints, origin);
                } else if cluster == UNAVAILABLE_CLUSTER {
                    out.insert(
                        unavailable.get_or_insert_with(unavailable_cluster),
                        resources.route_origins.clone(),
                    );
                }
            }
        }
    }

    for name in config.virtual_services.keys() {
        if !served.contains(name.as_str()) {
            reports.warn(
                ObjectKey::virtual_service(name),
                "",
                "not served by any gateway",
            );
        }
    }
    proxies
}

/// Whether two listeners on the same port would fight for the socket: the same
/// address, or a wildcard address and any address of the same family.
fn overlaps(a: IpAddr, b: IpAddr) -> bool {
    a == b || (a.is_ipv4() == b.is_ipv4() && (a.is_unspecified() || b.is_unspecified()))
}

fn translate_gateway<'c>(
    config: &'c Config,
    name: &str,
    spec: &GatewaySpec,
    virtual_services: &BTreeMap<String, VirtualServiceRoutes>,
    reports: &mut Reports,
    served: &mut BTreeSet<&'c str>,
) -> Option<GatewayResources> {
    let key = ObjectKey::gateway(name);
    // TLS first: a gateway that cannot serve it serves nothing (the errors say why).
    let tls = match &spec.tls {
        Some(tls) => Some(crate::tls::resolve_gateway(&key, tls, &config.secrets, reports).ok()?),
        None => None,
    };
    // (virtual service, host) of every domain served, for the certificate coverage check.
    let mut served_domains: Vec<(String, String)> = Vec::new();
    let rc_name = route_config_name(name);

    // The virtual services this gateway serves, by name.
    let mut selected: BTreeSet<&str> = BTreeSet::new();
    match &spec.virtual_services {
        None => selected.extend(config.virtual_services.keys().map(String::as_str)),
        Some(names) => {
            for (i, vs) in names.iter().enumerate() {
                if config.virtual_services.contains_key(vs) {
                    selected.insert(vs);
                } else {
                    let reason = reports.unavailable_reason(&ObjectKey::virtual_service(vs));
                    reports.warn(
                        key.clone(),
                        format!("spec.virtualServices[{i}]"),
                        format!("virtual service {vs:?} {reason}"),
                    );
                }
            }
        }
    }

    let mut route_origins = BTreeSet::from([key.clone()]);
    let mut clusters = BTreeSet::new();
    // One part per virtual host, so that a proxy's refusal is narrowed down to a virtual
    // service and the others keep flowing (vmesh_xds::stream).
    let mut virtual_hosts = Vec::new();
    // Domain (lowercase) → the virtual service that has it on this gateway: the one that
    // claimed it first (its Consul key created first; in a directory, defined first), so a
    // newcomer cannot take a host from the virtual service serving it.
    let mut domain_owner: BTreeMap<String, &str> = BTreeMap::new();
    let mut by_claim: Vec<(&String, &VirtualServiceSpec)> = config
        .virtual_services
        .iter()
        .filter(|(name, _)| selected.contains(name.as_str()))
        .collect();
    by_claim.sort_by_key(|(name, _)| {
        config
            .claims
            .get(&ObjectKey::virtual_service(name.as_str()))
            .copied()
            .unwrap_or_default()
    });
    for (vs_name, vs_spec) in by_claim {
        served.insert(vs_name.as_str());
        let vs_key = ObjectKey::virtual_service(vs_name);
        let mut domains = Vec::new();
        for (i, domain) in vs_spec.domains.iter().enumerate() {
            // Requests are matched on the host alone: the route configuration ignores the port.
            let host = domain_host(domain);
            if host != domain {
                reports.warn(
                    vs_key.clone(),
                    format!("spec.domains[{i}]"),
                    format!(
                        "the port of {domain:?} is ignored: requests are matched on the host name, whatever the port"
                    ),
                );
            }
            let lower = host.to_ascii_lowercase();
            if let Some(owner) = domain_owner.get(&lower) {
                if *owner == vs_name.as_str() {
                    // The same host listed again with another port.
                    continue;
                }
                reports.warn(
                    vs_key.clone(),
                    format!("spec.domains[{i}]"),
                    format!(
                        "domain {domain:?} belongs to VirtualService {owner:?}, which claimed it first on Gateway {name:?}; ignored there"
                    ),
                );
            } else {
                domain_owner.insert(lower, vs_name.as_str());
                domains.push(host.to_string());
                served_domains.push((vs_name.clone(), host.to_string()));
            }
        }
        if domains.is_empty() {
            reports.warn(
                vs_key,
                "spec.domains",
                format!("no domain left on Gateway {name:?}; not served there"),
            );
            continue;
        }
        let (routes, refs) = if let Some(redirect) = &spec.https_redirect {
            // Every request of the virtual service's domains goes to HTTPS; nothing upstream.
            (vec![https_redirect_route(redirect.port)], vec![])
        } else {
            let Some(translated) = virtual_services.get(vs_name) else {
                continue;
            };
            clusters.extend(translated.clusters.iter().cloned());
            let refs = translated
                .clusters
                .iter()
                .map(|c| ResourceRef::new(CLUSTER, c.clone()))
                .collect();
            (translated.routes.clone(), refs)
        };
        virtual_hosts.push(Part::element(
            vs_key.to_string(),
            VIRTUAL_HOSTS_FIELD,
            &VirtualHost {
                name: vs_name.clone(),
                domains,
                routes,
                ..Default::default()
            },
            refs,
        ));
        route_origins.insert(vs_key);
    }

    let around = RouteConfiguration {
        name: rc_name.clone(),
        // `Host: shop.example.com:8080` matches the domain `shop.example.com`, as browsers and
        // curl send it to a gateway on a port other than 80. Only for matching: the Host header
        // keeps its port, so a redirect sends the client back to the port it came to.
        ignore_port_in_host_matching: true,
        // Envoy's default is 4 KiB; a direct response may be as long as the model allows.
        max_direct_response_body_size_bytes: Some(UInt32Value {
            value: MAX_DIRECT_RESPONSE_BODY as u32,
        }),
        ..Default::default()
    };
    let mut parts = vec![Part::fields(key.to_string(), &around)];
    // In name order, whatever the claims: the same config gives the same bytes.
    virtual_hosts.sort_by(|a, b| a.key.cmp(&b.key));
    parts.extend(virtual_hosts);

    let mut listener_refs = vec![ResourceRef::new(ROUTE, rc_name.clone())];
    let mut secrets = Vec::new();
    if let Some(tls) = &tls {
        crate::tls::check_coverage(&key, tls, &served_domains, reports);
        reports.certificates(key.clone(), tls.infos.clone());
        listener_refs.extend(crate::tls::refs(tls));
        secrets = tls.secrets.clone();
    }
    Some(GatewayResources {
        listener: Arc::new(Resource::new(
            LISTENER,
            listener_name(name),
            &listener(name, spec, &rc_name, tls.as_ref()),
            listener_refs,
        )),
        route_config: Arc::new(Resource::from_parts::<RouteConfiguration>(
            ROUTE, rc_name, parts,
        )),
        route_origins,
        clusters,
        secrets,
    })
}

/// A route that sends every request to the same URL over HTTPS, on `port`.
fn https_redirect_route(port: u16) -> Route {
    Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(route::Action::Redirect(RedirectAction {
            scheme_rewrite_specifier: Some(SchemeRewriteSpecifier::HttpsRedirect(true)),
            port_redirect: u32::from(port),
            response_code: RedirectResponseCode::MovedPermanently as i32,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn any<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

fn secs(s: i64) -> Option<PbDuration> {
    Some(PbDuration {
        seconds: s,
        nanos: 0,
    })
}

/// The connection manager of an edge: Envoy's "Envoy as an edge proxy" guidance
/// (`docs/configuration.md`, "Hardened defaults", says each value and why).
fn listener(
    name: &str,
    spec: &GatewaySpec,
    rc_name: &str,
    tls: Option<&GatewayTlsResources>,
) -> Listener {
    let router = HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(
            any(&Router::default()),
        )),
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: name.to_string(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads_config_source()),
            route_config_name: rc_name.to_string(),
        })),
        // The client is the TCP peer (or, behind trusted proxies, the address they saw), never
        // what a client writes into X-Forwarded-For.
        use_remote_address: Some(BoolValue { value: true }),
        xff_num_trusted_hops: spec.xff_num_trusted_hops,
        // `/a/../b` is routed (and forwarded) as `/b`, `//a` as `/a`, and `%2F` is redirected
        // to `/`, so a route cannot be bypassed by spelling its path differently.
        normalize_path: Some(BoolValue { value: true }),
        merge_slashes: true,
        path_with_escaped_slashes_action: PathWithEscapedSlashesAction::UnescapeAndRedirect as i32,
        common_http_protocol_options: Some(HttpProtocolOptions {
            idle_timeout: secs(3600),
            headers_with_underscores_action: HeadersWithUnderscoresAction::RejectRequest as i32,
            ..Default::default()
        }),
        request_headers_timeout: secs(10),
        stream_idle_timeout: secs(300),
        request_timeout: secs(300),
        max_request_headers_kb: Some(UInt32Value { value: 60 }),
        http2_protocol_options: Some(Http2ProtocolOptions {
            max_concurrent_streams: Some(UInt32Value { value: 100 }),
            initial_stream_window_size: Some(UInt32Value { value: 64 * 1024 }),
            initial_connection_window_size: Some(UInt32Value { value: 1024 * 1024 }),
            ..Default::default()
        }),
        access_log: spec.access_log.iter().map(access_log).collect(),
        http_filters: vec![router],
        ..Default::default()
    };
    let filters = vec![Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(&hcm))),
    }];
    let mut listener = Listener {
        name: listener_name(name),
        address: Some(socket_address(&spec.bind_address, spec.bind_port)),
        per_connection_buffer_limit_bytes: Some(UInt32Value {
            value: CONNECTION_BUFFER_BYTES,
        }),
        ..Default::default()
    };
    match (tls, &spec.tls) {
        (Some(resolved), Some(tls_spec)) => {
            // One filter chain per certificate, chosen by the name the client asks for (SNI,
            // read by the TLS inspector); the first certificate serves every other client.
            listener.listener_filters = vec![ListenerFilter {
                name: "envoy.filters.listener.tls_inspector".into(),
                config_type: Some(listener_filter::ConfigType::TypedConfig(any(
                    &TlsInspector::default(),
                ))),
                ..Default::default()
            }];
            let client_ca = resolved.client_ca.as_deref();
            for (i, cert) in resolved.certificates.iter().enumerate() {
                if cert.server_names.is_empty() {
                    continue;
                }
                listener.filter_chains.push(FilterChain {
                    name: format!("certificate-{i}"),
                    filter_chain_match: Some(FilterChainMatch {
                        server_names: cert.server_names.clone(),
                        ..Default::default()
                    }),
                    filters: filters.clone(),
                    transport_socket: Some(crate::tls::downstream_socket(
                        tls_spec, cert, client_ca,
                    )),
                    ..Default::default()
                });
            }
            if let Some(first) = resolved.certificates.first() {
                listener.default_filter_chain = Some(FilterChain {
                    name: "default".into(),
                    filters,
                    transport_socket: Some(crate::tls::downstream_socket(
                        tls_spec, first, client_ca,
                    )),
                    ..Default::default()
                });
            }
        }
        _ => {
            listener.filter_chains = vec![FilterChain {
                filters,
                ..Default::default()
            }];
        }
    }
    listener
}

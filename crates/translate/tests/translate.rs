//! The translator, mapping by mapping: each test loads a few documents, translates
//! them and inspects the decoded Envoy resources and the reports.
#![allow(clippy::unwrap_used)]

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source::ConfigSourceSpecifier, data_source,
    header_value_option::HeaderAppendAction, socket_address::PortSpecifier, Address, ApiVersion,
    ConfigSource,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment,
};
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier,
    query_parameter_matcher::QueryParameterMatchSpecifier,
    redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier},
    route::Action,
    route_action::ClusterSpecifier,
    route_match::PathSpecifier,
    Route, RouteConfiguration,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{CodecType, RouteSpecifier},
    http_filter, HttpConnectionManager,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher};
use prost::Message;
use vmesh_model::{Config, ConfigSet, ObjectKey, SourceMode, State};
use vmesh_translate::{translate, Translation, UNAVAILABLE_CLUSTER};
use vmesh_xds::resource::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use vmesh_xds::ResourceRef;

// ---------------------------------------------------------------- helpers

fn config(text: &str) -> Config {
    let mut set = ConfigSet::new();
    set.upsert_source("test.yaml", text, SourceMode::MultiDoc);
    let config = set.snapshot();
    assert!(
        config.source_errors.is_empty(),
        "{:?}",
        config.source_errors
    );
    config
}

fn run(text: &str) -> Translation {
    translate(&config(text))
}

fn decode<M: Message + Default>(t: &Translation, proxy: &str, type_url: &str, name: &str) -> M {
    let resource = t.proxies[proxy]
        .snapshot
        .get(type_url, name)
        .unwrap_or_else(|| panic!("{proxy} has no {type_url} {name}"));
    M::decode(resource.body.value.as_slice()).unwrap()
}

fn names(t: &Translation, proxy: &str, type_url: &str) -> Vec<String> {
    t.proxies[proxy]
        .snapshot
        .of_type(type_url)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn routes(t: &Translation, gateway: &str) -> Vec<Route> {
    let rc: RouteConfiguration = decode(t, "gateway-proxy", ROUTE, &format!("gw-{gateway}-routes"));
    rc.virtual_hosts
        .into_iter()
        .flat_map(|v| v.routes)
        .collect()
}

fn warnings(t: &Translation, key: &ObjectKey) -> Vec<String> {
    t.reports[key]
        .warnings
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn errors(t: &Translation, key: &ObjectKey) -> Vec<String> {
    t.reports[key]
        .errors
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn upstream(name: &str, ip: &str, port: u16) -> String {
    format!("kind: Upstream\nname: {name}\nspec:\n  static:\n    hosts:\n      - address: \"{ip}\"\n        port: {port}\n---\n")
}

const EDGE: &str = "kind: Gateway\nname: edge\nspec:\n  bindPort: 10000\n---\n";

fn vs(name: &str, domains: &str, routes: &str) -> String {
    format!("kind: VirtualService\nname: {name}\nspec:\n  domains: {domains}\n  routes:\n{routes}\n---\n")
}

/// ADS, and no initial fetch timeout: Envoy waits for routes and endpoints rather than
/// serving without them.
fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(Default::default())),
        initial_fetch_timeout: Some(Default::default()),
        ..Default::default()
    }
}

fn string_exact(v: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(MatchPattern::Exact(v.into())),
        ..Default::default()
    }
}

fn string_regex(t: &HeaderMatchSpecifier) -> String {
    match t {
        HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(MatchPattern::SafeRegex(r)),
            ..
        }) => {
            assert!(r.engine_type.is_none());
            r.regex.clone()
        }
        other => panic!("not a regex: {other:?}"),
    }
}

fn route_action(route: &Route) -> &envoy_types::pb::envoy::config::route::v3::RouteAction {
    match &route.action {
        Some(Action::Route(a)) => a,
        other => panic!("not a route action: {other:?}"),
    }
}

fn direct_body(route: &Route) -> (u32, String) {
    match &route.action {
        Some(Action::DirectResponse(d)) => {
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                Some(data_source::Specifier::InlineString(s)) => s.clone(),
                None => String::new(),
                other => panic!("{other:?}"),
            };
            (d.status, body)
        }
        other => panic!("not a direct response: {other:?}"),
    }
}

fn socket(address: &Option<Address>) -> (String, u32) {
    match address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => {
            let Some(PortSpecifier::PortValue(port)) = s.port_specifier else {
                panic!()
            };
            (s.address.clone(), port)
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------- gateways and listeners

#[test]
fn a_gateway_becomes_a_listener_with_rds_over_ads() {
    let t = run(EDGE);
    let listener: Listener = decode(&t, "gateway-proxy", LISTENER, "gw-edge");
    assert_eq!(listener.name, "gw-edge");
    assert_eq!(socket(&listener.address), ("0.0.0.0".into(), 10000));
    assert_eq!(listener.filter_chains.len(), 1);
    let f = &listener.filter_chains[0].filters[0];
    assert_eq!(f.name, "envoy.filters.network.http_connection_manager");
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        panic!()
    };
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    );
    let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
    assert_eq!(hcm.stat_prefix, "edge");
    assert_eq!(hcm.codec_type, CodecType::Auto as i32);
    let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
        panic!()
    };
    assert_eq!(rds.route_config_name, "gw-edge-routes");
    assert_eq!(rds.config_source, Some(ads()));
    assert_eq!(hcm.http_filters.len(), 1);
    assert_eq!(hcm.http_filters[0].name, "envoy.filters.http.router");
    let Some(http_filter::ConfigType::TypedConfig(router)) = &hcm.http_filters[0].config_type
    else {
        panic!()
    };
    assert_eq!(
        router.type_url,
        "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    );

    let resource = t.proxies["gateway-proxy"]
        .snapshot
        .get(LISTENER, "gw-edge")
        .unwrap();
    assert_eq!(
        resource.refs,
        vec![ResourceRef::new(ROUTE, "gw-edge-routes")]
    );
    assert_eq!(
        t.proxies["gateway-proxy"].origins[&(LISTENER, "gw-edge".to_string())],
        [ObjectKey::gateway("edge")].into()
    );
}

#[test]
fn every_proxy_named_by_a_gateway_gets_an_entry() {
    let t = run(
        "kind: Gateway\nname: a\nspec:\n  bindAddress: \"::\"\n  bindPort: 80\n  proxyNames: [p1, p2]\n",
    );
    assert_eq!(t.proxies.keys().collect::<Vec<_>>(), ["p1", "p2"]);
    let listener: Listener = decode(&t, "p2", LISTENER, "gw-a");
    assert_eq!(socket(&listener.address), ("::".into(), 80));
    assert!(translate(&Config::default()).proxies.is_empty());
}

#[test]
fn gateways_on_the_same_socket_the_later_by_name_is_rejected() {
    let t = run(
        "kind: Gateway\nname: a\nspec:\n  bindPort: 80\n---\n\
         kind: Gateway\nname: b\nspec:\n  bindAddress: 127.0.0.1\n  bindPort: 80\n---\n\
         kind: Gateway\nname: c\nspec:\n  bindAddress: 127.0.0.1\n  bindPort: 80\n  proxyNames: [other]\n---\n\
         kind: Gateway\nname: d\nspec:\n  bindAddress: \"::\"\n  bindPort: 80\n",
    );
    assert_eq!(names(&t, "gateway-proxy", LISTENER), ["gw-a", "gw-d"]);
    assert_eq!(names(&t, "other", LISTENER), ["gw-c"]);
    let b = ObjectKey::gateway("b");
    assert_eq!(t.reports[&b].state, State::Rejected);
    assert_eq!(
        errors(&t, &b),
        ["spec.bindPort: 127.0.0.1:80 on proxy \"gateway-proxy\" is already used by Gateway \"a\"; this gateway is not served on that proxy"]
    );
    assert_eq!(t.reports[&ObjectKey::gateway("c")].state, State::Accepted);
    assert_eq!(t.reports[&ObjectKey::gateway("d")].state, State::Accepted);
    assert!(names(&t, "gateway-proxy", ROUTE)
        .iter()
        .all(|n| n != "gw-b-routes"));
}

#[test]
fn a_gateway_naming_a_missing_virtual_service_warns() {
    let t = run(&format!(
        "{}kind: Gateway\nname: edge\nspec:\n  bindPort: 80\n  virtualServices: [ghost, web]\n",
        vs("web", "['*']", "    - directResponse: {status: 200}")
    ));
    let g = ObjectKey::gateway("edge");
    assert_eq!(t.reports[&g].state, State::Warning);
    assert_eq!(
        warnings(&t, &g),
        ["spec.virtualServices[0]: virtual service \"ghost\" does not exist"]
    );
    let rc: RouteConfiguration = decode(&t, "gateway-proxy", ROUTE, "gw-edge-routes");
    assert_eq!(rc.virtual_hosts.len(), 1);
}

#[test]
fn a_virtual_service_served_by_no_gateway_warns() {
    let t = run(&format!(
        "{}{}kind: Gateway\nname: edge\nspec:\n  bindPort: 80\n  virtualServices: [web]\n",
        vs("web", "['a.com']", "    - directResponse: {status: 200}"),
        vs("lonely", "['b.com']", "    - directResponse: {status: 200}"),
    ));
    let lonely = ObjectKey::virtual_service("lonely");
    assert_eq!(t.reports[&lonely].state, State::Warning);
    assert_eq!(warnings(&t, &lonely), ["not served by any gateway"]);
    assert_eq!(
        t.reports[&ObjectKey::virtual_service("web")].state,
        State::Accepted
    );
}

// ---------------------------------------------------------------- route configurations

#[test]
fn virtual_hosts_are_sorted_by_name_and_a_domain_stays_with_its_first_claim() {
    // One file: the document defined first claims first.
    let t = run(&format!(
        "{EDGE}{}{}{}",
        vs(
            "zeta",
            "['z.com', 'a.com']",
            "    - directResponse: {status: 200}"
        ),
        vs(
            "alpha",
            "['a.com', '*']",
            "    - directResponse: {status: 201}"
        ),
        vs("mid", "['A.com']", "    - directResponse: {status: 202}"),
    ));
    let rc: RouteConfiguration = decode(&t, "gateway-proxy", ROUTE, "gw-edge-routes");
    let hosts: Vec<(String, Vec<String>)> = rc
        .virtual_hosts
        .iter()
        .map(|v| (v.name.clone(), v.domains.clone()))
        .collect();
    assert_eq!(
        hosts,
        [
            ("alpha".to_string(), vec!["*".to_string()]),
            (
                "zeta".to_string(),
                vec!["z.com".to_string(), "a.com".to_string()]
            ),
        ]
    );
    assert_eq!(
        warnings(&t, &ObjectKey::virtual_service("alpha")),
        ["spec.domains[0]: domain \"a.com\" belongs to VirtualService \"zeta\", which claimed it first on Gateway \"edge\"; ignored there"]
    );
    let mid = ObjectKey::virtual_service("mid");
    assert_eq!(
        warnings(&t, &mid),
        [
            "spec.domains[0]: domain \"A.com\" belongs to VirtualService \"zeta\", which claimed it first on Gateway \"edge\"; ignored there",
            "spec.domains: no domain left on Gateway \"edge\"; not served there",
        ]
    );
    let origins = &t.proxies["gateway-proxy"].origins[&(ROUTE, "gw-edge-routes".to_string())];
    assert!(origins.contains(&ObjectKey::virtual_service("alpha")));
    assert!(!origins.contains(&mid));
}

/// In Consul, the key created first claims first, whatever the names: a newly added
/// `a-shop` cannot take `shop.example.com` from `shop`.
#[test]
fn in_consul_the_older_key_keeps_a_contested_domain() {
    let served_by = |shop_created: u64, a_shop_created: u64| {
        let mut set = ConfigSet::new();
        set.upsert_keyed(
            "vmesh/config/Gateway/edge",
            &ObjectKey::gateway("edge"),
            EDGE.trim_end_matches("---\n"),
        );
        for (name, created) in [("shop", shop_created), ("a-shop", a_shop_created)] {
            let source = format!("vmesh/config/VirtualService/{name}");
            set.upsert_keyed(
                &source,
                &ObjectKey::virtual_service(name),
                vs(
                    name,
                    "['shop.example.com']",
                    "    - directResponse: {status: 200}",
                )
                .trim_end_matches("---\n"),
            );
            set.set_created(&source, created);
        }
        let t = translate(&set.snapshot());
        let rc: RouteConfiguration = decode(&t, "gateway-proxy", ROUTE, "gw-edge-routes");
        let owner: Vec<String> = rc.virtual_hosts.iter().map(|v| v.name.clone()).collect();
        let loser = if owner == ["shop"] { "a-shop" } else { "shop" };
        (owner, warnings(&t, &ObjectKey::virtual_service(loser)))
    };
    let (owner, warned) = served_by(5, 9);
    assert_eq!(owner, ["shop"]);
    assert_eq!(
        warned,
        ["spec.domains[0]: domain \"shop.example.com\" belongs to VirtualService \"shop\", which claimed it first on Gateway \"edge\"; ignored there", "spec.domains: no domain left on Gateway \"edge\"; not served there"]
    );
    let (owner, _) = served_by(9, 5);
    assert_eq!(owner, ["a-shop"]);
}

#[test]
fn route_configuration_refers_to_the_clusters_it_uses() {
    let t = run(&format!(
        "{EDGE}{}{}{}{}",
        upstream("a", "10.0.0.1", 80),
        upstream("b", "10.0.0.2", 80),
        upstream("unused", "10.0.0.3", 80),
        vs(
            "web",
            "['*']",
            "    - match: {prefix: /b}\n      split: [{upstream: b, weight: 1}, {upstream: a, weight: 1}]\n    - upstream: a"
        ),
    ));
    let rc = t.proxies["gateway-proxy"]
        .snapshot
        .get(ROUTE, "gw-edge-routes")
        .unwrap();
    assert_eq!(
        rc.refs,
        vec![
            ResourceRef::new(CLUSTER, "a"),
            ResourceRef::new(CLUSTER, "b")
        ]
    );
    // Per-proxy scoping: the unused upstream is not sent.
    assert_eq!(names(&t, "gateway-proxy", CLUSTER), ["a", "b"]);
    assert_eq!(names(&t, "gateway-proxy", ENDPOINT), ["a", "b"]);
}

// ---------------------------------------------------------------- routes

fn one_route(route_yaml: &str) -> (Translation, Route) {
    let t = run(&format!(
        "{EDGE}{}{}{}",
        upstream("web", "10.0.0.1", 80),
        upstream("web-v2", "10.0.0.2", 80),
        vs("shop", "['*']", route_yaml)
    ));
    let r = routes(&t, "edge").remove(0);
    (t, r)
}

#[test]
fn a_route_without_match_matches_every_path() {
    let (_, r) = one_route("    - upstream: web");
    let m = r.r#match.clone().unwrap();
    assert_eq!(m.path_specifier, Some(PathSpecifier::Prefix("/".into())));
    assert_eq!(m.case_sensitive, None);
    assert!(m.headers.is_empty() && m.query_parameters.is_empty());
    assert_eq!(r.name, "shop/0");
    assert_eq!(
        route_action(&r).cluster_specifier,
        Some(ClusterSpecifier::Cluster("web".into()))
    );
}

#[test]
fn path_matches() {
    let (_, r) = one_route("    - match: {exact: /a}\n      upstream: web");
    assert_eq!(
        r.r#match.unwrap().path_specifier,
        Some(PathSpecifier::Path("/a".into()))
    );
    let (_, r) = one_route("    - match: {prefix: /A, caseSensitive: false}\n      upstream: web");
    let m = r.r#match.unwrap();
    assert_eq!(m.path_specifier, Some(PathSpecifier::Prefix("/A".into())));
    assert_eq!(m.case_sensitive.map(|b| b.value), Some(false));
    let (_, r) = one_route("    - match: {regex: '/a/[0-9]+'}\n      upstream: web");
    let Some(PathSpecifier::SafeRegex(re)) = r.r#match.unwrap().path_specifier else {
        panic!()
    };
    assert_eq!(re.regex, "/a/[0-9]+");
    assert!(
        re.engine_type.is_none(),
        "RE2 is Envoy's default; the google_re2 field is deprecated"
    );
}

#[test]
fn header_and_query_matches() {
    let (_, r) = one_route(
        "    - match:\n        headers:\n          - {name: x-a, value: '1'}\n          - {name: x-b, regex: '[0-9]+', invert: true}\n          - {name: x-c, present: true}\n        queryParameters:\n          - {name: q, value: v}\n          - {name: r, regex: 'a|b'}\n          - {name: s, present: true}\n      upstream: web",
    );
    let m = r.r#match.unwrap();
    assert_eq!(m.headers.len(), 3);
    assert_eq!(m.headers[0].name, "x-a");
    assert_eq!(
        m.headers[0].header_match_specifier,
        Some(HeaderMatchSpecifier::StringMatch(string_exact("1")))
    );
    assert!(!m.headers[0].invert_match);
    assert_eq!(
        string_regex(m.headers[1].header_match_specifier.as_ref().unwrap()),
        "[0-9]+"
    );
    assert!(m.headers[1].invert_match);
    assert_eq!(
        m.headers[2].header_match_specifier,
        Some(HeaderMatchSpecifier::PresentMatch(true))
    );

    assert_eq!(m.query_parameters[0].name, "q");
    assert_eq!(
        m.query_parameters[0].query_parameter_match_specifier,
        Some(QueryParameterMatchSpecifier::StringMatch(string_exact("v")))
    );
    let Some(QueryParameterMatchSpecifier::StringMatch(StringMatcher {
        match_pattern: Some(MatchPattern::SafeRegex(re)),
        ..
    })) = &m.query_parameters[1].query_parameter_match_specifier
    else {
        panic!()
    };
    assert_eq!(re.regex, "a|b");
    assert_eq!(
        m.query_parameters[2].query_parameter_match_specifier,
        Some(QueryParameterMatchSpecifier::PresentMatch(true))
    );
}

#[test]
fn methods_become_a_method_header_match() {
    let (_, r) = one_route("    - match: {methods: [GET]}\n      upstream: web");
    let h = &r.r#match.unwrap().headers[0];
    assert_eq!(h.name, ":method");
    assert_eq!(
        h.header_match_specifier,
        Some(HeaderMatchSpecifier::StringMatch(string_exact("GET")))
    );
    let (_, r) = one_route("    - match: {methods: [GET, POST]}\n      upstream: web");
    let h = &r.r#match.unwrap().headers[0];
    assert_eq!(h.name, ":method");
    assert_eq!(
        string_regex(h.header_match_specifier.as_ref().unwrap()),
        "GET|POST"
    );
}

#[test]
fn split_becomes_weighted_clusters() {
    let (_, r) =
        one_route("    - split: [{upstream: web, weight: 90}, {upstream: web-v2, weight: 10}]");
    let Some(ClusterSpecifier::WeightedClusters(w)) = &route_action(&r).cluster_specifier else {
        panic!()
    };
    let got: Vec<(String, u32)> = w
        .clusters
        .iter()
        .map(|c| (c.name.clone(), c.weight.as_ref().unwrap().value))
        .collect();
    assert_eq!(got, [("web".to_string(), 90), ("web-v2".to_string(), 10)]);
    #[allow(deprecated)]
    let total = &w.total_weight;
    assert!(
        total.is_none(),
        "total_weight is deprecated; Envoy sums the weights"
    );
}

#[test]
fn redirects() {
    let (_, r) = one_route(
        "    - redirect: {hostRedirect: a.com, pathRedirect: /x, httpsRedirect: true, stripQuery: true, responseCode: 308}",
    );
    let Some(Action::Redirect(red)) = r.action else {
        panic!()
    };
    assert_eq!(red.host_redirect, "a.com");
    assert_eq!(
        red.path_rewrite_specifier,
        Some(PathRewriteSpecifier::PathRedirect("/x".into()))
    );
    assert_eq!(
        red.scheme_rewrite_specifier,
        Some(SchemeRewriteSpecifier::HttpsRedirect(true))
    );
    assert!(red.strip_query);
    assert_eq!(
        red.response_code,
        RedirectResponseCode::PermanentRedirect as i32
    );

    for (code, expected) in [
        (301, RedirectResponseCode::MovedPermanently),
        (302, RedirectResponseCode::Found),
        (303, RedirectResponseCode::SeeOther),
        (307, RedirectResponseCode::TemporaryRedirect),
    ] {
        let (_, r) = one_route(&format!(
            "    - redirect: {{prefixRewrite: /new/, responseCode: {code}}}"
        ));
        let Some(Action::Redirect(red)) = r.action else {
            panic!()
        };
        assert_eq!(red.response_code, expected as i32);
        assert_eq!(
            red.path_rewrite_specifier,
            Some(PathRewriteSpecifier::PrefixRewrite("/new/".into()))
        );
        assert_eq!(red.scheme_rewrite_specifier, None);
    }
}

#[test]
fn direct_responses() {
    let (_, r) = one_route("    - directResponse: {status: 418, body: teapot}");
    assert_eq!(direct_body(&r), (418, "teapot".into()));
    let (_, r) = one_route("    - directResponse: {status: 204}");
    let Some(Action::DirectResponse(d)) = &r.action else {
        panic!()
    };
    assert_eq!((d.status, d.body.is_none()), (204, true));
}

#[test]
fn options_become_route_action_fields_and_header_mutations() {
    let (_, r) = one_route(
        "    - match: {prefix: /api/}\n      upstream: web\n      options:\n        timeout: 1m30s\n        retries: {attempts: 3, perTryTimeout: 250ms, retryOn: '5xx, reset'}\n        prefixRewrite: /\n        requestHeaders:\n          add: [{name: x-a, value: '1'}, {name: x-b, value: '2', append: true}]\n          remove: [x-c]\n        responseHeaders:\n          add: [{name: x-d, value: '4'}]\n          remove: [server]",
    );
    let a = route_action(&r);
    assert_eq!(
        a.timeout.as_ref().map(|d| (d.seconds, d.nanos)),
        Some((90, 0))
    );
    let retry = a.retry_policy.as_ref().unwrap();
    assert_eq!(retry.retry_on, "5xx,reset");
    assert_eq!(retry.num_retries.as_ref().unwrap().value, 3);
    assert_eq!(
        retry.per_try_timeout.as_ref().map(|d| (d.seconds, d.nanos)),
        Some((0, 250_000_000))
    );
    assert_eq!(a.prefix_rewrite, "/");

    let added: Vec<(String, String, i32)> = r
        .request_headers_to_add
        .iter()
        .map(|h| {
            let hv = h.header.as_ref().unwrap();
            (hv.key.clone(), hv.value.clone(), h.append_action)
        })
        .collect();
    assert_eq!(
        added,
        [
            (
                "x-a".into(),
                "1".into(),
                HeaderAppendAction::OverwriteIfExistsOrAdd as i32
            ),
            (
                "x-b".into(),
                "2".into(),
                HeaderAppendAction::AppendIfExistsOrAdd as i32
            ),
        ]
    );
    #[allow(deprecated)]
    let uses_deprecated_append = r.request_headers_to_add.iter().any(|h| h.append.is_some());
    assert!(
        !uses_deprecated_append,
        "append is deprecated; append_action replaces it"
    );
    assert_eq!(r.request_headers_to_remove, ["x-c"]);
    assert_eq!(
        r.response_headers_to_add[0].header.as_ref().unwrap().key,
        "x-d"
    );
    assert_eq!(r.response_headers_to_remove, ["server"]);
}

#[test]
fn a_zero_timeout_disables_the_timeout() {
    let (_, r) = one_route("    - upstream: web\n      options: {timeout: 0s}");
    assert_eq!(
        route_action(&r)
            .timeout
            .as_ref()
            .map(|d| (d.seconds, d.nanos)),
        Some((0, 0))
    );
    let (_, r) = one_route("    - upstream: web");
    assert_eq!(route_action(&r).timeout, None);
    assert_eq!(route_action(&r).retry_policy, None);
}

#[test]
fn a_missing_upstream_becomes_a_503_and_a_warning() {
    let (t, _) = one_route(
        "    - directResponse: {status: 200}\n    - upstream: ghost\n      options: {timeout: 1s}",
    );
    let r = routes(&t, "edge").remove(1);
    // Its traffic goes to the cluster without endpoints: Envoy answers 503 "no healthy
    // upstream", naming nothing internal.
    assert_eq!(
        route_action(&r).cluster_specifier,
        Some(ClusterSpecifier::Cluster(UNAVAILABLE_CLUSTER.into()))
    );
    let shop = ObjectKey::virtual_service("shop");
    assert_eq!(t.reports[&shop].state, State::Warning);
    assert_eq!(
        warnings(&t, &shop),
        ["spec.routes[1].upstream: upstream \"ghost\" does not exist; its traffic is answered 503"]
    );
    let rc = t.proxies["gateway-proxy"]
        .snapshot
        .get(ROUTE, "gw-edge-routes")
        .unwrap();
    assert_eq!(
        rc.refs.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        [UNAVAILABLE_CLUSTER],
        "the route waits for the unavailable cluster"
    );
    assert_eq!(names(&t, "gateway-proxy", CLUSTER), [UNAVAILABLE_CLUSTER]);
}

#[test]
fn a_split_keeps_its_proportions_when_a_backend_is_missing() {
    // A 95/5 canary whose stable upstream is gone: 95 % is answered 503, never sent to the
    // canary.
    let (t, r) =
        one_route("    - split: [{upstream: ghost, weight: 95}, {upstream: web, weight: 5}]");
    let Some(ClusterSpecifier::WeightedClusters(w)) = &route_action(&r).cluster_specifier else {
        panic!()
    };
    let weights: Vec<(&str, u32)> = w
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c.weight.as_ref().unwrap().value))
        .collect();
    assert_eq!(weights, [(UNAVAILABLE_CLUSTER, 95), ("web", 5)]);
    assert_eq!(
        warnings(&t, &ObjectKey::virtual_service("shop")),
        ["spec.routes[0].split[0].upstream: upstream \"ghost\" does not exist; its share (95 of 100) is answered 503"]
    );

    // The only backend with weight is the missing one: the weights still add up to 100.
    let (t, r) =
        one_route("    - split: [{upstream: web, weight: 0}, {upstream: ghost, weight: 100}]");
    let Some(ClusterSpecifier::WeightedClusters(w)) = &route_action(&r).cluster_specifier else {
        panic!()
    };
    let total: u32 = w
        .clusters
        .iter()
        .map(|c| c.weight.as_ref().unwrap().value)
        .sum();
    assert_eq!(total, 100);
    assert_eq!(warnings(&t, &ObjectKey::virtual_service("shop")).len(), 1);
    assert_eq!(
        names(&t, "gateway-proxy", CLUSTER),
        [UNAVAILABLE_CLUSTER, "web"]
    );
}

#[test]
fn a_rejected_upstream_without_a_last_good_version_is_unavailable() {
    let t = run(&format!(
        "{EDGE}kind: Upstream\nname: broken\nspec:\n  static:\n    hosts: []\n---\n{}",
        vs("shop", "['*']", "    - upstream: broken")
    ));
    assert_eq!(
        warnings(&t, &ObjectKey::virtual_service("shop")),
        ["spec.routes[0].upstream: upstream \"broken\" is rejected and has no accepted version; its traffic is answered 503"]
    );
    assert_eq!(
        t.reports[&ObjectKey::upstream("broken")].state,
        State::Rejected
    );
}

#[test]
fn a_rejected_upstream_serving_its_last_good_version_is_still_used() {
    let mut set = ConfigSet::new();
    set.upsert_source(
        "a.yaml",
        &format!("{EDGE}{}", vs("shop", "['*']", "    - upstream: web")),
        SourceMode::MultiDoc,
    );
    set.upsert_source(
        "web.yaml",
        &upstream("web", "10.0.0.1", 80),
        SourceMode::MultiDoc,
    );
    set.upsert_source(
        "web.yaml",
        &upstream("web", "not-an-ip", 80),
        SourceMode::MultiDoc,
    );
    let t = translate(&set.snapshot());
    let web = ObjectKey::upstream("web");
    assert_eq!(t.reports[&web].state, State::Rejected);
    assert!(t.reports[&web].serving_last_good);
    assert_eq!(names(&t, "gateway-proxy", CLUSTER), ["web"]);
    assert!(warnings(&t, &ObjectKey::virtual_service("shop")).is_empty());
}

// ---------------------------------------------------------------- upstreams

#[test]
fn an_upstream_becomes_an_eds_cluster_and_its_endpoints() {
    let t = run(&format!(
        "{EDGE}kind: Upstream\nname: web\nspec:\n  static:\n    hosts:\n      - {{address: 10.0.0.1, port: 80, weight: 3}}\n      - {{address: '2001:db8::1', port: 8080}}\n  connectTimeout: 250ms\n  loadBalancer: leastRequest\n---\n{}",
        vs("shop", "['*']", "    - upstream: web")
    ));
    let c: Cluster = decode(&t, "gateway-proxy", CLUSTER, "web");
    assert_eq!(c.name, "web");
    assert_eq!(
        c.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32
        ))
    );
    assert_eq!(c.eds_cluster_config.unwrap().eds_config, Some(ads()));
    assert_eq!(
        c.connect_timeout.map(|d| (d.seconds, d.nanos)),
        Some((0, 250_000_000))
    );
    assert_eq!(c.lb_policy, cluster::LbPolicy::LeastRequest as i32);
    let resource = t.proxies["gateway-proxy"]
        .snapshot
        .get(CLUSTER, "web")
        .unwrap();
    assert_eq!(resource.refs, vec![ResourceRef::new(ENDPOINT, "web")]);
    assert_eq!(
        t.proxies["gateway-proxy"].origins[&(ENDPOINT, "web".to_string())],
        [ObjectKey::upstream("web")].into()
    );

    let cla: ClusterLoadAssignment = decode(&t, "gateway-proxy", ENDPOINT, "web");
    assert_eq!(cla.cluster_name, "web");
    assert_eq!(cla.endpoints.len(), 1);
    let hosts: Vec<((String, u32), u32)> = cla.endpoints[0]
        .lb_endpoints
        .iter()
        .map(|e| {
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!()
            };
            (
                socket(&ep.address),
                e.load_balancing_weight.as_ref().unwrap().value,
            )
        })
        .collect();
    assert_eq!(
        hosts,
        [
            (("10.0.0.1".into(), 80), 3),
            (("2001:db8::1".into(), 8080), 1)
        ]
    );
}

#[test]
fn load_balancer_policies_and_default_connect_timeout() {
    for (lb, policy) in [
        ("roundRobin", cluster::LbPolicy::RoundRobin),
        ("random", cluster::LbPolicy::Random),
    ] {
        let t = run(&format!(
            "{EDGE}kind: Upstream\nname: web\nspec:\n  static: {{hosts: [{{address: 10.0.0.1, port: 80}}]}}\n  loadBalancer: {lb}\n---\n{}",
            vs("shop", "['*']", "    - upstream: web")
        ));
        let c: Cluster = decode(&t, "gateway-proxy", CLUSTER, "web");
        assert_eq!(c.lb_policy, policy as i32);
        assert_eq!(
            c.connect_timeout.map(|d| (d.seconds, d.nanos)),
            Some((5, 0))
        );
    }
}

#[test]
fn each_proxy_gets_only_the_clusters_its_routes_use() {
    let t = run(&format!(
        "{}{}{}{}\
         kind: Gateway\nname: a\nspec:\n  bindPort: 80\n  proxyNames: [pa]\n  virtualServices: [va]\n---\n\
         kind: Gateway\nname: b\nspec:\n  bindPort: 80\n  proxyNames: [pb]\n  virtualServices: [vb]\n",
        upstream("ua", "10.0.0.1", 80),
        upstream("ub", "10.0.0.2", 80),
        vs("va", "['a.com']", "    - upstream: ua"),
        vs("vb", "['b.com']", "    - upstream: ub"),
    ));
    assert_eq!(names(&t, "pa", CLUSTER), ["ua"]);
    assert_eq!(names(&t, "pb", CLUSTER), ["ub"]);
    assert_eq!(names(&t, "pa", LISTENER), ["gw-a"]);
    assert_eq!(names(&t, "pb", ROUTE), ["gw-b-routes"]);
}

// ---------------------------------------------------------------- reports and versions

#[test]
fn parse_level_reports_are_kept_and_rejected_stays_rejected() {
    let mut set = ConfigSet::new();
    set.upsert_source(
        "a.yaml",
        &format!("{EDGE}{}", vs("shop", "['*']", "    - upstream: ghost")),
        SourceMode::MultiDoc,
    );
    set.upsert_source(
        "a.yaml",
        &format!(
            "{EDGE}{}",
            vs("shop", "['*']", "    - upstream: ghost\n      bogus: 1")
        ),
        SourceMode::MultiDoc,
    );
    let t = translate(&set.snapshot());
    let shop = ObjectKey::virtual_service("shop");
    assert_eq!(t.reports[&shop].state, State::Rejected);
    assert!(t.reports[&shop].serving_last_good);
    assert_eq!(t.reports[&shop].errors.len(), 1);
    assert_eq!(
        warnings(&t, &shop),
        ["spec.routes[0].upstream: upstream \"ghost\" does not exist; its traffic is answered 503"]
    );
}

#[test]
fn versions_are_content_hashes() {
    let text = format!(
        "{EDGE}{}{}",
        upstream("web", "10.0.0.1", 80),
        vs("shop", "['*']", "    - upstream: web")
    );
    let a = run(&text);
    let b = run(&text);
    assert_eq!(a, b);
    let ra = a.proxies["gateway-proxy"]
        .snapshot
        .get(CLUSTER, "web")
        .unwrap();
    assert_eq!(
        ra.version,
        vmesh_xds::resource::content_version(&ra.body.value)
    );
    let c = run(&text.replace("10.0.0.1", "10.0.0.9"));
    let v = |t: &Translation, ty: &str, n: &str| {
        t.proxies["gateway-proxy"]
            .snapshot
            .get(ty, n)
            .unwrap()
            .version
            .clone()
    };
    assert_eq!(v(&a, CLUSTER, "web"), v(&c, CLUSTER, "web"));
    assert_ne!(v(&a, ENDPOINT, "web"), v(&c, ENDPOINT, "web"));
    assert_eq!(v(&a, LISTENER, "gw-edge"), v(&c, LISTENER, "gw-edge"));
}

//! Parsing and validation of single documents: every field, every rule, with the
//! exact field path of each problem.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;
use vmesh_model::{
    parse_multi, parse_single, Discovery, Duration, Kind, LoadBalancer, Method, Object, ObjectKey,
    Parsed, PathMatch, RouteAction, ValueMatch, DEFAULT_RETRY_ON,
};

fn vs_route(route: serde_json::Value) -> serde_json::Value {
    set(virtual_service(), "/spec/routes/0", route)
}

fn single(text: &str) -> Parsed {
    parse_single(text).unwrap()
}

// ---------------------------------------------------------------- envelope

#[test]
fn yaml_documents_of_each_kind_parse() {
    let parsed = parse_multi(
        "kind: Upstream\nname: web\nspec:\n  static:\n    hosts:\n      - address: 10.0.0.1\n        port: 80\n\
         ---\nkind: VirtualService\nname: shop\nspec:\n  domains: ['*']\n  routes:\n    - upstream: web\n\
         ---\nkind: Gateway\nname: edge\nspec:\n  bindPort: 8080\n",
    )
    .unwrap();
    let keys: Vec<ObjectKey> = parsed
        .iter()
        .map(|p| match p {
            Parsed::Document(d) => {
                assert!(d.result.is_ok(), "{d:?}");
                d.key.clone()
            }
            Parsed::Invalid(ps) => panic!("{ps:?}"),
        })
        .collect();
    assert_eq!(
        keys,
        vec![
            ObjectKey::upstream("web"),
            ObjectKey::virtual_service("shop"),
            ObjectKey::gateway("edge")
        ]
    );
}

#[test]
fn json_documents_parse() {
    let Parsed::Document(doc) = single(
        r#"{"kind": "Gateway", "name": "edge", "spec": {"bindPort": 8080, "proxyNames": ["a"]}}"#,
    ) else {
        panic!("not a document")
    };
    let Ok(Object::Gateway(g)) = doc.result else {
        panic!("{:?}", doc.result)
    };
    assert_eq!(g.bind_port, 8080);
    assert_eq!(g.proxy_names, vec!["a"]);
}

#[test]
fn json_and_yaml_of_the_same_document_have_the_same_version() {
    let Parsed::Document(a) =
        single(r#"{"name": "edge", "kind": "Gateway", "spec": {"bindPort": 1}}"#)
    else {
        panic!()
    };
    let Parsed::Document(b) = single("kind: Gateway\nname: edge\nspec:\n  bindPort: 1\n") else {
        panic!()
    };
    assert_eq!(a.version, b.version);
    assert_eq!(a.version.len(), 16);
}

#[test]
fn json_syntax_errors_have_a_position() {
    let err = parse_single("{\"kind\": \"Upstream\",\n \"name\": }").unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid JSON: expected value at line 2 column 10"
    );
}

#[test]
fn yaml_syntax_errors_have_a_position() {
    let err = parse_multi("kind: Upstream\nname: a\n  spec: 1\n").unwrap_err();
    assert!(err.message.starts_with("invalid YAML: "), "{err}");
    assert!(err.message.contains("line 3 column 7"), "{err}");
    assert_eq!(err.path, "");
}

#[test]
fn multi_document_files_skip_empty_documents() {
    let text = "---\n# nothing here\n---\nkind: Gateway\nname: a\nspec: {bindPort: 1}\n---\n---\nkind: Gateway\nname: b\nspec: {bindPort: 2}\n";
    assert_eq!(parse_multi(text).unwrap().len(), 2);
}

/// A file and a Consul value with no document say so in the same words.
#[test]
fn a_text_without_any_document_is_empty_for_every_source() {
    for empty in ["", "\n\n", "# only a comment\n", "---\n---\n"] {
        assert_eq!(
            parse_multi(empty).unwrap_err().message,
            vmesh_model::limits::EMPTY_TEXT,
            "{empty:?}"
        );
        assert_eq!(
            parse_single(empty).unwrap_err().message,
            vmesh_model::limits::EMPTY_TEXT,
            "{empty:?}"
        );
    }
}

#[test]
fn a_single_document_source_needs_exactly_one_document() {
    let two = "kind: Gateway\nname: a\nspec: {bindPort: 1}\n---\nkind: Gateway\nname: b\nspec: {bindPort: 2}\n";
    assert_eq!(
        parse_single(two).unwrap_err().to_string(),
        "expected exactly one document, found 2"
    );
}

#[test]
fn unknown_kind_is_an_error_on_kind() {
    let doc = set(upstream(), "/kind", json!("Service"));
    assert_problem(doc, "kind", "unknown kind \"Service\"");
    assert_problem(
        remove(upstream(), "/kind"),
        "kind",
        "required field is missing",
    );
    assert_problem(
        set(upstream(), "/kind", json!(3)),
        "kind",
        "must be a string",
    );
}

#[test]
fn missing_or_invalid_name_is_an_error_on_name() {
    assert_problem(
        remove(upstream(), "/name"),
        "name",
        "required field is missing",
    );
    for bad in ["Web", "web_1", "-web", "web-", "", "a.b"] {
        assert_problem(set(upstream(), "/name", json!(bad)), "name", "invalid name");
    }
    assert_problem(
        set(upstream(), "/name", json!("a".repeat(64))),
        "name",
        "invalid name",
    );
    assert_valid(set(upstream(), "/name", json!("a".repeat(63))));
    assert_problem(
        set(upstream(), "/name", json!(7)),
        "name",
        "must be a string",
    );
}

#[test]
fn a_bad_spec_is_still_reported_on_its_key() {
    let Parsed::Document(doc) = parse_value_of(set(upstream(), "/spec", json!({"bogus": 1})))
    else {
        panic!()
    };
    assert_eq!(doc.key, ObjectKey::upstream("web"));
    assert!(doc.result.is_err());
}

fn parse_value_of(v: serde_json::Value) -> Parsed {
    vmesh_model::parse_value(v)
}

#[test]
fn the_envelope_is_strict() {
    assert_problem(
        set(upstream(), "/metadata", json!({})),
        "metadata",
        "unknown field",
    );
    assert_problem(
        remove(upstream(), "/spec"),
        "spec",
        "required field is missing",
    );
    assert_eq!(
        problems(json!(["kind", "Upstream"])),
        vec!["a document must be a mapping with kind, name and spec"]
    );
}

#[test]
fn unknown_fields_are_rejected_with_their_path() {
    assert_problem(
        set(virtual_service(), "/spec/routes/0/prefx", json!("/")),
        "spec.routes[0].prefx",
        "unknown field `prefx`",
    );
    assert_problem(
        set(upstream(), "/spec/static/hosts/0/zone", json!("a")),
        "spec.static.hosts[0].zone",
        "unknown field `zone`",
    );
    assert_problem(
        set(
            gateway(),
            "/spec/tls",
            json!({"certificates": [], "ciphers": []}),
        ),
        "spec.tls.ciphers",
        "unknown field `ciphers`",
    );
}

#[test]
fn wrong_types_are_rejected_with_their_path() {
    assert_problem(
        set(gateway(), "/spec/bindPort", json!("80")),
        "spec.bindPort",
        "invalid type: string \"80\", expected u16",
    );
    assert_problem(
        set(
            virtual_service(),
            "/spec/domains",
            json!("shop.example.com"),
        ),
        "spec.domains",
        "invalid type",
    );
}

#[test]
fn all_semantic_errors_of_an_object_are_reported() {
    let doc = json!({
        "kind": "VirtualService", "name": "shop",
        "spec": {
            "domains": ["bad domain", "a.com", "A.com"],
            "routes": [
                {"match": {"prefix": "nope"}, "upstream": "web"},
                {"upstream": "web", "directResponse": {"status": 200}},
            ]
        }
    });
    assert_eq!(
        problems(doc),
        vec![
            "spec.domains[0]: invalid domain \"bad domain\": use a host name (optionally with :port), \"*\", \"*.suffix\" or \"prefix*\"",
            "spec.domains[2]: duplicate domain \"A.com\"",
            "spec.routes[0].match.prefix: \"nope\" must start with '/'",
            "spec.routes[1]: set only one action of upstream, split, redirect, directResponse",
        ]
    );
}

#[test]
fn specs_round_trip_through_json() {
    for text in [
        include_str!("../../../examples/reference/everything.yaml"),
        include_str!("../../../examples/demo/web.yaml"),
    ] {
        for parsed in parse_multi(text).unwrap() {
            let Parsed::Document(doc) = parsed else {
                panic!()
            };
            let object = doc.result.unwrap();
            let again = Object::from_spec(doc.key.kind, object.spec_json()).unwrap();
            assert_eq!(again, object);
        }
    }
}

// ---------------------------------------------------------------- Upstream

#[test]
fn upstream_defaults() {
    let Object::Upstream(u) = object(upstream()) else {
        panic!()
    };
    assert_eq!(u.connect_timeout, Duration::from_secs(5));
    assert_eq!(u.load_balancer, LoadBalancer::RoundRobin);
    let Some(Discovery::Static(s)) = u.discovery() else {
        panic!()
    };
    assert_eq!(s.hosts[0].weight, 1);
    assert_eq!(s.hosts[0].port, 8080);
}

#[test]
fn upstream_needs_exactly_one_discovery_form() {
    assert_problem(
        remove(upstream(), "/spec/static"),
        "spec",
        "exactly one discovery form must be set: static or consul",
    );
    assert_problem(
        set(upstream(), "/spec/consul", json!({"service": "web"})),
        "spec",
        "exactly one discovery form must be set: static or consul",
    );
}

fn consul_upstream(consul: serde_json::Value) -> serde_json::Value {
    set(remove(upstream(), "/spec/static"), "/spec/consul", consul)
}

#[test]
fn upstream_consul_defaults() {
    let Object::Upstream(u) = object(consul_upstream(json!({"service": "web"}))) else {
        panic!()
    };
    let Some(Discovery::Consul(c)) = u.discovery() else {
        panic!()
    };
    assert_eq!(c.service, "web");
    assert!(c.tags.is_empty());
    assert_eq!(c.datacenters, None);
    assert!(!c.include_warning);
    assert_eq!(u.static_hosts, None);
}

#[test]
fn upstream_consul_every_field() {
    let Object::Upstream(u) = object(consul_upstream(json!({
        "service": "Orders_v2.api",
        "tags": ["v2", "http", "zone=a"],
        "datacenters": ["dc1", "eu_west-2"],
        "includeWarning": true
    }))) else {
        panic!()
    };
    let c = u.consul.unwrap();
    assert_eq!(c.tags, ["v2", "http", "zone=a"]);
    assert_eq!(
        c.datacenters.as_deref(),
        Some(&["dc1".to_string(), "eu_west-2".to_string()][..])
    );
    assert!(c.include_warning);
}

#[test]
fn upstream_consul_service() {
    assert_problem(
        consul_upstream(json!({})),
        "spec.consul",
        "missing field `service`",
    );
    for bad in ["", "a b", "web/v1", "wéb", "a:b", &"a".repeat(256)] {
        assert_problem(
            consul_upstream(json!({"service": bad})),
            "spec.consul.service",
            "invalid Consul service name",
        );
    }
    assert_valid(consul_upstream(json!({"service": "a".repeat(255)})));
    assert_problem(
        consul_upstream(json!({"service": "web", "passingOnly": true})),
        "spec.consul.passingOnly",
        "unknown field `passingOnly`",
    );
}

#[test]
fn upstream_consul_tags() {
    assert_valid(consul_upstream(json!({"service": "web", "tags": []})));
    assert_problem(
        consul_upstream(json!({"service": "web", "tags": ["v1", ""]})),
        "spec.consul.tags[1]",
        "tag must not be empty",
    );
    assert_problem(
        consul_upstream(json!({"service": "web", "tags": ["a\nb"]})),
        "spec.consul.tags[0]",
        "must not contain control characters",
    );
    assert_problem(
        consul_upstream(json!({"service": "web", "tags": ["v1", "v2", "v1"]})),
        "spec.consul.tags[2]",
        "duplicate tag \"v1\"",
    );
}

#[test]
fn upstream_consul_datacenters() {
    assert_problem(
        consul_upstream(json!({"service": "web", "datacenters": []})),
        "spec.consul.datacenters",
        "must list at least one datacenter",
    );
    for bad in ["DC1", "", "dc 1", "dc.1"] {
        assert_problem(
            consul_upstream(json!({"service": "web", "datacenters": ["dc1", bad]})),
            "spec.consul.datacenters[1]",
            "invalid datacenter",
        );
    }
    assert_problem(
        consul_upstream(json!({"service": "web", "datacenters": ["dc1", "dc2", "dc1"]})),
        "spec.consul.datacenters[2]",
        "duplicate datacenter \"dc1\"",
    );
    assert_problem(
        consul_upstream(json!({"service": "web", "includeWarning": "yes"})),
        "spec.consul.includeWarning",
        "invalid type",
    );
}

#[test]
fn upstream_consul_reports_every_problem() {
    let found = problems(consul_upstream(json!({
        "service": "a b",
        "tags": [""],
        "datacenters": ["X"]
    })));
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(found[0].starts_with("spec.consul.service: "));
    assert!(found[1].starts_with("spec.consul.tags[0]: "));
    assert!(found[2].starts_with("spec.consul.datacenters[0]: "));
}

#[test]
fn upstream_hosts() {
    assert_problem(
        set(upstream(), "/spec/static/hosts", json!([])),
        "spec.static.hosts",
        "must list at least one host",
    );
    assert_problem(
        set(
            upstream(),
            "/spec/static/hosts/0/address",
            json!("web.internal"),
        ),
        "spec.static.hosts[0].address",
        "\"web.internal\" must be an IP address; DNS names are not supported yet",
    );
    assert_valid(set(
        upstream(),
        "/spec/static/hosts/0/address",
        json!("2001:db8::1"),
    ));
    assert_problem(
        set(upstream(), "/spec/static/hosts/0/port", json!(0)),
        "spec.static.hosts[0].port",
        "must be between 1 and 65535",
    );
    assert_problem(
        set(upstream(), "/spec/static/hosts/0/port", json!(70000)),
        "spec.static.hosts[0].port",
        "expected u16",
    );
    assert_problem(
        remove(upstream(), "/spec/static/hosts/0/port"),
        "spec.static.hosts[0]",
        "missing field `port`",
    );
    for bad in [0, 129] {
        assert_problem(
            set(upstream(), "/spec/static/hosts/0/weight", json!(bad)),
            "spec.static.hosts[0].weight",
            "must be between 1 and 128",
        );
    }
    assert_valid(set(upstream(), "/spec/static/hosts/0/weight", json!(128)));
    let dup = set(
        upstream(),
        "/spec/static/hosts/1",
        json!({"address": "127.0.0.1", "port": 8080, "weight": 2}),
    );
    assert_problem(dup, "spec.static.hosts[1]", "duplicate host 127.0.0.1:8080");
    let same_v6 = set(
        set(
            upstream(),
            "/spec/static/hosts/0",
            json!({"address": "::1", "port": 1}),
        ),
        "/spec/static/hosts/1",
        json!({"address": "0:0::1", "port": 1}),
    );
    assert_problem(same_v6, "spec.static.hosts[1]", "duplicate host");
    let other_port = set(
        upstream(),
        "/spec/static/hosts/1",
        json!({"address": "127.0.0.1", "port": 8081}),
    );
    assert_valid(other_port);
}

#[test]
fn upstream_connect_timeout() {
    let Object::Upstream(u) = object(set(upstream(), "/spec/connectTimeout", json!("250ms")))
    else {
        panic!()
    };
    assert_eq!(u.connect_timeout, Duration::from_millis(250));
    assert_valid(set(upstream(), "/spec/connectTimeout", json!("1h")));
    assert_problem(
        set(upstream(), "/spec/connectTimeout", json!("0s")),
        "spec.connectTimeout",
        "must be greater than 0s",
    );
    assert_problem(
        set(upstream(), "/spec/connectTimeout", json!("1h1s")),
        "spec.connectTimeout",
        "must be at most 1h",
    );
    assert_problem(
        set(upstream(), "/spec/connectTimeout", json!("soon")),
        "spec.connectTimeout",
        "invalid duration \"soon\"",
    );
    assert_problem(
        set(upstream(), "/spec/connectTimeout", json!(5)),
        "spec.connectTimeout",
        "expected a duration string",
    );
}

#[test]
fn upstream_load_balancer() {
    for (text, lb) in [
        ("roundRobin", LoadBalancer::RoundRobin),
        ("leastRequest", LoadBalancer::LeastRequest),
        ("random", LoadBalancer::Random),
    ] {
        let Object::Upstream(u) = object(set(upstream(), "/spec/loadBalancer", json!(text))) else {
            panic!()
        };
        assert_eq!(u.load_balancer, lb);
    }
    assert_problem(
        set(upstream(), "/spec/loadBalancer", json!("ringHash")),
        "spec.loadBalancer",
        "unknown variant `ringHash`",
    );
}

// ---------------------------------------------------------------- VirtualService

#[test]
fn virtual_service_domains() {
    for ok in [
        "*",
        "shop.example.com",
        "shop.example.com:8443",
        "*.example.com",
        "shop-*",
        "10.0.0.1:80",
        "[2001:db8::1]:443",
    ] {
        assert_valid(set(virtual_service(), "/spec/domains/0", json!(ok)));
    }
    for bad in [
        "",
        "a*b",
        "*.*",
        "shop .com",
        "shop.com:0",
        "shop.com:http",
        "2001:db8::1",
    ] {
        assert_problem(
            set(virtual_service(), "/spec/domains/0", json!(bad)),
            "spec.domains[0]",
            "invalid domain",
        );
    }
    assert_problem(
        set(virtual_service(), "/spec/domains", json!([])),
        "spec.domains",
        "must list at least one domain",
    );
    assert_problem(
        set(
            virtual_service(),
            "/spec/domains",
            json!(["a.com", "b.com", "a.com"]),
        ),
        "spec.domains[2]",
        "duplicate domain \"a.com\"",
    );
    assert_problem(
        remove(virtual_service(), "/spec/domains"),
        "spec",
        "missing field `domains`",
    );
}

#[test]
fn virtual_service_routes() {
    assert_problem(
        set(virtual_service(), "/spec/routes", json!([])),
        "spec.routes",
        "must list at least one route",
    );
    assert_problem(
        vs_route(json!({"match": {"prefix": "/"}})),
        "spec.routes[0]",
        "set one action of upstream, split, redirect, directResponse",
    );
    assert_problem(
        vs_route(json!({"upstream": "a", "split": [{"upstream": "b", "weight": 1}]})),
        "spec.routes[0]",
        "set only one action",
    );
}

#[test]
fn route_match_defaults_to_every_path() {
    let Object::VirtualService(vs) = object(virtual_service()) else {
        panic!()
    };
    assert_eq!(vs.routes[0].path_match(), PathMatch::Prefix("/"));
    assert_eq!(vs.routes[0].action(), Some(RouteAction::Upstream("web")));
    let Object::VirtualService(vs) = object(vs_route(json!({"match": {}, "upstream": "web"})))
    else {
        panic!()
    };
    assert_eq!(vs.routes[0].path_match(), PathMatch::Prefix("/"));
    assert!(vs.routes[0].route_match.as_ref().unwrap().case_sensitive);
}

#[test]
fn route_match_paths() {
    let m = |m: serde_json::Value| vs_route(json!({"match": m, "upstream": "web"}));
    let Object::VirtualService(vs) = object(m(json!({"exact": "/a"}))) else {
        panic!()
    };
    assert_eq!(vs.routes[0].path_match(), PathMatch::Exact("/a"));
    let Object::VirtualService(vs) = object(m(json!({"regex": "/a/[0-9]+"}))) else {
        panic!()
    };
    assert_eq!(vs.routes[0].path_match(), PathMatch::Regex("/a/[0-9]+"));
    assert_problem(
        m(json!({"prefix": "/a", "exact": "/a"})),
        "spec.routes[0].match",
        "set at most one of prefix, exact, regex",
    );
    assert_problem(
        m(json!({"prefix": "a"})),
        "spec.routes[0].match.prefix",
        "must start with '/'",
    );
    assert_problem(
        m(json!({"exact": "a"})),
        "spec.routes[0].match.exact",
        "must start with '/'",
    );
    assert_problem(
        m(json!({"prefix": "/a b"})),
        "spec.routes[0].match.prefix",
        "must not contain spaces",
    );
    assert_problem(
        m(json!({"regex": "(?=x)"})),
        "spec.routes[0].match.regex",
        "invalid regex: regex parse error: (?=x) ^^^ error: look-around, including look-ahead and look-behind, is not supported",
    );
    assert_problem(
        m(json!({"regex": "(a)\\1"})),
        "spec.routes[0].match.regex",
        "invalid regex: ",
    );
    assert_problem(
        m(json!({"regex": "[a-"})),
        "spec.routes[0].match.regex",
        "invalid regex",
    );
}

#[test]
fn route_match_case_sensitivity() {
    let m = |m: serde_json::Value| vs_route(json!({"match": m, "upstream": "web"}));
    let Object::VirtualService(vs) = object(m(json!({"prefix": "/A", "caseSensitive": false})))
    else {
        panic!()
    };
    assert!(!vs.routes[0].route_match.as_ref().unwrap().case_sensitive);
    assert_problem(
        m(json!({"regex": "/a", "caseSensitive": false})),
        "spec.routes[0].match.caseSensitive",
        "does not apply to a regex match",
    );
}

#[test]
fn route_match_headers() {
    let h = |h: serde_json::Value| vs_route(json!({"match": {"headers": [h]}, "upstream": "web"}));
    let Object::VirtualService(vs) =
        object(h(json!({"name": "x-a", "value": "1", "invert": true})))
    else {
        panic!()
    };
    let header = &vs.routes[0].route_match.as_ref().unwrap().headers[0];
    assert_eq!(header.value_match(), Some(ValueMatch::Exact("1")));
    assert!(header.invert);
    assert_valid(h(json!({"name": "x-a", "regex": "^[0-9]+$"})));
    assert_valid(h(json!({"name": "x-a", "present": false})));
    assert_valid(h(json!({"name": ":authority", "value": "a.com"})));
    assert_problem(
        h(json!({"name": "x-a"})),
        "spec.routes[0].match.headers[0]",
        "set exactly one of value, regex, present",
    );
    assert_problem(
        h(json!({"name": "x-a", "value": "1", "present": true})),
        "spec.routes[0].match.headers[0]",
        "set exactly one of value, regex, present",
    );
    assert_problem(
        h(json!({"name": ":method", "value": "GET"})),
        "spec.routes[0].match.headers[0].name",
        "use match.methods",
    );
    assert_problem(
        h(json!({"name": "X-User", "present": true})),
        "spec.routes[0].match.headers[0].name",
        "invalid header name \"X-User\"",
    );
    assert_problem(
        h(json!({"name": "", "present": true})),
        "spec.routes[0].match.headers[0].name",
        "must not be empty",
    );
    assert_problem(
        h(json!({"name": "x-a", "regex": "(?<=a)b"})),
        "spec.routes[0].match.headers[0].regex",
        "invalid regex",
    );
}

#[test]
fn route_match_query_parameters() {
    let q = |q: serde_json::Value| {
        vs_route(json!({"match": {"queryParameters": [q]}, "upstream": "web"}))
    };
    let Object::VirtualService(vs) = object(q(json!({"name": "debug", "present": true}))) else {
        panic!()
    };
    assert_eq!(
        vs.routes[0].route_match.as_ref().unwrap().query_parameters[0].value_match(),
        Some(ValueMatch::Present(true))
    );
    assert_valid(q(json!({"name": "lang", "value": "en"})));
    assert_valid(q(json!({"name": "page", "regex": "[0-9]+"})));
    assert_problem(
        q(json!({"name": "", "value": "en"})),
        "spec.routes[0].match.queryParameters[0].name",
        "must not be empty",
    );
    assert_problem(
        q(json!({"name": "lang"})),
        "spec.routes[0].match.queryParameters[0]",
        "set exactly one of value, regex, present",
    );
    assert_problem(
        q(json!({"name": "lang", "invert": true, "present": true})),
        "spec.routes[0].match.queryParameters[0].invert",
        "unknown field `invert`",
    );
}

#[test]
fn route_match_methods() {
    let m = |m: serde_json::Value| vs_route(json!({"match": {"methods": m}, "upstream": "web"}));
    let Object::VirtualService(vs) = object(m(json!([
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"
    ]))) else {
        panic!()
    };
    assert_eq!(
        vs.routes[0].route_match.as_ref().unwrap().methods[8],
        Method::Patch
    );
    assert_problem(
        m(json!(["GET", "POST", "GET"])),
        "spec.routes[0].match.methods[2]",
        "duplicate method GET",
    );
    assert_problem(
        m(json!(["get"])),
        "spec.routes[0].match.methods[0]",
        "unknown variant `get`",
    );
}

#[test]
fn route_upstream_is_a_name() {
    assert_problem(
        vs_route(json!({"upstream": "Web"})),
        "spec.routes[0].upstream",
        "invalid name \"Web\"",
    );
}

#[test]
fn route_split() {
    let s = |s: serde_json::Value| vs_route(json!({"split": s}));
    let Object::VirtualService(vs) = object(s(json!([
        {"upstream": "a", "weight": 90}, {"upstream": "b", "weight": 10}
    ]))) else {
        panic!()
    };
    assert_eq!(vs.routes[0].upstream_names(), vec!["a", "b"]);
    assert_problem(
        s(json!([])),
        "spec.routes[0].split",
        "must list at least one backend",
    );
    assert_problem(
        s(json!([{"upstream": "a", "weight": 0}])),
        "spec.routes[0].split",
        "weights must add up to more than 0",
    );
    // A backend parked at 0 % is fine while another gets the traffic.
    assert!(matches!(
        object(s(
            json!([{"upstream": "a", "weight": 100}, {"upstream": "b", "weight": 0}])
        )),
        Object::VirtualService(_)
    ));
    assert_problem(
        s(json!([{"upstream": "a", "weight": 1}, {"upstream": "a", "weight": 2}])),
        "spec.routes[0].split[1].upstream",
        "duplicate upstream \"a\" in split",
    );
    assert_problem(
        s(json!([{"upstream": "a"}])),
        "spec.routes[0].split[0]",
        "missing field `weight`",
    );
    assert_problem(
        s(json!([{"upstream": "a", "weight": 4294967295u32}, {"upstream": "b", "weight": 1}])),
        "spec.routes[0].split",
        "total weight must fit in 32 bits",
    );
}

#[test]
fn route_redirect() {
    let r = |r: serde_json::Value| vs_route(json!({"redirect": r}));
    let Object::VirtualService(vs) = object(r(json!({"httpsRedirect": true}))) else {
        panic!()
    };
    let Some(RouteAction::Redirect(redirect)) = vs.routes[0].action() else {
        panic!()
    };
    assert_eq!(redirect.response_code, 301);
    assert!(!redirect.strip_query);
    assert_valid(r(json!({
        "hostRedirect": "www.example.com:8443", "pathRedirect": "/x", "httpsRedirect": true,
        "stripQuery": true, "responseCode": 308
    })));
    assert_valid(r(json!({"prefixRewrite": "/new/", "responseCode": 302})));
    assert_valid(r(json!({"stripQuery": true, "responseCode": 303})));
    assert_valid(r(json!({"hostRedirect": "a.com", "responseCode": 307})));
    assert_problem(
        r(json!({"responseCode": 302})),
        "spec.routes[0].redirect",
        "set at least one of hostRedirect, pathRedirect, prefixRewrite, httpsRedirect, stripQuery",
    );
    assert_problem(
        r(json!({"httpsRedirect": false})),
        "spec.routes[0].redirect",
        "set at least one of",
    );
    assert_problem(
        r(json!({"pathRedirect": "/a", "prefixRewrite": "/b"})),
        "spec.routes[0].redirect",
        "pathRedirect and prefixRewrite cannot both be set",
    );
    assert_problem(
        r(json!({"httpsRedirect": true, "responseCode": 304})),
        "spec.routes[0].redirect.responseCode",
        "must be one of 301, 302, 303, 307, 308",
    );
    assert_problem(
        r(json!({"hostRedirect": "a b"})),
        "spec.routes[0].redirect.hostRedirect",
        "not a valid host name",
    );
    assert_problem(
        r(json!({"pathRedirect": "x"})),
        "spec.routes[0].redirect.pathRedirect",
        "must start with '/'",
    );
    assert_problem(
        r(json!({"prefixRewrite": "x"})),
        "spec.routes[0].redirect.prefixRewrite",
        "must start with '/'",
    );
}

#[test]
fn route_direct_response() {
    let d = |d: serde_json::Value| vs_route(json!({"directResponse": d}));
    assert_valid(d(json!({"status": 200})));
    assert_valid(d(json!({"status": 599, "body": "x".repeat(64 * 1024)})));
    for bad in [199, 600] {
        assert_problem(
            d(json!({"status": bad})),
            "spec.routes[0].directResponse.status",
            "must be between 200 and 599",
        );
    }
    assert_problem(
        d(json!({"status": 200, "body": "x".repeat(64 * 1024 + 1)})),
        "spec.routes[0].directResponse.body",
        "must be at most 64 KiB",
    );
    assert_problem(
        d(json!({"body": "x"})),
        "spec.routes[0].directResponse",
        "missing field `status`",
    );
}

#[test]
fn route_options_timeout() {
    let o = |action: serde_json::Value, options: serde_json::Value| {
        let mut route = action;
        route["options"] = options;
        vs_route(route)
    };
    assert_valid(o(json!({"upstream": "web"}), json!({"timeout": "0s"})));
    assert_valid(o(
        json!({"split": [{"upstream": "web", "weight": 1}]}),
        json!({"timeout": "1m30s"}),
    ));
    assert_problem(
        o(
            json!({"directResponse": {"status": 200}}),
            json!({"timeout": "1s"}),
        ),
        "spec.routes[0].options.timeout",
        "only applies to routes with an upstream or split action",
    );
    assert_problem(
        o(
            json!({"upstream": "web"}),
            json!({"timeout": "1 fortnight"}),
        ),
        "spec.routes[0].options.timeout",
        "invalid duration",
    );
}

#[test]
fn route_options_retries() {
    let r = |retries: serde_json::Value| {
        vs_route(json!({"upstream": "web", "options": {"retries": retries}}))
    };
    let Object::VirtualService(vs) = object(r(json!({"attempts": 3}))) else {
        panic!()
    };
    let retries = vs.routes[0]
        .options
        .as_ref()
        .unwrap()
        .retries
        .as_ref()
        .unwrap();
    assert_eq!(retries.retry_on, DEFAULT_RETRY_ON);
    assert_eq!(retries.per_try_timeout, None);
    assert_valid(r(json!({"attempts": 10, "perTryTimeout": "250ms",
        "retryOn": "5xx, gateway-error,reset,connect-failure,envoy-ratelimited,retriable-4xx,retriable-status-codes,retriable-headers",
        "retriableStatusCodes": [429, 503], "retriableHeaders": ["x-retry-me"]})));
    // Conditions that can never fire on an HTTP/1.1 upstream are refused, and so are the
    // lists of the conditions that need them, one without the other.
    for (never, why) in [
        ("refused-stream", "HTTP/2"),
        ("http3-post-connect-failure", "HTTP/3"),
    ] {
        assert_problem(
            r(json!({"attempts": 1, "retryOn": format!("5xx,{never}")})),
            "spec.routes[0].options.retries.retryOn",
            why,
        );
    }
    assert_problem(
        r(json!({"attempts": 1, "retryOn": "retriable-status-codes"})),
        "spec.routes[0].options.retries.retriableStatusCodes",
        "list the status codes",
    );
    assert_problem(
        r(json!({"attempts": 1, "retriableStatusCodes": [503]})),
        "spec.routes[0].options.retries.retriableStatusCodes",
        "only used with retryOn",
    );
    assert_problem(
        r(
            json!({"attempts": 1, "retryOn": "retriable-status-codes", "retriableStatusCodes": [99]}),
        ),
        "spec.routes[0].options.retries.retriableStatusCodes[0]",
        "between 100 and 599",
    );
    assert_problem(
        r(json!({"attempts": 1, "retryOn": "retriable-headers"})),
        "spec.routes[0].options.retries.retriableHeaders",
        "list the response headers",
    );
    // A try longer than the whole request could never be retried.
    assert_problem(
        r(json!({"attempts": 1, "perTryTimeout": "20s"})),
        "spec.routes[0].options.retries.perTryTimeout",
        "15s when not set",
    );
    assert_problem(
        vs_route(json!({"upstream": "web", "options": {"timeout": "2s",
            "retries": {"attempts": 1, "perTryTimeout": "3s"}}})),
        "spec.routes[0].options.retries.perTryTimeout",
        "longer than the route's timeout, 2s",
    );
    assert_valid(vs_route(
        json!({"upstream": "web", "options": {"timeout": "0s",
        "retries": {"attempts": 1, "perTryTimeout": "30m"}}}),
    ));
    assert_problem(
        vs_route(json!({"upstream": "web", "options": {"timeout": "2h"}})),
        "spec.routes[0].options.timeout",
        "at most 1h",
    );
    for bad in [0, 11] {
        assert_problem(
            r(json!({"attempts": bad})),
            "spec.routes[0].options.retries.attempts",
            "must be between 1 and 10",
        );
    }
    assert_problem(
        r(json!({"attempts": 1, "perTryTimeout": "0s"})),
        "spec.routes[0].options.retries.perTryTimeout",
        "must be greater than 0s",
    );
    assert_problem(
        r(json!({"attempts": 1, "retryOn": "5xx,sometimes"})),
        "spec.routes[0].options.retries.retryOn",
        "unknown retry condition \"sometimes\"",
    );
    assert_problem(
        r(json!({"attempts": 1, "retryOn": ""})),
        "spec.routes[0].options.retries.retryOn",
        "unknown retry condition \"\"",
    );
    assert_problem(
        vs_route(
            json!({"redirect": {"httpsRedirect": true}, "options": {"retries": {"attempts": 1}}}),
        ),
        "spec.routes[0].options.retries",
        "only applies to routes with an upstream or split action",
    );
}

#[test]
fn route_options_prefix_rewrite() {
    assert_valid(vs_route(
        json!({"upstream": "web", "options": {"prefixRewrite": "/v2/"}}),
    ));
    assert_valid(vs_route(
        json!({"match": {"prefix": "/v1/"}, "upstream": "web", "options": {"prefixRewrite": "/v2/"}}),
    ));
    assert_problem(
        vs_route(
            json!({"match": {"exact": "/v1"}, "upstream": "web", "options": {"prefixRewrite": "/v2"}}),
        ),
        "spec.routes[0].options.prefixRewrite",
        "requires a prefix match",
    );
    assert_problem(
        vs_route(json!({"directResponse": {"status": 200}, "options": {"prefixRewrite": "/v2"}})),
        "spec.routes[0].options.prefixRewrite",
        "only applies to routes with an upstream or split action",
    );
    assert_problem(
        vs_route(json!({"upstream": "web", "options": {"prefixRewrite": "v2"}})),
        "spec.routes[0].options.prefixRewrite",
        "must start with '/'",
    );
}

#[test]
fn route_options_header_mutations() {
    for which in ["requestHeaders", "responseHeaders"] {
        let h = |h: serde_json::Value| {
            let mut options = json!({});
            options[which] = h;
            vs_route(json!({"directResponse": {"status": 200}, "options": options}))
        };
        let Object::VirtualService(vs) = object(h(
            json!({"add": [{"name": "x-a", "value": "1"}], "remove": ["x-b"]}),
        )) else {
            panic!()
        };
        let options = vs.routes[0].options.as_ref().unwrap();
        let m = if which == "requestHeaders" {
            options.request_headers.as_ref()
        } else {
            options.response_headers.as_ref()
        }
        .unwrap();
        assert!(!m.add[0].append);
        assert_eq!(m.remove, vec!["x-b"]);
        assert_valid(h(
            json!({"add": [{"name": "x-a", "value": "1", "append": true}]}),
        ));
        let p = format!("spec.routes[0].options.{which}");
        assert_problem(
            h(json!({"add": [{"name": ":path", "value": "/"}]})),
            &format!("{p}.add[0].name"),
            "pseudo-header \":path\" cannot be added or removed",
        );
        assert_problem(
            h(json!({"add": [{"name": "host", "value": "a"}]})),
            &format!("{p}.add[0].name"),
            "header \"host\" cannot be added or removed",
        );
        assert_problem(
            h(json!({"remove": ["x-a", "Host"]})),
            &format!("{p}.remove[1]"),
            "header \"host\" cannot be added or removed",
        );
        assert_problem(
            h(json!({"remove": [":authority"]})),
            &format!("{p}.remove[0]"),
            "pseudo-header",
        );
        assert_problem(
            h(json!({"add": [{"name": "X-A", "value": "1"}]})),
            &format!("{p}.add[0].name"),
            "invalid header name",
        );
        assert_problem(
            h(json!({"add": [{"name": "x-a", "value": "1\r\nx-b: 2"}]})),
            &format!("{p}.add[0].value"),
            "must not contain CR, LF or NUL",
        );
        assert_problem(
            h(json!({"add": [{"name": "x-a"}]})),
            &format!("{p}.add[0]"),
            "missing field `value`",
        );
    }
}

// ---------------------------------------------------------------- Gateway

#[test]
fn gateway_defaults() {
    let Object::Gateway(g) = object(gateway()) else {
        panic!()
    };
    assert_eq!(g.bind_address, "0.0.0.0");
    assert_eq!(g.bind_port, 10000);
    assert_eq!(g.proxy_names, vec!["gateway-proxy"]);
    assert_eq!(g.virtual_services, None);
    assert!(g.serves("anything"));
}

#[test]
fn gateway_bind() {
    assert_problem(
        remove(gateway(), "/spec/bindPort"),
        "spec",
        "missing field `bindPort`",
    );
    assert_problem(
        set(gateway(), "/spec/bindPort", json!(0)),
        "spec.bindPort",
        "must be between 1 and 65535",
    );
    assert_valid(set(gateway(), "/spec/bindAddress", json!("::")));
    assert_valid(set(gateway(), "/spec/bindAddress", json!("127.0.0.2")));
    assert_problem(
        set(gateway(), "/spec/bindAddress", json!("localhost")),
        "spec.bindAddress",
        "must be an IP address",
    );
}

#[test]
fn gateway_proxy_names() {
    assert_valid(set(
        gateway(),
        "/spec/proxyNames",
        json!(["edge-1", "edge-2"]),
    ));
    assert_problem(
        set(gateway(), "/spec/proxyNames", json!([])),
        "spec.proxyNames",
        "must list at least one proxy",
    );
    assert_problem(
        set(gateway(), "/spec/proxyNames", json!(["a", ""])),
        "spec.proxyNames[1]",
        "must not be empty",
    );
    assert_problem(
        set(gateway(), "/spec/proxyNames", json!(["a", "b", "a"])),
        "spec.proxyNames[2]",
        "duplicate proxy name \"a\"",
    );
    assert_problem(
        set(gateway(), "/spec/proxyNames", json!(["a b"])),
        "spec.proxyNames[0]",
        "must not contain whitespace",
    );
}

#[test]
fn gateway_virtual_services() {
    let Object::Gateway(g) = object(set(gateway(), "/spec/virtualServices", json!(["shop"])))
    else {
        panic!()
    };
    assert!(g.serves("shop"));
    assert!(!g.serves("blog"));
    assert_problem(
        set(gateway(), "/spec/virtualServices", json!([])),
        "spec.virtualServices",
        "must list at least one virtual service; omit it to serve all of them",
    );
    assert_problem(
        set(gateway(), "/spec/virtualServices", json!(["shop", "shop"])),
        "spec.virtualServices[1]",
        "duplicate virtual service \"shop\"",
    );
    assert_problem(
        set(gateway(), "/spec/virtualServices", json!(["Shop"])),
        "spec.virtualServices[0]",
        "invalid name",
    );
}

#[test]
fn kinds_and_keys_display() {
    assert_eq!(
        ObjectKey::virtual_service("shop").to_string(),
        "VirtualService/shop"
    );
    assert_eq!(Kind::parse("Gateway"), Some(Kind::Gateway));
    assert_eq!(Kind::parse("gateway"), None);
}

#[test]
fn example_documents_are_valid() {
    for text in [
        include_str!("../../../examples/reference/everything.yaml"),
        include_str!("../../../examples/demo/web.yaml"),
        include_str!("../../../examples/demo/upstreams.yaml"),
        include_str!("../../../examples/demo/gateway.yaml"),
    ] {
        for parsed in parse_multi(text).unwrap() {
            match parsed {
                Parsed::Document(d) => assert!(d.result.is_ok(), "{}: {:?}", d.key, d.result),
                Parsed::Invalid(p) => panic!("{p:?}"),
            }
        }
    }
}

#[test]
fn gateway_trusted_hops() {
    let Object::Gateway(g) = object(set(gateway(), "/spec/xffNumTrustedHops", json!(2))) else {
        panic!()
    };
    assert_eq!(g.xff_num_trusted_hops, 2);
    assert_problem(
        set(gateway(), "/spec/xffNumTrustedHops", json!(11)),
        "spec.xffNumTrustedHops",
        "must be at most 10",
    );
    assert_problem(
        set(gateway(), "/spec/xffNumTrustedHops", json!(-1)),
        "spec.xffNumTrustedHops",
        "invalid value",
    );
}

#[test]
fn gateway_access_log_defaults_to_stdout_and_the_documented_fields() {
    let Object::Gateway(g) = object(set(gateway(), "/spec/accessLog", json!({}))) else {
        panic!()
    };
    let log = g.access_log.expect("an access log");
    assert_eq!(log.to, "stdout");
    let fields = log.fields();
    assert_eq!(fields.len(), 21);
    assert_eq!(fields["response_code"], "%RESPONSE_CODE%");
    assert_eq!(fields["path"], "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%");
}

#[test]
fn gateway_access_log_destination() {
    assert_valid(set(
        gateway(),
        "/spec/accessLog",
        json!({"to": "/var/log/vmesh/edge.log"}),
    ));
    assert_problem(
        set(gateway(), "/spec/accessLog", json!({"to": "logs/edge.log"})),
        "spec.accessLog.to",
        "use \"stdout\" or an absolute path",
    );
    assert_problem(
        set(gateway(), "/spec/accessLog", json!({"to": "/var/log/a\nb"})),
        "spec.accessLog.to",
        "control characters",
    );
    assert_problem(
        set(gateway(), "/spec/accessLog", json!({"file": "/x"})),
        "spec.accessLog.file",
        "unknown field `file`, expected `to` or `fields`",
    );
}

#[test]
fn gateway_access_log_fields_are_checked_operator_by_operator() {
    let with_fields =
        |fields: serde_json::Value| set(gateway(), "/spec/accessLog", json!({ "fields": fields }));
    assert_valid(with_fields(json!({
        "status": "%RESPONSE_CODE%",
        "agent": "%REQ(user-agent):64%",
        "path": "%REQ(x-envoy-original-path?:path)%",
        "summary": "code=%RESPONSE_CODE% in %DURATION% ms",
        "ct": "%RESP(content-type)%",
        "literal": "no operators at all",
    })));
    assert_problem(
        with_fields(json!({"x": "%DYNAMIC_METADATA(a:b)%"})),
        "spec.accessLog.fields.x",
        "%DYNAMIC_METADATA(a:b)%: not a supported command",
    );
    assert_problem(
        with_fields(json!({"x": "50%"})),
        "spec.accessLog.fields.x",
        "a '%' without its closing '%'",
    );
    assert_problem(
        with_fields(json!({"x": "%REQ(user agent)%"})),
        "spec.accessLog.fields.x",
        "takes a header name",
    );
    assert_problem(
        with_fields(json!({"x": "%REQ(a?b?c)%"})),
        "spec.accessLog.fields.x",
        "takes a header name",
    );
    assert_problem(
        with_fields(json!({"x": "%REQ(host):big%"})),
        "spec.accessLog.fields.x",
        "only :<max length> may follow",
    );
    assert_problem(
        with_fields(json!({"x": "%REQ(host%"})),
        "spec.accessLog.fields.x",
        "missing ')'",
    );
    assert_problem(
        with_fields(json!({"a b": "%PROTOCOL%"})),
        "spec.accessLog.fields.a b",
        "letters, digits",
    );
    assert_problem(
        with_fields(json!({})),
        "spec.accessLog.fields",
        "at least one field",
    );
    assert_problem(
        with_fields(json!({"x": "a".repeat(257)})),
        "spec.accessLog.fields.x",
        "at most 256 bytes",
    );
    let many: serde_json::Map<String, serde_json::Value> = (0..33)
        .map(|i| (format!("f{i}"), json!("%PROTOCOL%")))
        .collect();
    assert_problem(
        with_fields(serde_json::Value::Object(many)),
        "spec.accessLog.fields",
        "has 33 fields; the limit is 32",
    );
}

// ---------------------------------------------------------------- TLS

#[test]
fn gateway_tls_is_checked_field_by_field() {
    let tls = |v: serde_json::Value| set(gateway(), "/spec/tls", v);
    assert_valid(tls(json!({"certificates": [{"secret": "vmesh/tls/shop"}]})));
    assert_valid(tls(json!({
        "certificates": [{"secret": "a"}, {"secret": "b"}],
        "minVersion": "1.2", "maxVersion": "1.3",
        "cipherSuites": ["ECDHE-ECDSA-AES128-GCM-SHA256"],
        "clientCertificate": {"ca": "vmesh/ca/clients", "optional": true},
    })));
    assert_eq!(
        problems(tls(json!({
            "certificates": [{"secret": "../etc"}, {"secret": "a"}, {"secret": "a"}],
            "minVersion": "1.3",
            "maxVersion": "1.2",
            "cipherSuites": ["RC4-MD5"],
            "clientCertificate": {"ca": ""},
        }))),
        vec![
            "spec.tls.certificates[0].secret: \"../etc\" is not a secret name: '/'-separated segments of letters, digits, '.', '_' and '-' (not '.' or '..'), at most 256 bytes".to_string(),
            "spec.tls.certificates[2].secret: secret \"a\" is listed twice".into(),
            "spec.tls.maxVersion: 1.2 is older than minVersion 1.3".into(),
            "spec.tls.cipherSuites: applies to TLS 1.2 only, and minVersion is 1.3: remove it or lower minVersion".into(),
            format!("spec.tls.cipherSuites[0]: \"RC4-MD5\" is not a cipher suite Envoy offers; use one of {}", vmesh_model::CIPHER_SUITES.join(", ")),
            "spec.tls.clientCertificate.ca: \"\" is not a secret name: '/'-separated segments of letters, digits, '.', '_' and '-' (not '.' or '..'), at most 256 bytes".into(),
        ]
    );
    assert_problem(
        tls(json!({"certificates": []})),
        "spec.tls.certificates",
        "must list at least one certificate",
    );
    assert_problem(
        tls(json!({"certificates": [{"secret": "a"}], "minVersion": "1.1"})),
        "spec.tls.minVersion",
        "unknown variant `1.1`",
    );
}

#[test]
fn an_https_redirect_belongs_on_a_plaintext_gateway() {
    assert_valid(set(gateway(), "/spec/httpsRedirect", json!({})));
    let both = set(
        set(gateway(), "/spec/httpsRedirect", json!({"port": 8443})),
        "/spec/tls",
        json!({"certificates": [{"secret": "a"}]}),
    );
    assert_problem(
        both,
        "spec.httpsRedirect",
        "a gateway with tls serves HTTPS itself",
    );
    assert_problem(
        set(gateway(), "/spec/httpsRedirect", json!({"port": 0})),
        "spec.httpsRedirect.port",
        "must be between 1 and 65535",
    );
}

#[test]
fn upstream_tls_needs_a_ca_and_a_dns_name_for_sni() {
    assert_valid(set(
        upstream(),
        "/spec/tls",
        json!({"ca": "vmesh/ca/internal", "sni": "billing.internal"}),
    ));
    assert_problem(
        set(
            upstream(),
            "/spec/tls",
            json!({"ca": "x", "sni": "not a name"}),
        ),
        "spec.tls.sni",
        "\"not a name\" is not a DNS name",
    );
    assert_problem(
        set(upstream(), "/spec/tls", json!({"sni": "a.b"})),
        "spec.tls",
        "missing field `ca`",
    );
}

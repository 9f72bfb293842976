//! Upstreams with `consul` discovery: their endpoints are the admitted instances of
//! the service in `Config::catalog`.
#![allow(clippy::unwrap_used)]

use envoy_types::pb::envoy::config::core::v3::{address, socket_address, HealthStatus};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment,
};
use envoy_types::pb::envoy::config::route::v3::{route::Action, RouteConfiguration};
use proptest::prelude::*;
use prost::Message;
use vmesh_model::{
    Catalog, Config, ConfigSet, Health, ObjectKey, ServiceInstance, SourceMode, State,
};
use vmesh_translate::{render::render_translation, translate, Translation};
use vmesh_xds::resource::{CLUSTER, ENDPOINT, ROUTE};

const PROXY: &str = "gateway-proxy";

/// A gateway serving one virtual service that routes everything to upstream `web`,
/// whose `consul` form is `consul` (YAML flow mapping).
fn config(consul: &str) -> Config {
    let text = format!(
        "kind: Upstream\nname: web\nspec:\n  consul: {consul}\n---\n\
         kind: VirtualService\nname: shop\nspec:\n  domains: ['*']\n  routes:\n    - upstream: web\n---\n\
         kind: Gateway\nname: edge\nspec:\n  bindPort: 10000\n"
    );
    let mut set = ConfigSet::new();
    set.upsert_source("test.yaml", &text, SourceMode::MultiDoc);
    let config = set.snapshot();
    assert!(
        config.source_errors.is_empty(),
        "{:?}",
        config.source_errors
    );
    let key = ObjectKey::upstream("web");
    assert_eq!(
        config.reports[&key].state,
        State::Accepted,
        "{:?}",
        config.reports[&key]
    );
    config
}

fn inst(
    node: &str,
    dc: &str,
    address: &str,
    port: u16,
    tags: &[&str],
    health: Health,
) -> ServiceInstance {
    ServiceInstance {
        node: node.into(),
        datacenter: dc.into(),
        id: format!("web-{node}-{port}"),
        address: address.into(),
        port,
        tags: tags.iter().map(ToString::to_string).collect(),
        health,
    }
}

fn with_catalog(mut config: Config, instances: Vec<(&str, ServiceInstance)>) -> Config {
    let mut catalog = Catalog::new();
    for (service, i) in instances {
        catalog.insert(service, i);
    }
    config.catalog = catalog;
    config
}

/// The endpoints of `web` as `address:port`, checking each is marked healthy.
fn endpoints(t: &Translation) -> Vec<String> {
    let resource = t.proxies[PROXY].snapshot.get(ENDPOINT, "web").unwrap();
    let cla = ClusterLoadAssignment::decode(resource.body.value.as_slice()).unwrap();
    assert_eq!(cla.cluster_name, "web");
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .map(|e| {
            assert_eq!(e.health_status, HealthStatus::Healthy as i32);
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!("{e:?}")
            };
            let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                panic!("{ep:?}")
            };
            let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                panic!("{sa:?}")
            };
            format!("{}:{port}", sa.address)
        })
        .collect()
}

fn warnings(t: &Translation) -> Vec<String> {
    t.reports[&ObjectKey::upstream("web")]
        .warnings
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn version(t: &Translation, type_url: &str) -> String {
    t.proxies[PROXY]
        .snapshot
        .get(type_url, "web")
        .unwrap()
        .version
        .clone()
}

/// Instances of `web` (and one of another service) covering every filter.
fn mixed() -> Vec<(&'static str, ServiceInstance)> {
    vec![
        (
            "web",
            inst(
                "n1",
                "dc1",
                "10.0.0.1",
                80,
                &["v2", "http"],
                Health::Passing,
            ),
        ),
        (
            "web",
            inst("n2", "dc1", "10.0.0.2", 80, &["v2"], Health::Passing),
        ),
        (
            "web",
            inst(
                "n3",
                "dc2",
                "10.0.0.3",
                80,
                &["v2", "http", "x"],
                Health::Passing,
            ),
        ),
        (
            "web",
            inst(
                "n4",
                "dc1",
                "10.0.0.4",
                80,
                &["v2", "http"],
                Health::Warning,
            ),
        ),
        (
            "web",
            inst(
                "n5",
                "dc1",
                "10.0.0.5",
                80,
                &["v2", "http"],
                Health::Critical,
            ),
        ),
        (
            "web",
            inst(
                "n6",
                "dc3",
                "10.0.0.6",
                80,
                &["http", "v2"],
                Health::Passing,
            ),
        ),
        (
            "api",
            inst(
                "n7",
                "dc1",
                "10.0.0.7",
                80,
                &["v2", "http"],
                Health::Passing,
            ),
        ),
    ]
}

#[test]
fn only_passing_instances_by_default() {
    let t = translate(&with_catalog(config("{service: web}"), mixed()));
    assert_eq!(
        endpoints(&t),
        ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.6:80"]
    );
    assert_eq!(
        t.reports[&ObjectKey::upstream("web")].state,
        State::Accepted
    );
}

#[test]
fn include_warning_admits_warning_never_critical() {
    let t = translate(&with_catalog(
        config("{service: web, includeWarning: true}"),
        mixed(),
    ));
    assert_eq!(
        endpoints(&t),
        [
            "10.0.0.1:80",
            "10.0.0.2:80",
            "10.0.0.3:80",
            "10.0.0.4:80",
            "10.0.0.6:80"
        ]
    );
}

#[test]
fn an_instance_must_carry_every_tag() {
    let t = translate(&with_catalog(
        config("{service: web, tags: [http, v2]}"),
        mixed(),
    ));
    assert_eq!(endpoints(&t), ["10.0.0.1:80", "10.0.0.3:80", "10.0.0.6:80"]);
}

#[test]
fn datacenters_filter() {
    let t = translate(&with_catalog(
        config("{service: web, datacenters: [dc1, dc3]}"),
        mixed(),
    ));
    assert_eq!(endpoints(&t), ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.6:80"]);
    let t = translate(&with_catalog(
        config("{service: web, tags: [http], datacenters: [dc1], includeWarning: true}"),
        mixed(),
    ));
    assert_eq!(endpoints(&t), ["10.0.0.1:80", "10.0.0.4:80"]);
}

#[test]
fn the_cluster_is_eds_like_a_static_upstream() {
    let t = translate(&with_catalog(config("{service: web}"), mixed()));
    let c = t.proxies[PROXY].snapshot.get(CLUSTER, "web").unwrap();
    let cluster =
        envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(c.body.value.as_slice())
            .unwrap();
    assert_eq!(cluster.name, "web");
    assert!(cluster.eds_cluster_config.is_some());
    assert_eq!(c.refs, [vmesh_xds::ResourceRef::new(ENDPOINT, "web")]);
}

#[test]
fn no_admitted_instance_is_a_warning_and_an_empty_assignment() {
    for (consul, catalog, message) in [
        (
            "{service: web}",
            vec![],
            "spec.consul: no passing instance of service \"web\"; the upstream has no endpoints and its routes answer 503",
        ),
        (
            "{service: web}",
            vec![("web", inst("n1", "dc1", "10.0.0.1", 80, &[], Health::Warning))],
            "spec.consul: no passing instance of service \"web\"; the upstream has no endpoints and its routes answer 503",
        ),
        (
            "{service: web, tags: [v9], datacenters: [dc1], includeWarning: true}",
            mixed(),
            "spec.consul: no passing or warning instance of service \"web\" with tags [\"v9\"] in datacenters [\"dc1\"]; the upstream has no endpoints and its routes answer 503",
        ),
    ] {
        let t = translate(&with_catalog(config(consul), catalog));
        assert!(endpoints(&t).is_empty());
        let resource = t.proxies[PROXY].snapshot.get(ENDPOINT, "web").unwrap();
        let cla = ClusterLoadAssignment::decode(resource.body.value.as_slice()).unwrap();
        assert!(cla.endpoints.is_empty());
        assert_eq!(warnings(&t), [message]);
        assert_eq!(t.reports[&ObjectKey::upstream("web")].state, State::Warning);
        // The route still goes to the cluster: Envoy answers 503 no healthy upstream.
        let rc = RouteConfiguration::decode(
            t.proxies[PROXY]
                .snapshot
                .get(ROUTE, "gw-edge-routes")
                .unwrap()
                .body
                .value
                .as_slice(),
        )
        .unwrap();
        let route = &rc.virtual_hosts[0].routes[0];
        assert!(matches!(route.action, Some(Action::Route(_))), "{route:?}");
        let shop = &t.reports[&ObjectKey::virtual_service("shop")];
        assert_eq!(shop.state, State::Accepted, "{shop:?}");
    }
}

#[test]
fn invalid_and_duplicate_addresses() {
    let t = translate(&with_catalog(
        config("{service: web}"),
        vec![
            (
                "web",
                inst("n1", "dc1", "10.0.0.1", 80, &[], Health::Passing),
            ),
            (
                "web",
                inst("n2", "dc1", "web.local", 80, &[], Health::Passing),
            ),
            (
                "web",
                inst("n3", "dc1", "10.0.0.3", 0, &[], Health::Passing),
            ),
            // The same endpoint twice (also under another spelling of the address).
            (
                "web",
                inst("n4", "dc1", "2001:db8::1", 80, &[], Health::Passing),
            ),
            (
                "web",
                inst("n5", "dc1", "2001:db8:0::1", 80, &[], Health::Passing),
            ),
            (
                "web",
                inst("n1", "dc1", "10.0.0.1", 80, &[], Health::Passing),
            ),
        ],
    ));
    assert_eq!(endpoints(&t), ["10.0.0.1:80", "2001:db8::1:80"]);
    assert_eq!(
        warnings(&t),
        [
            "spec.consul: instance \"web-n2-80\" on node \"n2\" has an invalid address \"web.local\" or port 80; left out",
            "spec.consul: instance \"web-n3-0\" on node \"n3\" has an invalid address \"10.0.0.3\" or port 0; left out",
        ]
    );
}

#[test]
fn only_the_endpoints_version_follows_the_instances() {
    let base = config("{service: web, includeWarning: true}");
    let a = translate(&with_catalog(base.clone(), mixed()));
    let mut fewer = mixed();
    fewer.remove(0);
    let b = translate(&with_catalog(base.clone(), fewer));
    let mut flipped = mixed();
    flipped[3].1.health = Health::Critical;
    let c = translate(&with_catalog(base.clone(), flipped));
    let empty = translate(&base);

    let clusters: Vec<String> = [&a, &b, &c, &empty]
        .iter()
        .map(|t| version(t, CLUSTER))
        .collect();
    assert!(clusters.iter().all(|v| *v == clusters[0]), "{clusters:?}");
    let eds: Vec<String> = [&a, &b, &c, &empty]
        .iter()
        .map(|t| version(t, ENDPOINT))
        .collect();
    for i in 0..eds.len() {
        for j in 0..i {
            assert_ne!(eds[i], eds[j], "{eds:?}");
        }
    }
    // Nothing else changes either: listener and routes are the same resources.
    for t in [&b, &c, &empty] {
        assert_eq!(
            t.proxies[PROXY].snapshot.of_type(ROUTE),
            a.proxies[PROXY].snapshot.of_type(ROUTE)
        );
    }
    // An instance that is not admitted changes nothing at all.
    let mut extra = mixed();
    extra.push((
        "web",
        inst("n9", "dc1", "10.0.0.9", 80, &[], Health::Critical),
    ));
    extra.push((
        "other",
        inst("n9", "dc1", "10.0.0.9", 80, &[], Health::Passing),
    ));
    let d = translate(&with_catalog(base, extra));
    assert_eq!(d.proxies, a.proxies);
}

#[test]
fn a_static_upstream_ignores_the_catalog() {
    let text =
        "kind: Upstream\nname: web\nspec:\n  static:\n    hosts: [{address: 10.0.0.1, port: 80}]\n";
    let mut set = ConfigSet::new();
    set.upsert_source("s.yaml", text, SourceMode::MultiDoc);
    let config = set.snapshot();
    let without = translate(&config);
    let with = translate(&with_catalog(config, mixed()));
    assert_eq!(without, with);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn instance_order_does_not_matter(order in Just((0..mixed().len()).collect::<Vec<_>>()).prop_shuffle()) {
        let base = config("{service: web, includeWarning: true}");
        let a = translate(&with_catalog(base.clone(), mixed()));
        let all = mixed();
        let shuffled: Vec<_> = order.iter().map(|&i| all[i].clone()).collect();
        let b = translate(&with_catalog(base, shuffled));
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(render_translation(&a), render_translation(&b));
    }
}

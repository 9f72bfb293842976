//! Synchronous tests of the stream state machine, written as the exchanges a
//! real Envoy has with the server.

use super::*;
use crate::resource::{Part, LISTENER, ROUTE};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use envoy_types::pb::google::rpc::Status;

fn cluster(name: &str, timeout_hint: &str) -> Resource {
    let c = Cluster {
        name: name.into(),
        alt_stat_name: timeout_hint.into(),
        ..Default::default()
    };
    Resource::new(CLUSTER, name, &c, vec![ResourceRef::new(ENDPOINT, name)])
}

fn endpoints(name: &str) -> Resource {
    let c = ClusterLoadAssignment {
        cluster_name: name.into(),
        ..Default::default()
    };
    Resource::new(ENDPOINT, name, &c, vec![])
}

fn listener(name: &str, route: &str) -> Resource {
    let l = Listener {
        name: name.into(),
        stat_prefix: route.into(),
        ..Default::default()
    };
    Resource::new(LISTENER, name, &l, vec![ResourceRef::new(ROUTE, route)])
}

/// A route configuration whose single virtual host sends traffic to `clusters`.
fn routes(name: &str, clusters: &[&str]) -> Resource {
    let rc = RouteConfiguration {
        name: name.into(),
        virtual_hosts: vec![VirtualHost {
            name: clusters.join(","),
            ..Default::default()
        }],
        ..Default::default()
    };
    let refs = clusters
        .iter()
        .map(|c| ResourceRef::new(CLUSTER, *c))
        .collect();
    Resource::new(ROUTE, name, &rc, refs)
}

fn snapshot(resources: Vec<Resource>) -> Arc<ProxySnapshot> {
    let mut s = ProxySnapshot::default();
    for r in resources {
        s.insert(r);
    }
    Arc::new(s)
}

/// The usual gateway: one listener, one route configuration, the given clusters.
fn gateway(clusters: &[&str]) -> Arc<ProxySnapshot> {
    let mut rs = vec![listener("gw", "gw"), routes("gw", clusters)];
    for c in clusters {
        rs.push(cluster(c, ""));
        rs.push(endpoints(c));
    }
    snapshot(rs)
}

fn sotw_req(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        node: Some(Node {
            id: "gateway-proxy".into(),
            ..Default::default()
        }),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: type_url.into(),
        response_nonce: nonce.into(),
        error_detail: None,
        ..Default::default()
    }
}

fn nack(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(Status {
            code: 3,
            message: "Proto constraint validation failed".into(),
            details: vec![],
        }),
        ..sotw_req(type_url, names, version, nonce)
    }
}

fn sotw(responses: &[Response]) -> Vec<&DiscoveryResponse> {
    responses
        .iter()
        .map(|r| match r {
            Response::Sotw(r) => r,
            Response::Delta(_) => panic!("delta response on a SotW stream"),
        })
        .collect()
}

fn names_in(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|any| match any.type_url.as_str() {
            CLUSTER => {
                <Cluster as prost::Message>::decode(&*any.value)
                    .unwrap()
                    .name
            }
            ENDPOINT => {
                <ClusterLoadAssignment as prost::Message>::decode(&*any.value)
                    .unwrap()
                    .cluster_name
            }
            LISTENER => {
                <Listener as prost::Message>::decode(&*any.value)
                    .unwrap()
                    .name
            }
            ROUTE => {
                <RouteConfiguration as prost::Message>::decode(&*any.value)
                    .unwrap()
                    .name
            }
            other => panic!("unexpected type {other}"),
        })
        .collect()
}

fn route_targets(r: &DiscoveryResponse) -> String {
    let any = &r.resources[0];
    <RouteConfiguration as prost::Message>::decode(&*any.value)
        .unwrap()
        .virtual_hosts[0]
        .name
        .clone()
}

/// Drives a SotW stream through Envoy's start-up: CDS, EDS, LDS, RDS, all acknowledged.
/// Returns the last (version, nonce) per type.
fn converge_sotw(s: &mut Stream, clusters: &[&str]) -> BTreeMap<&'static str, (String, String)> {
    let mut last = BTreeMap::new();
    s.handle_sotw(&sotw_req(CLUSTER, &[], "", ""));
    let out = s.poll();
    let cds = sotw(&out)[0].clone();
    assert_eq!(cds.type_url, CLUSTER);
    s.handle_sotw(&sotw_req(ENDPOINT, clusters, "", ""));
    let out = s.poll();
    let eds = sotw(&out)[0].clone();
    assert_eq!(eds.type_url, ENDPOINT);
    s.handle_sotw(&sotw_req(CLUSTER, &[], &cds.version_info, &cds.nonce));
    s.handle_sotw(&sotw_req(ENDPOINT, clusters, &eds.version_info, &eds.nonce));
    s.handle_sotw(&sotw_req(LISTENER, &[], "", ""));
    let out = s.poll();
    let lds = sotw(&out)[0].clone();
    s.handle_sotw(&sotw_req(LISTENER, &[], &lds.version_info, &lds.nonce));
    s.handle_sotw(&sotw_req(ROUTE, &["gw"], "", ""));
    let out = s.poll();
    let rds = sotw(&out)[0].clone();
    assert_eq!(rds.type_url, ROUTE);
    s.handle_sotw(&sotw_req(ROUTE, &["gw"], &rds.version_info, &rds.nonce));
    for r in [cds, eds, lds, rds] {
        let t = *PUSH_ORDER.iter().find(|t| **t == r.type_url).unwrap();
        last.insert(t, (r.version_info, r.nonce));
    }
    assert!(s.poll().is_empty(), "nothing more to send once converged");
    assert!(s.in_sync());
    last
}

#[test]
fn sotw_start_up_sends_each_type_once_and_ack_commits() {
    let mut s = Stream::new(Mode::Sotw, gateway(&["a"]));
    let last = converge_sotw(&mut s, &["a"]);
    assert_eq!(last.len(), 4);
    let acked: Vec<_> = s
        .acked()
        .map(|(t, n, _)| (t.to_string(), n.to_string()))
        .collect();
    assert_eq!(acked.len(), 4);
}

#[test]
fn an_ack_is_never_answered_with_a_resend() {
    let mut s = Stream::new(Mode::Sotw, gateway(&["a"]));
    let last = converge_sotw(&mut s, &["a"]);
    let (v, n) = &last[ROUTE];
    // Envoy repeats its ACK (e.g. after a listener update re-subscribes the same names).
    let events = s.handle_sotw(&sotw_req(ROUTE, &["gw"], v, n));
    assert!(events.is_empty(), "{events:?}");
    assert!(s.poll().is_empty());
}

#[test]
fn first_response_is_sent_even_when_there_is_nothing() {
    let mut s = Stream::new(Mode::Sotw, Arc::new(ProxySnapshot::default()));
    s.handle_sotw(&sotw_req(CLUSTER, &[], "", ""));
    let out = s.poll();
    let r = sotw(&out);
    assert_eq!(
        r.len(),
        1,
        "Envoy waits for a first answer before it starts"
    );
    assert!(r[0].resources.is_empty());
    s.handle_sotw(&sotw_req(CLUSTER, &[], &r[0].version_info, &r[0].nonce));
    assert!(s.poll().is_empty());
}

#[test]
fn a_route_waits_until_the_cluster_it_uses_is_acknowledged() {
    let mut s = Stream::new(Mode::Sotw, gateway(&["a"]));
    let last = converge_sotw(&mut s, &["a"]);

    // The route now goes to a new cluster b.
    s.set_target(gateway(&["b"]));
    let out = s.poll();
    let r = sotw(&out);
    let types: Vec<&str> = r.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(types, vec![CLUSTER], "only the cluster goes first");
    // Cluster a stays: the route Envoy holds still uses it.
    assert_eq!(names_in(r[0]), vec!["a", "b"]);
    let cds = r[0].clone();

    // Envoy asks for b's endpoints; the route is still held back.
    s.handle_sotw(&sotw_req(
        ENDPOINT,
        &["a", "b"],
        &last[ENDPOINT].0,
        &last[ENDPOINT].1,
    ));
    let out = s.poll();
    let r = sotw(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].type_url, ENDPOINT);
    assert_eq!(names_in(r[0]), vec!["a", "b"]);
    let eds = r[0].clone();
    s.handle_sotw(&sotw_req(
        ENDPOINT,
        &["a", "b"],
        &eds.version_info,
        &eds.nonce,
    ));
    assert!(s.poll().is_empty(), "route waits for the cluster ACK");

    // Cluster b warmed and is acknowledged: now the route moves.
    s.handle_sotw(&sotw_req(CLUSTER, &[], &cds.version_info, &cds.nonce));
    let out = s.poll();
    let r = sotw(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].type_url, ROUTE);
    assert_eq!(route_targets(r[0]), "b");
    let rds = r[0].clone();
    s.handle_sotw(&sotw_req(ROUTE, &["gw"], &rds.version_info, &rds.nonce));

    // Nothing refers to a any more: only now is it removed.
    let out = s.poll();
    let r = sotw(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].type_url, CLUSTER);
    assert_eq!(names_in(r[0]), vec!["b"]);
}

#[test]
fn a_nack_keeps_the_last_good_config_and_the_same_version_is_not_resent() {
    let mut s = Stream::new(Mode::Sotw, gateway(&["a"]));
    let last = converge_sotw(&mut s, &["a"]);
    let before: Vec<_> = s
        .acked()
        .map(|(t, n, v)| (t.to_string(), n.to_string(), v.to_string()))
        .collect();

    // A listener change the proxy refuses.
    let mut bad = (*gateway(&["a"])).clone();
    bad.insert(listener("gw", "gw-but-broken"));
    let bad_version = bad.get(LISTENER, "gw").unwrap().version.clone();
    s.set_target(Arc::new(bad.clone()));
    let out = s.poll();
    let r = sotw(&out);
    assert_eq!(r.len(), 1);
    let lds = r[0].clone();
    let events = s.handle_sotw(&nack(LISTENER, &[], &last[LISTENER].0, &lds.nonce));
    assert_eq!(
        events,
        vec![Event::Nack {
            type_url: LISTENER.into(),
            rejected: vec![("gw".into(), bad_version)],
            parts: vec![],
            trying: vec![],
            message: "Proto constraint validation failed".into(),
        }]
    );
    let after: Vec<_> = s
        .acked()
        .map(|(t, n, v)| (t.to_string(), n.to_string(), v.to_string()))
        .collect();
    assert_eq!(before, after, "the proxy keeps what it had");
    assert!(s.poll().is_empty(), "the refused version is not sent again");

    // The same target published again (another object changed nothing here): still nothing.
    s.set_target(Arc::new(bad));
    assert!(s.poll().is_empty());

    // A corrected listener is sent.
    let mut fixed = (*gateway(&["a"])).clone();
    fixed.insert(listener("gw", "gw-fixed"));
    s.set_target(Arc::new(fixed));
    let out = s.poll();
    assert_eq!(sotw(&out).len(), 1);
}

#[test]
fn a_request_with_a_stale_nonce_is_ignored() {
    let mut s = Stream::new(Mode::Sotw, gateway(&["a"]));
    let last = converge_sotw(&mut s, &["a"]);
    s.set_target(gateway(&["a", "b"]));
    let out = s.poll();
    let cds = sotw(&out)[0].clone();
    assert_eq!(cds.type_url, CLUSTER);

    // A request answering the previous CDS response arrives late.
    let (v, n) = &last[CLUSTER];
    let events = s.handle_sotw(&sotw_req(CLUSTER, &[], v, n));
    assert_eq!(
        events,
        vec![Event::StaleNonce {
            type_url: CLUSTER.into()
        }]
    );
    assert!(
        s.poll().is_empty(),
        "no resend, the response in flight still stands"
    );

    let events = s.handle_sotw(&sotw_req(CLUSTER, &[], &cds.version_info, &cds.nonce));
    assert!(matches!(&events[..], [Event::Ack { .. }]));
}

#[test]
fn a_changed_cluster_gets_its_endpoints_again() {
    let mut s = Stream::new(Mode::Sotw, gateway(&["a"]));
    let last = converge_sotw(&mut s, &["a"]);

    let mut changed = (*gateway(&["a"])).clone();
    changed.insert(cluster("a", "new-connect-timeout"));
    s.set_target(Arc::new(changed));
    let out = s.poll();
    let r = sotw(&out);
    let types: Vec<&str> = r.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(
        types,
        vec![CLUSTER, ENDPOINT],
        "endpoints follow the cluster, unchanged or not"
    );
    assert_eq!(
        r[1].version_info, last[ENDPOINT].0,
        "same endpoint content, same version"
    );
}

#[test]
fn resubscribing_to_more_names_sends_them() {
    let mut s = Stream::new(Mode::Sotw, gateway(&["a", "b"]));
    s.handle_sotw(&sotw_req(ENDPOINT, &["a"], "", ""));
    let out = s.poll();
    let eds = sotw(&out)[0].clone();
    assert_eq!(names_in(&eds), vec!["a"]);
    s.handle_sotw(&sotw_req(ENDPOINT, &["a"], &eds.version_info, &eds.nonce));
    assert!(s.poll().is_empty());

    // The proxy now also wants b (same nonce: the subscription changed, not an answer).
    s.handle_sotw(&sotw_req(
        ENDPOINT,
        &["a", "b"],
        &eds.version_info,
        &eds.nonce,
    ));
    let out = s.poll();
    assert_eq!(names_in(sotw(&out)[0]), vec!["a", "b"]);
}

#[test]
fn a_sotw_proxy_that_reconnects_in_sync_is_sent_nothing() {
    let mut first = Stream::new(Mode::Sotw, gateway(&["a"]));
    let last = converge_sotw(&mut first, &["a"]);

    // The same proxy reconnects (to this or another replica) holding the same versions.
    let mut s = Stream::new(Mode::Sotw, gateway(&["a"]));
    s.handle_sotw(&sotw_req(CLUSTER, &[], &last[CLUSTER].0, ""));
    s.handle_sotw(&sotw_req(ENDPOINT, &["a"], &last[ENDPOINT].0, ""));
    s.handle_sotw(&sotw_req(LISTENER, &[], &last[LISTENER].0, ""));
    s.handle_sotw(&sotw_req(ROUTE, &["gw"], &last[ROUTE].0, ""));
    assert!(s.poll().is_empty());
    assert!(s.in_sync());

    // A stale one gets the current state.
    let mut s = Stream::new(Mode::Sotw, gateway(&["a", "b"]));
    s.handle_sotw(&sotw_req(CLUSTER, &[], &last[CLUSTER].0, ""));
    let out = s.poll();
    assert_eq!(names_in(sotw(&out)[0]), vec!["a", "b"]);
}

fn delta_req(type_url: &str, subscribe: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: "gateway-proxy".into(),
            ..Default::default()
        }),
        type_url: type_url.into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn delta(responses: &[Response]) -> Vec<&DeltaDiscoveryResponse> {
    responses
        .iter()
        .map(|r| match r {
            Response::Delta(r) => r,
            Response::Sotw(_) => panic!("SotW response on a delta stream"),
        })
        .collect()
}

fn delta_names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

/// Start-up of a delta stream; returns the versions the proxy holds.
fn converge_delta(s: &mut Stream, clusters: &[&str]) -> HashMapVersions {
    let mut held = HashMapVersions::new();
    s.handle_delta(&delta_req(CLUSTER, &[], ""));
    let out = s.poll();
    let cds = delta(&out)[0].clone();
    s.handle_delta(&delta_req(ENDPOINT, clusters, ""));
    let out = s.poll();
    let eds = delta(&out)[0].clone();
    s.handle_delta(&delta_req(CLUSTER, &[], &cds.nonce));
    s.handle_delta(&delta_req(ENDPOINT, &[], &eds.nonce));
    s.handle_delta(&delta_req(LISTENER, &[], ""));
    let out = s.poll();
    let lds = delta(&out)[0].clone();
    s.handle_delta(&delta_req(LISTENER, &[], &lds.nonce));
    s.handle_delta(&delta_req(ROUTE, &["gw"], ""));
    let out = s.poll();
    let rds = delta(&out)[0].clone();
    s.handle_delta(&delta_req(ROUTE, &[], &rds.nonce));
    for r in [cds, eds, lds, rds] {
        for res in r.resources {
            held.entry(r.type_url.clone())
                .or_default()
                .insert(res.name, res.version);
        }
    }
    assert!(s.poll().is_empty());
    assert!(s.in_sync());
    held
}

type HashMapVersions = BTreeMap<String, std::collections::HashMap<String, String>>;

#[test]
fn delta_sends_only_what_changed_and_removes_after_the_route_moved() {
    let mut s = Stream::new(Mode::Delta, gateway(&["a"]));
    converge_delta(&mut s, &["a"]);

    s.set_target(gateway(&["b"]));
    let out = s.poll();
    let r = delta(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].type_url, CLUSTER);
    assert_eq!(delta_names(r[0]), vec!["b"], "only the new cluster");
    assert!(r[0].removed_resources.is_empty(), "a is still in use");
    let cds = r[0].clone();

    s.handle_delta(&delta_req(ENDPOINT, &["b"], ""));
    let out = s.poll();
    let eds = delta(&out)[0].clone();
    assert_eq!(delta_names(&eds), vec!["b"]);
    s.handle_delta(&delta_req(ENDPOINT, &[], &eds.nonce));
    assert!(s.poll().is_empty(), "route waits for cluster b's ACK");

    s.handle_delta(&delta_req(CLUSTER, &[], &cds.nonce));
    let out = s.poll();
    let rds = delta(&out)[0].clone();
    assert_eq!(rds.type_url, ROUTE);
    s.handle_delta(&delta_req(ROUTE, &[], &rds.nonce));

    let out = s.poll();
    let r = delta(&out);
    assert_eq!(r[0].type_url, CLUSTER);
    assert!(r[0].resources.is_empty());
    assert_eq!(r[0].removed_resources, vec!["a".to_string()]);
}

#[test]
fn delta_reconnect_with_initial_versions_gets_only_the_difference() {
    let mut first = Stream::new(Mode::Delta, gateway(&["a"]));
    let held = converge_delta(&mut first, &["a"]);

    // Reconnect holding everything at current versions: nothing is sent.
    let mut s = Stream::new(Mode::Delta, gateway(&["a"]));
    for type_url in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        let mut req = delta_req(
            type_url,
            if type_url == ENDPOINT {
                &["a"]
            } else if type_url == ROUTE {
                &["gw"]
            } else {
                &[]
            },
            "",
        );
        req.initial_resource_versions = held[type_url].clone();
        s.handle_delta(&req);
    }
    assert!(s.poll().is_empty(), "a proxy in sync is sent nothing");
    assert!(s.in_sync());

    // Reconnect to a controller whose config moved on: only the changed cluster is sent.
    let mut target = (*gateway(&["a"])).clone();
    target.insert(cluster("a", "changed"));
    let mut s = Stream::new(Mode::Delta, Arc::new(target));
    let mut req = delta_req(CLUSTER, &[], "");
    req.initial_resource_versions = held[CLUSTER].clone();
    s.handle_delta(&req);
    let out = s.poll();
    let r = delta(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(delta_names(r[0]), vec!["a"]);
}

#[test]
fn delta_nack_is_reported_and_not_resent_but_other_changes_flow() {
    let mut s = Stream::new(Mode::Delta, gateway(&["a"]));
    converge_delta(&mut s, &["a"]);

    let mut bad = (*gateway(&["a", "b"])).clone();
    bad.insert(cluster("a", "refused"));
    s.set_target(Arc::new(bad.clone()));
    let out = s.poll();
    let cds = delta(&out)[0].clone();
    assert_eq!(delta_names(&cds), vec!["a", "b"]);
    let mut req = delta_req(CLUSTER, &[], &cds.nonce);
    req.error_detail = Some(Status {
        code: 3,
        message: "refused".into(),
        details: vec![],
    });
    let events = s.handle_delta(&req);
    assert!(matches!(&events[..], [Event::Nack { rejected, .. }] if rejected.len() == 2));
    assert!(s.poll().is_empty(), "the refused versions are not resent");

    // Cluster b changes again: it flows; the refused version of a stays held back.
    bad.insert(cluster("b", "b-v2"));
    s.set_target(Arc::new(bad));
    let out = s.poll();
    let r = delta(&out);
    assert_eq!(delta_names(r[0]), vec!["b"]);
}

#[test]
fn delta_unsubscribe_forgets_and_resubscribe_resends() {
    let mut s = Stream::new(Mode::Delta, gateway(&["a"]));
    converge_delta(&mut s, &["a"]);
    let mut req = delta_req(ENDPOINT, &[], "");
    req.resource_names_unsubscribe = vec!["a".into()];
    s.handle_delta(&req);
    assert!(
        s.poll().is_empty(),
        "nothing to send for an unsubscribed name"
    );
    s.handle_delta(&delta_req(ENDPOINT, &["a"], ""));
    let out = s.poll();
    assert_eq!(delta_names(delta(&out)[0]), vec!["a"]);
}

#[test]
fn delta_changed_cluster_resends_unchanged_endpoints() {
    let mut s = Stream::new(Mode::Delta, gateway(&["a"]));
    converge_delta(&mut s, &["a"]);
    let mut changed = (*gateway(&["a"])).clone();
    changed.insert(cluster("a", "x"));
    s.set_target(Arc::new(changed));
    let out = s.poll();
    let r = delta(&out);
    let types: Vec<&str> = r.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(types, vec![CLUSTER, ENDPOINT]);
    assert_eq!(delta_names(r[1]), vec!["a"]);
}

#[test]
fn one_response_per_type_in_flight_coalesces_bursts() {
    let mut s = Stream::new(Mode::Sotw, gateway(&["a"]));
    let _ = converge_sotw(&mut s, &["a"]);
    s.set_target(gateway(&["a", "b"]));
    let out = s.poll();
    let cds = sotw(&out)[0].clone();
    s.set_target(gateway(&["a", "b", "c"]));
    assert!(
        s.poll().is_empty(),
        "wait for the ACK before the next CDS push"
    );
    s.set_target(gateway(&["a", "b", "c", "d"]));
    s.handle_sotw(&sotw_req(CLUSTER, &[], &cds.version_info, &cds.nonce));
    let out = s.poll();
    let cds2 = sotw(&out)
        .into_iter()
        .find(|r| r.type_url == CLUSTER)
        .unwrap()
        .clone();
    assert_eq!(
        names_in(&cds2),
        vec!["a", "b", "c", "d"],
        "the latest state, once"
    );
}

/// A route configuration "gw" made of parts: one virtual host per (virtual service, content).
fn composed_routes(vhosts: &[(&str, &str)]) -> Resource {
    let mut parts = vec![Part::fields(
        "Gateway/gw",
        &RouteConfiguration {
            name: "gw".into(),
            ..Default::default()
        },
    )];
    for (vs, content) in vhosts {
        parts.push(Part::element(
            format!("VirtualService/{vs}"),
            2,
            &VirtualHost {
                name: vs.to_string(),
                domains: vec![content.to_string()],
                ..Default::default()
            },
            vec![ResourceRef::new(CLUSTER, "a")],
        ));
    }
    Resource::from_parts::<RouteConfiguration>(ROUTE, "gw", parts)
}

/// The usual gateway with a composed route configuration.
fn composed_gateway(vhosts: &[(&str, &str)]) -> Arc<ProxySnapshot> {
    let mut s = (*gateway(&["a"])).clone();
    s.insert(composed_routes(vhosts));
    Arc::new(s)
}

/// The virtual hosts of the one route configuration of a delta response, as (name, domain).
fn vhosts_in(r: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
    assert_eq!(r.type_url, ROUTE);
    let any = r.resources[0].resource.as_ref().unwrap();
    let rc = <RouteConfiguration as prost::Message>::decode(&*any.value).unwrap();
    assert_eq!(
        rc.name, "gw",
        "the fields around the virtual hosts are kept"
    );
    let mut v: Vec<(String, String)> = rc
        .virtual_hosts
        .into_iter()
        .map(|vh| (vh.name, vh.domains[0].clone()))
        .collect();
    v.sort();
    v
}

fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn refuse(s: &mut Stream, nonce: &str) -> Event {
    let mut req = delta_req(ROUTE, &[], nonce);
    req.error_detail = Some(Status {
        code: 13,
        message: "missing ): (unclosed\n".into(),
        details: vec![],
    });
    let mut events = s.handle_delta(&req);
    assert_eq!(events.len(), 1, "{events:?}");
    events.remove(0)
}

/// Sends what is due for routes; returns the one response.
fn route_response(s: &mut Stream) -> DeltaDiscoveryResponse {
    let out = s.poll();
    let r = delta(&out);
    assert_eq!(r.len(), 1, "{out:?}");
    r[0].clone()
}

#[test]
fn a_refused_virtual_service_freezes_only_itself() {
    let mut s = Stream::new(Mode::Delta, composed_gateway(&[("a", "a1"), ("b", "b1")]));
    converge_delta(&mut s, &["a"]);

    // Virtual service a changes to something the proxy refuses.
    s.set_target(composed_gateway(&[("a", "bad"), ("b", "b1")]));
    let r = route_response(&mut s);
    let event = refuse(&mut s, &r.nonce);
    let Event::Nack { parts, trying, .. } = &event else {
        panic!("{event:?}")
    };
    assert_eq!(parts, &[("gw".to_string(), "VirtualService/a".to_string())]);
    assert!(trying.is_empty());
    assert!(s.poll().is_empty(), "the refused version is not sent again");

    // b changes: it goes out, with a as the proxy last accepted it.
    s.set_target(composed_gateway(&[("a", "bad"), ("b", "b2")]));
    let r = route_response(&mut s);
    assert_eq!(vhosts_in(&r), owned(&[("a", "a1"), ("b", "b2")]));
    s.handle_delta(&delta_req(ROUTE, &[], &r.nonce));
    assert!(!s.in_sync(), "a is not what the target says");

    // a is fixed: the target goes out whole.
    s.set_target(composed_gateway(&[("a", "a2"), ("b", "b2")]));
    let r = route_response(&mut s);
    assert_eq!(vhosts_in(&r), owned(&[("a", "a2"), ("b", "b2")]));
    s.handle_delta(&delta_req(ROUTE, &[], &r.nonce));
    assert!(s.in_sync());
}

#[test]
fn a_refusal_of_several_changes_is_narrowed_down_one_at_a_time() {
    let mut s = Stream::new(
        Mode::Delta,
        composed_gateway(&[("a", "a1"), ("b", "b1"), ("c", "c1")]),
    );
    converge_delta(&mut s, &["a"]);

    // a, b and c change in one response; b is the bad one.
    s.set_target(composed_gateway(&[("a", "a2"), ("b", "bad"), ("c", "c2")]));
    let r = route_response(&mut s);
    let event = refuse(&mut s, &r.nonce);
    assert!(
        matches!(&event, Event::Nack { parts, trying, .. } if parts.is_empty() && trying == &["gw"]),
        "{event:?}"
    );

    // a alone: accepted.
    let r = route_response(&mut s);
    assert_eq!(
        vhosts_in(&r),
        owned(&[("a", "a2"), ("b", "b1"), ("c", "c1")])
    );
    let events = s.handle_delta(&delta_req(ROUTE, &[], &r.nonce));
    assert!(matches!(&events[..], [Event::Ack { .. }]), "{events:?}");

    // b alone: refused, and blamed.
    let r = route_response(&mut s);
    assert_eq!(
        vhosts_in(&r),
        owned(&[("a", "a2"), ("b", "bad"), ("c", "c1")])
    );
    let event = refuse(&mut s, &r.nonce);
    assert!(
        matches!(&event, Event::Nack { parts, .. } if parts == &[("gw".to_string(), "VirtualService/b".to_string())]),
        "{event:?}"
    );

    // c alone: accepted.
    let r = route_response(&mut s);
    assert_eq!(
        vhosts_in(&r),
        owned(&[("a", "a2"), ("b", "b1"), ("c", "c2")])
    );
    s.handle_delta(&delta_req(ROUTE, &[], &r.nonce));
    // b was refused with c's old version beside it: it is tried once more now, refused, and
    // then nothing more is due.
    let r = route_response(&mut s);
    assert_eq!(
        vhosts_in(&r),
        owned(&[("a", "a2"), ("b", "bad"), ("c", "c2")])
    );
    let event = refuse(&mut s, &r.nonce);
    assert!(
        matches!(&event, Event::Nack { parts, .. } if parts == &[("gw".to_string(), "VirtualService/b".to_string())]),
        "{event:?}"
    );
    assert!(s.poll().is_empty());
    // What status reads: the parts the proxy holds, b at its last good version.
    let acked: BTreeMap<String, String> = s
        .acked_parts()
        .filter(|(t, ..)| *t == ROUTE)
        .map(|(_, _, key, version)| (key.to_string(), version.to_string()))
        .collect();
    let expected: BTreeMap<String, String> =
        composed_routes(&[("a", "a2"), ("b", "b1"), ("c", "c2")])
            .parts
            .into_iter()
            .map(|p| (p.key, p.version))
            .collect();
    assert_eq!(acked, expected);
}

#[test]
fn a_refused_removal_keeps_the_virtual_service() {
    let mut s = Stream::new(Mode::Delta, composed_gateway(&[("a", "a1"), ("b", "b1")]));
    converge_delta(&mut s, &["a"]);
    s.set_target(composed_gateway(&[("a", "a1")]));
    let r = route_response(&mut s);
    assert_eq!(vhosts_in(&r), owned(&[("a", "a1")]));
    let event = refuse(&mut s, &r.nonce);
    assert!(
        matches!(&event, Event::Nack { parts, .. } if parts == &[("gw".to_string(), "VirtualService/b".to_string())]),
        "{event:?}"
    );
    assert!(
        s.poll().is_empty(),
        "what the proxy holds is the target with b kept"
    );
}

#[test]
fn a_new_route_configuration_is_narrowed_down_on_top_of_its_fields() {
    // The proxy starts up; its first route configuration has a bad virtual service.
    let mut s = Stream::new(Mode::Delta, composed_gateway(&[("a", "a1"), ("b", "bad")]));
    for (type_url, names) in [(CLUSTER, vec![]), (ENDPOINT, vec!["a"]), (LISTENER, vec![])] {
        s.handle_delta(&delta_req(type_url, &names, ""));
        let out = s.poll();
        let r = delta(&out)[0].clone();
        s.handle_delta(&delta_req(type_url, &[], &r.nonce));
    }
    s.handle_delta(&delta_req(ROUTE, &["gw"], ""));
    let r = route_response(&mut s);
    assert_eq!(vhosts_in(&r), owned(&[("a", "a1"), ("b", "bad")]));
    let event = refuse(&mut s, &r.nonce);
    assert!(
        matches!(&event, Event::Nack { trying, .. } if trying == &["gw"]),
        "{event:?}"
    );
    // a alone, on top of the fields: accepted.
    let r = route_response(&mut s);
    assert_eq!(vhosts_in(&r), owned(&[("a", "a1")]));
    s.handle_delta(&delta_req(ROUTE, &[], &r.nonce));
    // b alone: refused and blamed; then it settles with a served.
    let r = route_response(&mut s);
    assert_eq!(vhosts_in(&r), owned(&[("a", "a1"), ("b", "bad")]));
    let event = refuse(&mut s, &r.nonce);
    assert!(
        matches!(&event, Event::Nack { parts, .. } if parts == &[("gw".to_string(), "VirtualService/b".to_string())]),
        "{event:?}"
    );
    assert!(s.poll().is_empty(), "it settles");
}

/// b was refused only because a, refused itself, still held the domain b takes over: once a
/// changes and is accepted, b goes through.
#[test]
fn a_part_refused_because_of_another_is_tried_again_when_the_other_changes() {
    let mut s = Stream::new(
        Mode::Delta,
        composed_gateway(&[("a", "x.com"), ("b", "y.com")]),
    );
    converge_delta(&mut s, &["a"]);
    // One edit: a gives x.com up but is bad; b takes x.com. (The stream cannot tell why a
    // proxy refuses; here both trials are refused, as Envoy would refuse b beside the old a.)
    s.set_target(composed_gateway(&[("a", "bad"), ("b", "x.com")]));
    for _ in 0..3 {
        let r = route_response(&mut s);
        refuse(&mut s, &r.nonce);
    }
    assert!(s.poll().is_empty(), "both judged bad");
    // a is fixed: accepted; then b is tried again and accepted.
    s.set_target(composed_gateway(&[("a", "z.com"), ("b", "x.com")]));
    let r = route_response(&mut s);
    assert_eq!(vhosts_in(&r), owned(&[("a", "z.com"), ("b", "y.com")]));
    s.handle_delta(&delta_req(ROUTE, &[], &r.nonce));
    let r = route_response(&mut s);
    assert_eq!(vhosts_in(&r), owned(&[("a", "z.com"), ("b", "x.com")]));
    s.handle_delta(&delta_req(ROUTE, &[], &r.nonce));
    assert!(s.poll().is_empty());
    assert!(s.in_sync());
}

/// Two route configurations change in one response and it is refused: neither is blamed until
/// each change was tried alone, one response at a time.
#[test]
fn a_refusal_of_two_route_configurations_blames_only_the_bad_one() {
    let two = |x: &str, y: &str| {
        let mut snapshot = (*gateway(&["a"])).clone();
        let mut g1 = composed_routes(&[("x", x)]);
        g1.name = "g1".into();
        let mut g2 = composed_routes(&[("y", y)]);
        g2.name = "g2".into();
        snapshot.insert(g1);
        snapshot.insert(g2);
        Arc::new(snapshot)
    };
    let mut s = Stream::new(Mode::Delta, two("x1", "y1"));
    for (type_url, names) in [(CLUSTER, vec![]), (ENDPOINT, vec!["a"]), (LISTENER, vec![])] {
        s.handle_delta(&delta_req(type_url, &names, ""));
        let out = s.poll();
        let r = delta(&out)[0].clone();
        s.handle_delta(&delta_req(type_url, &[], &r.nonce));
    }
    s.handle_delta(&delta_req(ROUTE, &["g1", "g2"], ""));
    let out = s.poll();
    let r = delta(&out)[0].clone();
    s.handle_delta(&delta_req(ROUTE, &[], &r.nonce));
    assert!(s.poll().is_empty());

    s.set_target(two("x2", "bad"));
    let out = s.poll();
    let r = delta(&out)[0].clone();
    assert_eq!(r.resources.len(), 2);
    let event = refuse(&mut s, &r.nonce);
    assert!(
        matches!(&event, Event::Nack { parts, trying, .. } if parts.is_empty() && trying.len() == 2),
        "{event:?}"
    );
    // One resource's change at a time.
    let mut blamed = Vec::new();
    for _ in 0..4 {
        let out = s.poll();
        let Some(r) = delta(&out).first().map(|r| (*r).clone()) else {
            break;
        };
        let changed: Vec<&str> = r.resources.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(changed.len(), 1, "{changed:?}");
        if changed == ["g2"] {
            if let Event::Nack { parts, .. } = refuse(&mut s, &r.nonce) {
                blamed.extend(parts);
            }
        } else {
            s.handle_delta(&delta_req(ROUTE, &[], &r.nonce));
        }
    }
    assert_eq!(blamed, [("g2".to_string(), "VirtualService/y".to_string())]);
    assert!(s.poll().is_empty());
}

/// A proxy that reconnects while a virtual service is refused holds a composition: the new
/// stream of the same server recognises it, and goes on narrowing down instead of judging the
/// whole route configuration.
#[test]
fn a_reconnecting_proxy_is_known_to_hold_the_composition_it_was_sent() {
    for mode in [Mode::Delta, Mode::Sotw] {
        let memory = Arc::new(SentMemory::default());
        let target = || composed_gateway(&[("a", "bad"), ("b", "b2")]);
        let mut s = Stream::new(mode, composed_gateway(&[("a", "a1"), ("b", "b1")]))
            .remembering(memory.clone());
        // Start-up, then a refused change of a and an accepted change of b.
        let mut nonces = BTreeMap::new();
        for (type_url, names) in [
            (CLUSTER, vec![]),
            (ENDPOINT, vec!["a"]),
            (LISTENER, vec![]),
            (ROUTE, vec!["gw"]),
        ] {
            let r = if mode == Mode::Delta {
                s.handle_delta(&delta_req(type_url, &names, ""));
                let out = s.poll();
                let nonce = out[0].nonce().to_string();
                s.handle_delta(&delta_req(type_url, &[], &nonce));
                nonce
            } else {
                s.handle_sotw(&sotw_req(type_url, &names, "", ""));
                let out = s.poll();
                let r = sotw(&out)[0].clone();
                s.handle_sotw(&sotw_req(type_url, &names, &r.version_info, &r.nonce));
                r.nonce
            };
            nonces.insert(type_url, r);
        }
        s.set_target(target());
        let mut held_version = String::new();
        for _ in 0..6 {
            let out = s.poll();
            let Some(r) = out.first() else { break };
            let nonce = r.nonce().to_string();
            let (refused, version) = match r {
                Response::Delta(d) => (
                    vhosts_in(d).iter().any(|(_, c)| c == "bad"),
                    d.resources[0].version.clone(),
                ),
                Response::Sotw(d) => {
                    let rc = <RouteConfiguration as prost::Message>::decode(&*d.resources[0].value)
                        .unwrap();
                    (
                        rc.virtual_hosts.iter().any(|v| v.domains[0] == "bad"),
                        d.version_info.clone(),
                    )
                }
            };
            if refused {
                if mode == Mode::Delta {
                    refuse(&mut s, &nonce);
                } else {
                    s.handle_sotw(&nack(ROUTE, &["gw"], "", &nonce));
                }
            } else {
                if mode == Mode::Delta {
                    s.handle_delta(&delta_req(ROUTE, &[], &nonce));
                } else {
                    s.handle_sotw(&sotw_req(ROUTE, &["gw"], &version, &nonce));
                }
                held_version = version;
            }
        }
        assert!(s.poll().is_empty(), "{mode:?}: settled with a held back");
        assert!(!memory.is_empty());

        // The proxy reconnects, to a new stream of the same server, holding that composition.
        let mut again = Stream::new(mode, target()).remembering(memory.clone());
        if mode == Mode::Delta {
            let mut req = delta_req(ROUTE, &["gw"], "");
            req.initial_resource_versions = [("gw".to_string(), held_version.clone())].into();
            again.handle_delta(&req);
        } else {
            again.handle_sotw(&sotw_req(ROUTE, &["gw"], &held_version, ""));
        }
        // The new stream cannot know a's version was refused: it tries the target once, and
        // since it knows what the proxy holds, the refusal is blamed on a alone.
        let out = again.poll();
        let r = out
            .iter()
            .find(|r| r.type_url() == ROUTE)
            .expect("the target, once");
        let nonce = r.nonce().to_string();
        let event = if mode == Mode::Delta {
            refuse(&mut again, &nonce)
        } else {
            again
                .handle_sotw(&nack(ROUTE, &["gw"], "", &nonce))
                .remove(0)
        };
        assert!(
            matches!(&event, Event::Nack { parts, .. } if parts == &[("gw".to_string(), "VirtualService/a".to_string())]),
            "{mode:?}: {event:?}"
        );
        assert!(
            again.poll().iter().all(|r| r.type_url() != ROUTE),
            "{mode:?}: settled again"
        );
    }
}

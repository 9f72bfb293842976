//! Translation is deterministic and does not depend on the order sources were
//! loaded in, nor on how documents are spread over files.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use vmesh_model::{ConfigSet, SourceMode};
use vmesh_translate::{render::render_translation, translate};

const UPSTREAMS: [&str; 3] = ["u1", "u2", "u3"];
const DOMAINS: [&str; 4] = ["a.com", "b.com", "*", "*.c.com"];
const PROXIES: [&str; 2] = ["p1", "p2"];

fn upstream_doc() -> impl Strategy<Value = Option<String>> {
    // None: the upstream is not defined; Some(text) with a valid or invalid spec.
    prop_oneof![
        Just(None),
        (1u16..4, 1u32..4).prop_map(|(port, w)| Some(format!(
            "static:\n    hosts:\n      - address: 10.0.0.{port}\n        port: 80{port}\n        weight: {w}\n"
        ))),
        Just(Some("static:\n    hosts: []\n".to_string())),
    ]
}

fn route() -> impl Strategy<Value = String> {
    // u4 never exists.
    let upstream = prop::sample::select(vec!["u1", "u2", "u3", "u4"]);
    prop_oneof![
        upstream.clone().prop_map(|u| format!("    - upstream: {u}\n")),
        (upstream.clone(), upstream, 1u32..5).prop_filter_map("distinct", |(a, b, w)| {
            (a != b).then(|| format!(
                "    - match: {{prefix: /s}}\n      split: [{{upstream: {a}, weight: {w}}}, {{upstream: {b}, weight: 1}}]\n"
            ))
        }),
        Just("    - match: {exact: /d}\n      directResponse: {status: 200, body: hi}\n".to_string()),
        Just("    - redirect: {httpsRedirect: true}\n".to_string()),
    ]
}

fn virtual_service() -> impl Strategy<Value = Option<String>> {
    prop::option::of((
        prop::sample::subsequence(DOMAINS.to_vec(), 1..=3),
        prop::collection::vec(route(), 1..4),
    ))
    .prop_map(|o| {
        o.map(|(domains, routes)| {
            let domains: Vec<String> = domains.iter().map(|d| format!("'{d}'")).collect();
            format!(
                "domains: [{}]\n  routes:\n{}",
                domains.join(", "),
                routes.concat()
            )
        })
    })
}

fn gateway() -> impl Strategy<Value = Option<String>> {
    prop::option::of((
        prop::sample::select(vec!["0.0.0.0", "127.0.0.1"]),
        80u16..82,
        prop::sample::subsequence(PROXIES.to_vec(), 1..=2),
        prop::option::of(prop::sample::subsequence(
            vec!["v1", "v2", "v3", "v9"],
            1..=2,
        )),
    ))
    .prop_map(|o| {
        o.map(|(addr, port, proxies, vss)| {
            let mut s = format!(
                "bindAddress: {addr}\n  bindPort: {port}\n  proxyNames: [{}]\n",
                proxies.join(", ")
            );
            if let Some(vss) = vss {
                s.push_str(&format!("  virtualServices: [{}]\n", vss.join(", ")));
            }
            s
        })
    })
}

/// Documents (each with a distinct key), as YAML texts.
fn documents() -> impl Strategy<Value = Vec<String>> {
    (
        prop::collection::vec(upstream_doc(), 3),
        prop::collection::vec(virtual_service(), 3),
        prop::collection::vec(gateway(), 2),
    )
        .prop_map(|(us, vss, gws)| {
            let mut docs = Vec::new();
            for (name, spec) in UPSTREAMS.iter().zip(us) {
                if let Some(spec) = spec {
                    docs.push(format!("kind: Upstream\nname: {name}\nspec:\n  {spec}"));
                }
            }
            for (name, spec) in ["v1", "v2", "v3"].iter().zip(vss) {
                if let Some(spec) = spec {
                    docs.push(format!(
                        "kind: VirtualService\nname: {name}\nspec:\n  {spec}"
                    ));
                }
            }
            for (name, spec) in ["g1", "g2"].iter().zip(gws) {
                if let Some(spec) = spec {
                    docs.push(format!("kind: Gateway\nname: {name}\nspec:\n  {spec}"));
                }
            }
            docs
        })
}

fn load(sources: &[(String, String)]) -> ConfigSet {
    let mut set = ConfigSet::new();
    for (name, text) in sources {
        set.upsert_source(name, text, SourceMode::MultiDoc);
    }
    set
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn translation_is_deterministic_and_independent_of_source_order(
        (docs, order) in documents().prop_flat_map(|docs| {
            let n = docs.len();
            (Just(docs), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
        })
    ) {
        // One file per document, loaded in document order and in a shuffled order.
        let sources: Vec<(String, String)> = docs
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("doc-{i}.yaml"), d.clone()))
            .collect();
        let shuffled: Vec<(String, String)> = order.iter().map(|&i| sources[i].clone()).collect();
        let a = translate(&load(&sources).snapshot());
        let b = translate(&load(&shuffled).snapshot());
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(render_translation(&a), render_translation(&b));
        // Translating the same config twice gives the same result.
        let again = translate(&load(&sources).snapshot());
        prop_assert_eq!(&a, &again);

        // All documents in one file, in the order of the files' paths (the order that decides
        // a contested domain): same resources for every proxy.
        let c = translate(&load(&[("all.yaml".to_string(), docs.join("---\n"))]).snapshot());
        prop_assert_eq!(&a.proxies, &c.proxies);
        let states_a: Vec<_> = a.reports.iter().map(|(k, r)| (k.clone(), r.state, r.warnings.clone(), r.errors.clone())).collect();
        let states_c: Vec<_> = c.reports.iter().map(|(k, r)| (k.clone(), r.state, r.warnings.clone(), r.errors.clone())).collect();
        prop_assert_eq!(states_a, states_c);

        // Every resource a proxy holds names the objects it came from, and every
        // reference points at a resource the proxy also holds.
        for output in a.proxies.values() {
            for (type_url, resources) in &output.snapshot.resources {
                for (name, resource) in resources {
                    prop_assert!(output.origins.contains_key(&(*type_url, name.clone())));
                    for r in &resource.refs {
                        prop_assert!(output.snapshot.get(r.type_url, &r.name).is_some(), "dangling ref {:?}", r);
                    }
                }
            }
        }
    }
}

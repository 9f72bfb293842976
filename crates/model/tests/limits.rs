//! The limits on one document and one object (`vmesh_model::limits`, `docs/limits.md`): each is
//! reported on the field that exceeds it, and going over costs no more than the limit.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use vmesh_model::limits::*;
use vmesh_model::{parse_single, Parsed, Problem};

fn list(n: usize, item: impl Fn(usize) -> Value) -> Value {
    Value::Array((0..n).map(item).collect())
}

fn route(i: usize) -> Value {
    json!({"match": {"prefix": format!("/r{i}")}, "upstream": "web"})
}

#[test]
fn every_list_of_an_object_has_a_limit_reported_on_it() {
    let cases = [
        (
            set(
                virtual_service(),
                "/spec/domains",
                list(MAX_DOMAINS + 1, |i| json!(format!("d{i}.example.com"))),
            ),
            "spec.domains",
            MAX_DOMAINS,
        ),
        (
            set(
                virtual_service(),
                "/spec/routes",
                list(MAX_ROUTES + 1, route),
            ),
            "spec.routes",
            MAX_ROUTES,
        ),
        (
            set(
                virtual_service(),
                "/spec/routes/0",
                json!({"split": list(MAX_SPLIT + 1, |i| json!({"upstream": format!("u{i}"), "weight": 1}))}),
            ),
            "spec.routes[0].split",
            MAX_SPLIT,
        ),
        (
            set(
                virtual_service(),
                "/spec/routes/0/match",
                json!({"headers": list(MAX_MATCHERS + 1, |i| json!({"name": format!("x-{i}"), "present": true}))}),
            ),
            "spec.routes[0].match.headers",
            MAX_MATCHERS,
        ),
        (
            set(
                upstream(),
                "/spec/static/hosts",
                list(
                    MAX_HOSTS + 1,
                    |i| json!({"address": format!("10.0.{}.{}", i / 250, i % 250), "port": 80}),
                ),
            ),
            "spec.static.hosts",
            MAX_HOSTS,
        ),
        (
            set(
                gateway(),
                "/spec/proxyNames",
                list(MAX_PROXY_NAMES + 1, |i| json!(format!("p{i}"))),
            ),
            "spec.proxyNames",
            MAX_PROXY_NAMES,
        ),
    ];
    for (doc, path, max) in cases {
        let found = problems(doc);
        let want = format!("{path}: has {} entries; the limit is {max}", max + 1);
        assert!(found.contains(&want), "{want} in {found:?}");
        assert!(
            found.len() < 5,
            "only the first {max} entries are checked: {found:?}"
        );
    }
}

#[test]
fn regexes_are_bounded_per_object_and_in_length() {
    let doc = set(
        virtual_service(),
        "/spec/routes",
        list(
            MAX_REGEXES + 1,
            |i| json!({"match": {"regex": format!("^/r{i}/.*$")}, "upstream": "web"}),
        ),
    );
    assert_problem(
        doc,
        "spec.routes",
        &format!(
            "the routes hold {} regexes; the limit is {MAX_REGEXES}",
            MAX_REGEXES + 1
        ),
    );
    let long = set(
        virtual_service(),
        "/spec/routes/0/match",
        json!({"regex": "a".repeat(MAX_REGEX_BYTES + 1)}),
    );
    assert_problem(
        long,
        "spec.routes[0].match.regex",
        &format!(
            "the regex is {} bytes long; the limit is {MAX_REGEX_BYTES}",
            MAX_REGEX_BYTES + 1
        ),
    );
}

#[test]
fn a_huge_value_is_quoted_only_in_part() {
    let address = "x".repeat(500 * 1024);
    let doc = set(upstream(), "/spec/static/hosts/0/address", json!(address));
    let found = problems(doc);
    assert!(
        found.iter().all(|p| p.len() < 2 * MAX_PROBLEM_TEXT),
        "{found:?}"
    );
    assert!(found[0].contains("bytes in all)"), "{:?}", found[0]);
}

#[test]
fn long_problem_lists_are_summarised() {
    let problems: Vec<Problem> = (0..100)
        .map(|i| Problem::new(format!("p{i}"), "bad"))
        .collect();
    let shown = shown(&problems);
    assert_eq!(shown.len(), MAX_PROBLEMS_SHOWN);
    assert_eq!(shown.last().unwrap().message, "and 81 more problems");
    assert_eq!(shown[..19], problems[..19]);
    assert_eq!(vmesh_model::limits::shown(&problems[..3]).len(), 3);
}

#[test]
fn duplicate_keys_reject_the_object_on_the_field() {
    let text = "kind: Upstream\nname: web\nspec:\n  static:\n    hosts:\n      - address: 10.0.0.1\n        port: 80\n        port: 81\n";
    let Err(problem) = parse_single(text) else {
        panic!("refused");
    };
    assert_eq!(problem.path, "spec.static.hosts[0].port");
    assert!(problem.message.starts_with("duplicate key \"port\""));
}

#[test]
fn an_integer_out_of_range_is_a_problem_of_its_field_only() {
    let text = "kind: Upstream\nname: web\nspec:\n  static:\n    hosts:\n      - address: 10.0.0.1\n        port: 99999999999999999999\n";
    let Ok(Parsed::Document(doc)) = parse_single(text) else {
        panic!("the document parses");
    };
    let errors = doc.result.unwrap_err();
    assert_eq!(errors[0].path, "spec.static.hosts[0].port", "{errors:?}");
}

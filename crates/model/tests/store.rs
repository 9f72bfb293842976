//! ConfigSet: last-good versions, syntax errors, duplicates and deletes, as the
//! config directory and Consul KV sources drive it.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use vmesh_model::{ConfigSet, ObjectKey, SourceMode, State};

const WEB_V1: &str = "kind: Upstream\nname: web\nspec:\n  static:\n    hosts:\n      - address: 10.0.0.1\n        port: 80\n";
const WEB_V2: &str = "kind: Upstream\nname: web\nspec:\n  static:\n    hosts:\n      - address: 10.0.0.2\n        port: 80\n";
const WEB_BAD: &str = "kind: Upstream\nname: web\nspec:\n  static:\n    hosts:\n      - address: web.internal\n        port: 0\n";
const EDGE: &str = "kind: Gateway\nname: edge\nspec:\n  bindPort: 10000\n";
const BROKEN_YAML: &str = "kind: Upstream\nname: web\n  spec: [\n";

fn web() -> ObjectKey {
    ObjectKey::upstream("web")
}

fn address(set: &ConfigSet) -> Option<String> {
    let config = set.snapshot();
    let spec = config.upstreams.get("web")?;
    Some(spec.static_hosts.as_ref()?.hosts[0].address.clone())
}

#[test]
fn a_valid_document_is_accepted_and_served() {
    let mut set = ConfigSet::new();
    assert!(set.upsert_source("a.yaml", WEB_V1, SourceMode::MultiDoc));
    let config = set.snapshot();
    let report = &config.reports[&web()];
    assert_eq!(report.state, State::Accepted);
    assert!(report.errors.is_empty() && report.warnings.is_empty());
    assert_eq!(report.source, "a.yaml");
    assert!(!report.serving_last_good);
    assert_eq!(
        report.serving_version.as_deref(),
        Some(report.version.as_str())
    );
    assert_eq!(address(&set).as_deref(), Some("10.0.0.1"));
    assert!(config.source_errors.is_empty());
}

#[test]
fn versions_are_content_hashes_stable_across_processes() {
    let mut set = ConfigSet::new();
    set.upsert_source("a.yaml", WEB_V1, SourceMode::MultiDoc);
    let version = set.snapshot().reports[&web()].version.clone();
    // Hash of the canonical JSON of the document: fixed forever, on every machine.
    assert_eq!(version, "c88665a5d4d2b9b2");
    // Formatting and key order do not change it.
    let mut other = ConfigSet::new();
    other.upsert_source(
        "b.json",
        r#"{"spec": {"static": {"hosts": [{"port": 80, "address": "10.0.0.1"}]}}, "name": "web", "kind": "Upstream"}"#,
        SourceMode::SingleDoc,
    );
    assert_eq!(other.snapshot().reports[&web()].version, version);
}

#[test]
fn upserting_the_same_text_changes_nothing() {
    let mut set = ConfigSet::new();
    assert!(set.upsert_source("a.yaml", WEB_V1, SourceMode::MultiDoc));
    assert!(!set.upsert_source("a.yaml", WEB_V1, SourceMode::MultiDoc));
    // A comment changes the text but not the objects.
    assert!(!set.upsert_source("a.yaml", &format!("# hi\n{WEB_V1}"), SourceMode::MultiDoc));
    assert!(set.upsert_source("a.yaml", WEB_V2, SourceMode::MultiDoc));
}

#[test]
fn an_invalid_update_keeps_serving_the_last_good_version() {
    let mut set = ConfigSet::new();
    set.upsert_source("a.yaml", WEB_V1, SourceMode::MultiDoc);
    let good_version = set.snapshot().reports[&web()].version.clone();
    assert!(set.upsert_source("a.yaml", WEB_BAD, SourceMode::MultiDoc));

    let config = set.snapshot();
    let report = &config.reports[&web()];
    assert_eq!(report.state, State::Rejected);
    assert!(report.serving_last_good);
    assert_eq!(report.serving_version.as_ref(), Some(&good_version));
    assert_ne!(report.version, good_version);
    let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        vec![
            "spec.static.hosts[0].address: \"web.internal\" must be an IP address; DNS names are not supported yet",
            "spec.static.hosts[0].port: must be between 1 and 65535",
        ]
    );
    assert_eq!(address(&set).as_deref(), Some("10.0.0.1"));

    // Fixing it serves the new version.
    set.upsert_source("a.yaml", WEB_V2, SourceMode::MultiDoc);
    assert_eq!(set.snapshot().reports[&web()].state, State::Accepted);
    assert_eq!(address(&set).as_deref(), Some("10.0.0.2"));
}

#[test]
fn an_object_that_was_never_valid_is_reported_but_not_served() {
    let mut set = ConfigSet::new();
    set.upsert_source("a.yaml", WEB_BAD, SourceMode::MultiDoc);
    let config = set.snapshot();
    let report = &config.reports[&web()];
    assert_eq!(report.state, State::Rejected);
    assert!(!report.serving_last_good);
    assert_eq!(report.serving_version, None);
    assert!(config.upstreams.is_empty());
}

#[test]
fn a_syntax_error_keeps_every_object_of_the_source() {
    let mut set = ConfigSet::new();
    set.upsert_source(
        "a.yaml",
        &format!("{WEB_V1}---\n{EDGE}"),
        SourceMode::MultiDoc,
    );
    assert!(set.upsert_source("a.yaml", BROKEN_YAML, SourceMode::MultiDoc));

    let config = set.snapshot();
    for key in [web(), ObjectKey::gateway("edge")] {
        let report = &config.reports[&key];
        assert_eq!(report.state, State::Rejected, "{key}");
        assert!(report.serving_last_good, "{key}");
        assert_eq!(report.errors.len(), 1);
        assert!(report.errors[0].message.starts_with("invalid YAML: "));
        assert!(
            report.errors[0].message.contains("line 3 column"),
            "{}",
            report.errors[0]
        );
    }
    assert!(config.upstreams.contains_key("web"));
    assert!(config.gateways.contains_key("edge"));
    assert_eq!(config.source_errors["a.yaml"].len(), 1);

    // Once fixed, the file's content is taken as is: the gateway it no longer has is gone.
    set.upsert_source("a.yaml", WEB_V2, SourceMode::MultiDoc);
    let config = set.snapshot();
    assert_eq!(config.reports[&web()].state, State::Accepted);
    assert!(!config.reports.contains_key(&ObjectKey::gateway("edge")));
    assert!(config.gateways.is_empty());
    assert!(config.source_errors.is_empty());
}

#[test]
fn a_syntax_error_in_a_new_source_invents_no_object() {
    let mut set = ConfigSet::new();
    set.upsert_source("new.yaml", BROKEN_YAML, SourceMode::MultiDoc);
    let config = set.snapshot();
    assert!(config.reports.is_empty());
    let problems = &config.source_errors["new.yaml"];
    assert_eq!(problems.len(), 1);
    assert!(problems[0].to_string().starts_with("invalid YAML: "));
}

#[test]
fn documents_without_a_key_are_source_errors() {
    let mut set = ConfigSet::new();
    let text = format!("{WEB_V1}---\nkind: Service\nname: x\nspec: {{}}\n---\nkind: Gateway\nname: Bad_Name\nspec: {{}}\n");
    set.upsert_source("a.yaml", &text, SourceMode::MultiDoc);
    let config = set.snapshot();
    let problems: Vec<String> = config.source_errors["a.yaml"]
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(problems.len(), 2);
    assert!(
        problems[0].starts_with("documents[1].kind: unknown kind \"Service\""),
        "{problems:?}"
    );
    assert!(
        problems[1].starts_with("documents[2].name: invalid name \"Bad_Name\""),
        "{problems:?}"
    );
    // The good document of the same file is unaffected.
    assert_eq!(config.reports[&web()].state, State::Accepted);

    // A single-document source reports paths without a document index.
    let mut kv = ConfigSet::new();
    kv.upsert_source(
        "vmesh/config/Upstream/x",
        "kind: Upstream\nspec: {}\n",
        SourceMode::SingleDoc,
    );
    let problems = &kv.snapshot().source_errors["vmesh/config/Upstream/x"];
    assert_eq!(problems[0].to_string(), "name: required field is missing");
}

#[test]
fn a_single_document_source_with_two_documents_is_an_error() {
    let mut set = ConfigSet::new();
    set.upsert_source(
        "kv/web",
        &format!("{WEB_V1}---\n{EDGE}"),
        SourceMode::SingleDoc,
    );
    let config = set.snapshot();
    assert!(config.reports.is_empty());
    assert_eq!(
        config.source_errors["kv/web"][0].to_string(),
        "expected exactly one document, found 2"
    );
}

#[test]
fn deleting_a_source_deletes_its_objects_and_their_last_good_versions() {
    let mut set = ConfigSet::new();
    set.upsert_source("a.yaml", WEB_V1, SourceMode::MultiDoc);
    set.upsert_source("a.yaml", WEB_BAD, SourceMode::MultiDoc);
    assert!(set.remove_source("a.yaml"));
    assert!(!set.remove_source("a.yaml"));
    let config = set.snapshot();
    assert!(config.reports.is_empty() && config.upstreams.is_empty());

    // Coming back invalid, it has no last good version any more.
    set.upsert_source("a.yaml", WEB_BAD, SourceMode::MultiDoc);
    assert!(set.snapshot().upstreams.is_empty());
}

#[test]
fn removing_a_document_from_a_file_deletes_the_object() {
    let mut set = ConfigSet::new();
    set.upsert_source(
        "a.yaml",
        &format!("{WEB_V1}---\n{EDGE}"),
        SourceMode::MultiDoc,
    );
    set.upsert_source("a.yaml", EDGE, SourceMode::MultiDoc);
    let config = set.snapshot();
    assert!(!config.reports.contains_key(&web()));
    assert!(config.upstreams.is_empty());
    assert!(config.gateways.contains_key("edge"));
}

#[test]
fn the_source_that_sorts_first_owns_a_duplicated_object() {
    let mut set = ConfigSet::new();
    set.upsert_source("b.yaml", WEB_V2, SourceMode::MultiDoc);
    set.upsert_source("a.yaml", WEB_V1, SourceMode::MultiDoc);
    let config = set.snapshot();
    let report = &config.reports[&web()];
    assert_eq!(report.source, "a.yaml");
    assert_eq!(report.state, State::Accepted);
    assert_eq!(address(&set).as_deref(), Some("10.0.0.1"));
    assert_eq!(
        config.source_errors["b.yaml"][0].to_string(),
        "documents[0]: Upstream/web is also defined in a.yaml, which takes precedence; this definition is ignored"
    );
    assert!(!config.source_errors.contains_key("a.yaml"));

    // Validity does not move ownership: a broken a.yaml keeps serving its last good version.
    set.upsert_source("a.yaml", WEB_BAD, SourceMode::MultiDoc);
    let config = set.snapshot();
    assert_eq!(config.reports[&web()].source, "a.yaml");
    assert_eq!(config.reports[&web()].state, State::Rejected);
    assert_eq!(address(&set).as_deref(), Some("10.0.0.1"));

    // Once a.yaml is gone, b.yaml's version takes over.
    set.remove_source("a.yaml");
    let config = set.snapshot();
    assert_eq!(config.reports[&web()].source, "b.yaml");
    assert_eq!(config.reports[&web()].state, State::Accepted);
    assert_eq!(address(&set).as_deref(), Some("10.0.0.2"));
    assert!(config.source_errors.is_empty());
}

#[test]
fn within_one_source_the_first_document_wins() {
    let mut set = ConfigSet::new();
    set.upsert_source(
        "a.yaml",
        &format!("{WEB_V1}---\n{WEB_V2}"),
        SourceMode::MultiDoc,
    );
    let config = set.snapshot();
    assert_eq!(address(&set).as_deref(), Some("10.0.0.1"));
    assert_eq!(
        config.source_errors["a.yaml"][0].to_string(),
        "documents[1]: Upstream/web is already defined in documents[0] of this source; this definition is ignored"
    );
}

#[test]
fn snapshots_do_not_depend_on_upsert_order() {
    let sources = [
        ("a.yaml", WEB_V1),
        ("b.yaml", WEB_V2),
        ("c.yaml", EDGE),
        ("d.yaml", WEB_BAD),
    ];
    let mut forward = ConfigSet::new();
    for (s, t) in sources {
        forward.upsert_source(s, t, SourceMode::MultiDoc);
    }
    let mut backward = ConfigSet::new();
    for (s, t) in sources.iter().rev() {
        backward.upsert_source(s, t, SourceMode::MultiDoc);
    }
    assert_eq!(forward.snapshot(), backward.snapshot());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the text, parsing never panics and the store stays consistent.
    #[test]
    fn random_text_never_panics(text in "\\PC{0,200}", single in any::<bool>()) {
        let mode = if single { SourceMode::SingleDoc } else { SourceMode::MultiDoc };
        let mut set = ConfigSet::new();
        set.upsert_source("a", WEB_V1, SourceMode::MultiDoc);
        set.upsert_source("a", &text, mode);
        let config = set.snapshot();
        for report in config.reports.values() {
            prop_assert_eq!(report.state == State::Rejected, !report.errors.is_empty());
        }
    }

    /// Mutations of a real document (YAML-ish noise) never panic either.
    #[test]
    fn mutated_documents_never_panic(
        cut in 0usize..400,
        insert in "[-:{}\\[\\]#&*!|>'\" \n\ta-z0-9]{0,12}",
    ) {
        let base = include_str!("../../../examples/reference/everything.yaml");
        let at = base.char_indices().map(|(i, _)| i).nth(cut % base.len()).unwrap_or(0);
        let text = format!("{}{}{}", &base[..at], insert, &base[at..]);
        let mut set = ConfigSet::new();
        set.upsert_source("x.yaml", &text, SourceMode::MultiDoc);
        let _ = set.snapshot();
    }
}

mod keyed {
    //! Sources that are one object by name (Consul keys `vmesh/config/<Kind>/<name>`).
    use vmesh_model::{ConfigSet, ObjectKey, State};

    const WEB: &str = "kind: Upstream\nname: web\nspec:\n  static:\n    hosts: [{address: 127.0.0.1, port: 8080}]\n";

    #[test]
    fn a_value_that_names_another_object_is_rejected_under_its_key() {
        let mut set = ConfigSet::new();
        let key = ObjectKey::upstream("shop");
        assert!(set.upsert_keyed("vmesh/config/Upstream/shop", &key, WEB));
        let c = set.snapshot();
        let r = &c.reports[&key];
        assert_eq!(r.state, State::Rejected);
        assert_eq!(r.errors[0].path, "name");
        assert!(
            r.errors[0]
                .message
                .contains("Upstream/web but its key says Upstream/shop"),
            "{r:?}"
        );
        assert!(c.upstreams.is_empty(), "nothing is served");
        assert!(!c.reports.contains_key(&ObjectKey::upstream("web")));
    }

    #[test]
    fn a_value_that_does_not_parse_is_rejected_and_keeps_the_last_good_version() {
        let mut set = ConfigSet::new();
        let key = ObjectKey::upstream("web");
        set.upsert_keyed("vmesh/config/Upstream/web", &key, WEB);
        assert!(set.upsert_keyed("vmesh/config/Upstream/web", &key, "kind: [unclosed"));
        let c = set.snapshot();
        let r = &c.reports[&key];
        assert_eq!(r.state, State::Rejected);
        assert!(r.serving_last_good);
        assert!(c.upstreams.contains_key("web"));
        assert!(r.errors[0].message.contains("line"), "{r:?}");

        // Not even YAML, never valid: still reported under its key, not as a stray problem.
        let other = ObjectKey::virtual_service("shop");
        set.upsert_keyed(
            "vmesh/config/VirtualService/shop",
            &other,
            "\u{1}\u{2}: : :",
        );
        let c = set.snapshot();
        assert_eq!(c.reports[&other].state, State::Rejected);
        assert!(c.source_errors.is_empty(), "{:?}", c.source_errors);
    }

    #[test]
    fn the_same_value_twice_is_no_change() {
        let mut set = ConfigSet::new();
        let key = ObjectKey::upstream("web");
        assert!(set.upsert_keyed("k", &key, WEB));
        assert!(!set.upsert_keyed("k", &key, WEB));
        assert!(set.remove_source("k"));
        assert!(set.snapshot().reports.is_empty());
    }
}

mod rejected_sources {
    use vmesh_model::{ConfigSet, ObjectKey, Problem, State};

    #[test]
    fn a_source_rejected_before_parsing_keeps_the_last_good_version_of_its_object() {
        let mut set = ConfigSet::new();
        let key = ObjectKey::upstream("web");
        set.upsert_keyed(
            "k",
            &key,
            "kind: Upstream\nname: web\nspec:\n  static:\n    hosts: [{address: 127.0.0.1, port: 80}]\n",
        );
        assert!(set.reject_source(
            "k",
            Some(&key),
            Problem::new("", "the value is not UTF-8 text")
        ));
        let c = set.snapshot();
        assert_eq!(c.reports[&key].state, State::Rejected);
        assert!(c.reports[&key].serving_last_good);
        assert!(c.upstreams.contains_key("web"));
    }

    #[test]
    fn a_source_that_names_no_object_is_a_source_problem() {
        let mut set = ConfigSet::new();
        set.reject_source(
            "vmesh/config/readme",
            None,
            Problem::new("", "not <Kind>/<name>"),
        );
        let c = set.snapshot();
        assert!(c.reports.is_empty());
        assert_eq!(
            c.source_errors["vmesh/config/readme"][0].message,
            "not <Kind>/<name>"
        );
    }
}

#[test]
fn claims_follow_consul_creation_then_file_order_then_document_order() {
    let vs = |name: &str| {
        format!("kind: VirtualService\nname: {name}\nspec:\n  domains: ['*']\n  routes:\n    - directResponse: {{status: 200}}\n")
    };
    let mut set = ConfigSet::new();
    set.upsert_source(
        "b.yaml",
        &format!("{}---\n{}", vs("zz"), vs("aa")),
        SourceMode::MultiDoc,
    );
    set.upsert_source("a.yaml", &vs("mm"), SourceMode::MultiDoc);
    let claims = set.snapshot().claims;
    let order = |claims: &std::collections::BTreeMap<ObjectKey, vmesh_model::Claim>| {
        let mut keys: Vec<(vmesh_model::Claim, String)> =
            claims.iter().map(|(k, c)| (*c, k.name.clone())).collect();
        keys.sort();
        keys.into_iter().map(|(_, n)| n).collect::<Vec<_>>()
    };
    // a.yaml before b.yaml; in b.yaml, zz (first document) before aa.
    assert_eq!(order(&claims), ["mm", "zz", "aa"]);

    // Consul keys: the older key first, whatever the names.
    let mut set = ConfigSet::new();
    for (name, created) in [("a", 30), ("b", 10), ("c", 20)] {
        let source = format!("vmesh/config/VirtualService/{name}");
        set.upsert_keyed(&source, &ObjectKey::virtual_service(name), &vs(name));
        assert!(set.set_created(&source, created));
        assert!(
            !set.set_created(&source, created),
            "no change the second time"
        );
    }
    assert_eq!(order(&set.snapshot().claims), ["b", "c", "a"]);
    // A key deleted and created again is a new claim.
    set.remove_source("vmesh/config/VirtualService/b");
    set.upsert_keyed(
        "vmesh/config/VirtualService/b",
        &ObjectKey::virtual_service("b"),
        &vs("b"),
    );
    set.set_created("vmesh/config/VirtualService/b", 40);
    assert_eq!(order(&set.snapshot().claims), ["c", "a", "b"]);
}

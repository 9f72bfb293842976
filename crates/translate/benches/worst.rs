//! What the worst documents cost: each document a hostile writer could put in one Consul KV value
//! or one file, within the limits of `vmesh_model::limits` (`docs/limits.md`), read and judged the
//! way the controller's sources do (`ParsedSource::keyed`), and — for the valid ones — translated
//! with a gateway. The refused ones show how early a limit stops them.
//!
//! Run: `cargo bench -p vmesh-translate --bench worst` (release build). Prints, per document, its
//! size, the outcome and the median and maximum of 5 runs.

use std::hint::black_box;
use std::time::{Duration, Instant};

use vmesh_model::limits::{MAX_DOCUMENT_BYTES, MAX_NESTING, MAX_REGEXES, MAX_ROUTES};
use vmesh_model::{ConfigSet, ObjectKey, ParsedSource};

const RUNS: usize = 5;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("worst: run with `cargo bench -p vmesh-translate --bench worst`");
        return;
    }
    let cases: Vec<(&str, ObjectKey, String)> = vec![
        (
            "one 200 KB anchor used 70,000 times",
            ObjectKey::upstream("a"),
            alias_bomb(),
        ),
        (
            "flow mappings nested 100,000 deep",
            ObjectKey::upstream("a"),
            deep_flow(100_000),
        ),
        (
            "flow sequences nested 63 deep, repeated to the size limit",
            ObjectKey::upstream("a"),
            repeated_nesting(),
        ),
        (
            "the most values: [0, 0, 0, ...]",
            ObjectKey::upstream("a"),
            many_values(),
        ),
        (
            "one 500 KiB string",
            ObjectKey::upstream("a"),
            long_string(),
        ),
        (
            "a split over 14,000 missing upstreams",
            ObjectKey::virtual_service("v"),
            wide_split(),
        ),
        (
            "the largest valid VirtualService: 200 routes, 64 regexes of 1 KiB",
            ObjectKey::virtual_service("v"),
            largest_virtual_service(),
        ),
    ];
    println!(
        "| document | bytes | outcome | read + judge, median (max) | translate, median (max) |"
    );
    println!("| --- | ---: | --- | ---: | ---: |");
    for (name, key, text) in cases {
        assert!(
            text.len() <= MAX_DOCUMENT_BYTES,
            "{name}: {} bytes",
            text.len()
        );
        let mut parse_times = Vec::new();
        let mut parsed = None;
        for _ in 0..RUNS {
            let t0 = Instant::now();
            let p = black_box(ParsedSource::keyed(&key, &text));
            parse_times.push(t0.elapsed());
            parsed = Some(p);
        }
        let mut set = ConfigSet::new();
        set.upsert_source(
            "gateway.yaml",
            "kind: Gateway\nname: edge\nspec:\n  bindPort: 10000\n",
            vmesh_model::SourceMode::MultiDoc,
        );
        set.upsert_source(
            "web.yaml",
            "kind: Upstream\nname: web\nspec:\n  static:\n    hosts: [{address: 10.0.0.1, port: 80}]\n",
            vmesh_model::SourceMode::MultiDoc,
        );
        set.apply("value", parsed.expect("parsed"));
        let config = set.snapshot();
        let report = &config.reports[&key];
        let outcome = match report.errors.first() {
            Some(p) => format!("{:?}: {}", report.state, clip(&p.to_string())),
            None => format!("{:?}", report.state),
        };
        let mut translate_times = Vec::new();
        for _ in 0..RUNS {
            let t0 = Instant::now();
            black_box(vmesh_translate::translate(&config));
            translate_times.push(t0.elapsed());
        }
        println!(
            "| {name} | {} | {outcome} | {} | {} |",
            text.len(),
            stats(&mut parse_times),
            stats(&mut translate_times)
        );
    }
}

fn clip(s: &str) -> String {
    let s: String = s.chars().take(70).collect();
    s.replace('|', "\\|")
}

fn stats(times: &mut [Duration]) -> String {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "{:.2} ms ({:.2})",
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    )
}

fn alias_bomb() -> String {
    let big = "x".repeat(200_000);
    let aliases = "*x, ".repeat(70_000);
    format!("kind: Upstream\nname: a\nspec:\n  static:\n    hosts: [&x \"{big}\", {aliases}]\n")
}

fn deep_flow(depth: usize) -> String {
    format!(
        "kind: Upstream\nname: a\nspec: {}1{}\n",
        "{a: ".repeat(depth),
        "}".repeat(depth)
    )
}

fn repeated_nesting() -> String {
    let depth = MAX_NESTING - 1;
    let one = format!("{}{}", "[".repeat(depth - 2), "]".repeat(depth - 2));
    let mut text = String::from("kind: Upstream\nname: a\nspec:\n  x: [");
    while text.len() + one.len() + 8 < MAX_DOCUMENT_BYTES {
        text.push_str(&one);
        text.push_str(", ");
    }
    text.push_str("]\n");
    text
}

fn many_values() -> String {
    let mut text = String::from("kind: Upstream\nname: a\nspec:\n  x: [");
    while text.len() + 8 < MAX_DOCUMENT_BYTES {
        text.push_str("0, ");
    }
    text.push_str("]\n");
    text
}

fn long_string() -> String {
    format!(
        "kind: Upstream\nname: a\nspec:\n  static:\n    hosts: [{{address: \"{}\", port: 80}}]\n",
        "1".repeat(500 * 1024)
    )
}

fn wide_split() -> String {
    let backends: Vec<String> = (0..14_000)
        .map(|i| format!("{{upstream: m{i}, weight: 1}}"))
        .collect();
    format!(
        "kind: VirtualService\nname: v\nspec:\n  domains: [v.example.com]\n  routes:\n    - split: [{}]\n",
        backends.join(", ")
    )
}

fn largest_virtual_service() -> String {
    let mut text = String::from(
        "kind: VirtualService\nname: v\nspec:\n  domains: [v.example.com]\n  routes:\n",
    );
    for i in 0..MAX_ROUTES {
        if i < MAX_REGEXES {
            // About a kilobyte of alternation, the kind that costs a regex engine most to
            // compile.
            let mut regex = String::from("^/(?:");
            let mut k = 0;
            while regex.len() < 1000 {
                regex.push_str(&format!("r{i}x{k:03}|"));
                k += 1;
            }
            regex.pop();
            regex.push_str(")/.*$");
            text.push_str(&format!(
                "    - match: {{regex: '{regex}'}}\n      upstream: web\n"
            ));
        } else {
            text.push_str(&format!(
                "    - match: {{prefix: /p{i}/}}\n      upstream: web\n"
            ));
        }
    }
    text
}

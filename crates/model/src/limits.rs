//! The limits on what a config document may cost, the same wherever it comes from (a file of the
//! config directory, a Consul KV value, `vmeshctl apply` or `validate`). `docs/limits.md` lists
//! every limit of vmesh with its value; these are the document's.
//!
//! They bound what one document can cost to read — memory and time — so that no single write
//! can stall or crash the controller: a text at most [`MAX_DOCUMENT_BYTES`] long, nested at most
//! [`MAX_NESTING`] deep, that expands (YAML aliases included) to at most [`MAX_EXPANDED_BYTES`]
//! of keys and strings in at most [`MAX_NODES`] values.

/// The largest document text (a file, or a Consul KV value): Consul's own default value limit.
pub const MAX_DOCUMENT_BYTES: usize = 512 * 1024;

/// How deep collections may nest (sequences and mappings, flow or block). A real document
/// nests about ten levels; deep flow nesting costs the YAML parser quadratic time.
pub const MAX_NESTING: usize = 64;

/// The most bytes of keys and strings a text may expand to, aliases expanded: four times the
/// largest text, so no alias may multiply a document much beyond what it could spell out.
pub const MAX_EXPANDED_BYTES: usize = 4 * MAX_DOCUMENT_BYTES;

/// The most values (scalars, sequences, mappings) a text may expand to, aliases expanded.
pub const MAX_NODES: usize = 200_000;

/// The problem of a text over [`MAX_DOCUMENT_BYTES`], in the same words for every source.
pub fn too_large(bytes: usize) -> String {
    format!(
        "the document is {} KiB; the limit is {} KiB",
        bytes.div_ceil(1024),
        MAX_DOCUMENT_BYTES / 1024
    )
}

/// The problem of a text with no document in it (empty, or only comments and `---`), in the
/// same words for every source. A file emptied by mistake (or by an editor that truncates
/// before it writes) keeps its objects at their last accepted version, as a Consul value does.
pub const EMPTY_TEXT: &str =
    "the document is empty: no YAML or JSON document in it (remove the file or key to remove its objects)";

/// The problem of bytes that are not UTF-8 text, in the same words for every source.
pub const NOT_TEXT: &str = "the document is not UTF-8 text (YAML or JSON expected)";

/// The text of a document read as bytes (a file, a KV value): at most [`MAX_DOCUMENT_BYTES`]
/// long and UTF-8, or the problem, in the same words for every source.
pub fn document_text(bytes: Vec<u8>) -> Result<String, crate::Problem> {
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(crate::Problem::new("", too_large(bytes.len())));
    }
    String::from_utf8(bytes).map_err(|_| crate::Problem::new("", NOT_TEXT))
}

/// The longest path or message of a [`crate::Problem`] (a message may quote the value at fault);
/// longer ones are cut, saying how long they were.
pub const MAX_PROBLEM_TEXT: usize = 512;

/// Problems of one object (or one source) that a status shows; the rest are counted in a last
/// problem ("and N more").
pub const MAX_PROBLEMS_SHOWN: usize = 20;

// What one object may hold. Each bounds what translating it, and Envoy's config, can cost; each is
// reported on the list that is too long, and only the first that many entries are checked.

/// `spec.domains` of a VirtualService.
pub const MAX_DOMAINS: usize = 100;
/// The largest `directResponse.body` (the gateway's route configuration allows this much).
pub const MAX_DIRECT_RESPONSE_BODY: usize = 64 * 1024;
/// `spec.routes` of a VirtualService.
pub const MAX_ROUTES: usize = 200;
/// `split` of one route.
pub const MAX_SPLIT: usize = 32;
/// `match.headers`, and likewise `match.queryParameters`, of one route.
pub const MAX_MATCHERS: usize = 16;
/// Headers one route adds or removes (`options.requestHeaders` / `responseHeaders`, each list).
pub const MAX_HEADER_MUTATIONS: usize = 32;
/// Regexes in one VirtualService (path and header and query parameter matches).
pub const MAX_REGEXES: usize = 64;
/// The longest regex.
pub const MAX_REGEX_BYTES: usize = 1024;
/// `spec.static.hosts` of an Upstream.
pub const MAX_HOSTS: usize = 256;
/// `spec.consul.tags` and `spec.consul.datacenters` of an Upstream, each.
pub const MAX_CONSUL_FILTERS: usize = 16;
/// `spec.proxyNames` of a Gateway.
pub const MAX_PROXY_NAMES: usize = 64;
/// `spec.virtualServices` of a Gateway.
pub const MAX_GATEWAY_VIRTUAL_SERVICES: usize = 500;

/// The problem of a list longer than `max`, at `path`.
pub fn too_many(path: &str, len: usize, max: usize) -> crate::Problem {
    crate::Problem::new(path, format!("has {len} entries; the limit is {max}"))
}

/// The first `max` entries of `items` (the ones that are checked), after recording a problem
/// when there are more.
pub(crate) fn at_most<'a, T>(
    path: &str,
    items: &'a [T],
    max: usize,
    problems: &mut Vec<crate::Problem>,
) -> &'a [T] {
    if items.len() > max {
        problems.push(too_many(path, items.len(), max));
        &items[..max]
    } else {
        items
    }
}

/// `problems` cut to [`MAX_PROBLEMS_SHOWN`], the last one saying how many more there were.
pub fn shown(problems: &[crate::Problem]) -> Vec<crate::Problem> {
    if problems.len() <= MAX_PROBLEMS_SHOWN {
        return problems.to_vec();
    }
    let mut out = problems[..MAX_PROBLEMS_SHOWN - 1].to_vec();
    out.push(crate::Problem::new(
        "",
        format!(
            "and {} more problems",
            problems.len() - (MAX_PROBLEMS_SHOWN - 1)
        ),
    ));
    out
}

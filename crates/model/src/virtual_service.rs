//! `kind: VirtualService`: domains and the ordered routes that serve them.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::limits::{
    at_most, MAX_DIRECT_RESPONSE_BODY, MAX_DOMAINS, MAX_HEADER_MUTATIONS, MAX_MATCHERS,
    MAX_REGEXES, MAX_ROUTES, MAX_SPLIT,
};
use crate::problem::{field, index, Problem};
use crate::validate::{
    check_header_value, check_http_path, check_match_header_name, check_mutable_header_name,
    check_name, check_regex, Problems,
};

pub const DEFAULT_RETRY_ON: &str = "5xx,connect-failure,reset";

/// The `retry_on` values of Envoy's router that `retries.retryOn` accepts.
pub const RETRY_ON_VALUES: [&str; 8] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "retriable-status-codes",
    "retriable-headers",
];

/// `retry_on` values of Envoy's that can never fire on a vmesh route (its upstreams speak
/// HTTP/1.1), with why.
const RETRY_ON_NEVER: [(&str, &str); 2] = [
    (
        "refused-stream",
        "an HTTP/2 REFUSED_STREAM, and vmesh speaks HTTP/1.1 to upstreams",
    ),
    (
        "http3-post-connect-failure",
        "an HTTP/3 failure, and vmesh speaks HTTP/1.1 to upstreams",
    ),
];

const MAX_RETRY_ATTEMPTS: u32 = 10;
/// The longest `timeout` and `perTryTimeout`.
pub const MAX_ROUTE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Envoy's route timeout when `timeout` is not set.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
const REDIRECT_CODES: [u16; 5] = [301, 302, 303, 307, 308];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
}

/// One route. Exactly one action (`upstream`, `split`, `redirect`, `directResponse`)
/// must be set; [`Route::action`] returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Route {
    /// Omitted: every request (prefix "/").
    #[serde(rename = "match", default, skip_serializing_if = "Option::is_none")]
    pub route_match: Option<RouteMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Vec<SplitBackend>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<RouteOptions>,
}

/// The action of a validated route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteAction<'a> {
    Upstream(&'a str),
    Split(&'a [SplitBackend]),
    Redirect(&'a Redirect),
    DirectResponse(&'a DirectResponse),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default = "yes")]
    pub case_sensitive: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_parameters: Vec<QueryParameterMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<Method>,
}

fn yes() -> bool {
    true
}

impl Default for RouteMatch {
    fn default() -> Self {
        Self {
            prefix: None,
            exact: None,
            regex: None,
            case_sensitive: true,
            headers: vec![],
            query_parameters: vec![],
            methods: vec![],
        }
    }
}

/// The path part of a match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathMatch<'a> {
    Prefix(&'a str),
    Exact(&'a str),
    Regex(&'a str),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invert: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct QueryParameterMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// What a header or query parameter matcher checks, once validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueMatch<'a> {
    Exact(&'a str),
    Regex(&'a str),
    Present(bool),
}

fn value_match<'a>(
    value: &'a Option<String>,
    regex: &'a Option<String>,
    present: Option<bool>,
) -> Option<ValueMatch<'a>> {
    match (value, regex, present) {
        (Some(v), None, None) => Some(ValueMatch::Exact(v)),
        (None, Some(r), None) => Some(ValueMatch::Regex(r)),
        (None, None, Some(p)) => Some(ValueMatch::Present(p)),
        _ => None,
    }
}

impl HeaderMatch {
    pub fn value_match(&self) -> Option<ValueMatch<'_>> {
        value_match(&self.value, &self.regex, self.present)
    }
}

impl QueryParameterMatch {
    pub fn value_match(&self) -> Option<ValueMatch<'_>> {
        value_match(&self.value, &self.regex, self.present)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Connect => "CONNECT",
            Method::Options => "OPTIONS",
            Method::Trace => "TRACE",
            Method::Patch => "PATCH",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SplitBackend {
    pub upstream: String,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Redirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_redirect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_redirect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    #[serde(default)]
    pub https_redirect: bool,
    #[serde(default)]
    pub strip_query: bool,
    #[serde(default = "default_redirect_code")]
    pub response_code: u16,
}

fn default_redirect_code() -> u16 {
    301
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteOptions {
    /// Whole-request timeout; "0s" disables it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderMutations>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderMutations>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retries {
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    #[serde(default = "default_retry_on")]
    pub retry_on: String,
    /// The status codes `retriable-status-codes` retries on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    /// The response headers `retriable-headers` retries on (when present).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_headers: Vec<String>,
}

fn default_retry_on() -> String {
    DEFAULT_RETRY_ON.to_string()
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderMutations {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderAdd>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderAdd {
    pub name: String,
    pub value: String,
    /// Add another value when the header exists (true) or replace it (false).
    #[serde(default)]
    pub append: bool,
}

impl Route {
    /// The action, or `None` when the route sets none or several (invalid).
    pub fn action(&self) -> Option<RouteAction<'_>> {
        let mut actions = self.actions();
        match (actions.next(), actions.next()) {
            (Some(a), None) => Some(a),
            _ => None,
        }
    }

    fn actions(&self) -> impl Iterator<Item = RouteAction<'_>> {
        [
            self.upstream.as_deref().map(RouteAction::Upstream),
            self.split.as_deref().map(RouteAction::Split),
            self.redirect.as_ref().map(RouteAction::Redirect),
            self.direct_response
                .as_ref()
                .map(RouteAction::DirectResponse),
        ]
        .into_iter()
        .flatten()
    }

    /// The effective path match: the one set, or prefix "/" when none is.
    pub fn path_match(&self) -> PathMatch<'_> {
        self.route_match
            .as_ref()
            .and_then(RouteMatch::path_match)
            .unwrap_or(PathMatch::Prefix("/"))
    }

    /// Names of the upstreams this route sends traffic to, in order.
    pub fn upstream_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.upstream.as_deref().into_iter().collect();
        if let Some(split) = &self.split {
            names.extend(split.iter().map(|b| b.upstream.as_str()));
        }
        names
    }

    /// How many regexes the route's match holds.
    fn regex_count(&self) -> usize {
        self.route_match.as_ref().map_or(0, |m| {
            usize::from(m.regex.is_some())
                + m.headers.iter().filter(|h| h.regex.is_some()).count()
                + m.query_parameters
                    .iter()
                    .filter(|q| q.regex.is_some())
                    .count()
        })
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        let count = self.actions().count();
        if count != 1 {
            let what = if count == 0 { "one" } else { "only one" };
            problems.push(Problem::new(
                path,
                format!("set {what} action of upstream, split, redirect, directResponse"),
            ));
        }
        if let Some(m) = &self.route_match {
            m.validate(&field(path, "match"), problems);
        }
        if let Some(upstream) = &self.upstream {
            check_name(&field(path, "upstream"), upstream, problems);
        }
        if let Some(split) = &self.split {
            validate_split(&field(path, "split"), split, problems);
        }
        if let Some(redirect) = &self.redirect {
            redirect.validate(&field(path, "redirect"), problems);
        }
        if let Some(direct) = &self.direct_response {
            direct.validate(&field(path, "directResponse"), problems);
        }
        if let Some(options) = &self.options {
            let forwards = self.upstream.is_some() || self.split.is_some();
            let prefix_match = matches!(self.path_match(), PathMatch::Prefix(_));
            options.validate(&field(path, "options"), forwards, prefix_match, problems);
        }
    }
}

impl RouteMatch {
    /// The path match that is set, if any.
    pub fn path_match(&self) -> Option<PathMatch<'_>> {
        self.prefix
            .as_deref()
            .map(PathMatch::Prefix)
            .or(self.exact.as_deref().map(PathMatch::Exact))
            .or(self.regex.as_deref().map(PathMatch::Regex))
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        let set = [&self.prefix, &self.exact, &self.regex]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if set > 1 {
            problems.push(Problem::new(
                path,
                "set at most one of prefix, exact, regex",
            ));
        }
        if let Some(prefix) = &self.prefix {
            check_http_path(&field(path, "prefix"), prefix, problems);
        }
        if let Some(exact) = &self.exact {
            check_http_path(&field(path, "exact"), exact, problems);
        }
        if let Some(regex) = &self.regex {
            check_regex(&field(path, "regex"), regex, problems);
            if !self.case_sensitive {
                // Envoy ignores case_sensitive for regex matches; say so rather than surprise.
                problems.push(Problem::new(
                    field(path, "caseSensitive"),
                    "does not apply to a regex match; use (?i) in the regex",
                ));
            }
        }
        let headers_path = field(path, "headers");
        let headers = at_most(&headers_path, &self.headers, MAX_MATCHERS, problems);
        for (i, h) in headers.iter().enumerate() {
            let p = index(&headers_path, i);
            check_match_header_name(&field(&p, "name"), &h.name, problems);
            validate_value_match(&p, &h.value, &h.regex, h.present, problems);
        }
        let query_path = field(path, "queryParameters");
        let query = at_most(&query_path, &self.query_parameters, MAX_MATCHERS, problems);
        for (i, q) in query.iter().enumerate() {
            let p = index(&query_path, i);
            if q.name.is_empty() {
                problems.push(Problem::new(field(&p, "name"), "must not be empty"));
            }
            validate_value_match(&p, &q.value, &q.regex, q.present, problems);
        }
        let methods_path = field(path, "methods");
        let mut seen = BTreeSet::new();
        for (i, m) in self.methods.iter().enumerate() {
            if !seen.insert(*m) {
                problems.push(Problem::new(
                    index(&methods_path, i),
                    format!("duplicate method {}", m.as_str()),
                ));
            }
        }
    }
}

fn validate_value_match(
    path: &str,
    value: &Option<String>,
    regex: &Option<String>,
    present: Option<bool>,
    problems: &mut Problems,
) {
    let set = usize::from(value.is_some())
        + usize::from(regex.is_some())
        + usize::from(present.is_some());
    if set != 1 {
        problems.push(Problem::new(
            path,
            "set exactly one of value, regex, present",
        ));
    }
    if let Some(regex) = regex {
        check_regex(&field(path, "regex"), regex, problems);
    }
}

fn validate_split(path: &str, split: &[SplitBackend], problems: &mut Problems) {
    if split.is_empty() {
        problems.push(Problem::new(path, "must list at least one backend"));
    }
    let mut seen = BTreeSet::new();
    let mut total: u64 = 0;
    let checked = at_most(path, split, MAX_SPLIT, problems);
    for (i, backend) in checked.iter().enumerate() {
        let p = index(path, i);
        check_name(&field(&p, "upstream"), &backend.upstream, problems);
        total += u64::from(backend.weight);
        if !seen.insert(backend.upstream.as_str()) {
            problems.push(Problem::new(
                field(&p, "upstream"),
                format!("duplicate upstream {:?} in split", backend.upstream),
            ));
        }
    }
    if total > u64::from(u32::MAX) {
        problems.push(Problem::new(path, "total weight must fit in 32 bits"));
    }
    // A weight of 0 parks a backend (a canary at 0 %), but something must get the traffic.
    if total == 0 && !split.is_empty() {
        problems.push(Problem::new(path, "weights must add up to more than 0"));
    }
}

impl Redirect {
    fn validate(&self, path: &str, problems: &mut Problems) {
        let changes = self.host_redirect.is_some()
            || self.path_redirect.is_some()
            || self.prefix_rewrite.is_some()
            || self.https_redirect
            || self.strip_query;
        if !changes {
            problems.push(Problem::new(
                path,
                "set at least one of hostRedirect, pathRedirect, prefixRewrite, httpsRedirect, stripQuery",
            ));
        }
        if self.path_redirect.is_some() && self.prefix_rewrite.is_some() {
            problems.push(Problem::new(
                path,
                "pathRedirect and prefixRewrite cannot both be set",
            ));
        }
        if let Some(host) = &self.host_redirect {
            if !is_valid_authority(host) {
                problems.push(Problem::new(
                    field(path, "hostRedirect"),
                    format!("{host:?} is not a valid host name"),
                ));
            }
        }
        if let Some(p) = &self.path_redirect {
            check_http_path(&field(path, "pathRedirect"), p, problems);
        }
        if let Some(p) = &self.prefix_rewrite {
            check_http_path(&field(path, "prefixRewrite"), p, problems);
        }
        if !REDIRECT_CODES.contains(&self.response_code) {
            problems.push(Problem::new(
                field(path, "responseCode"),
                "must be one of 301, 302, 303, 307, 308",
            ));
        }
    }
}

impl DirectResponse {
    fn validate(&self, path: &str, problems: &mut Problems) {
        if !(200..=599).contains(&self.status) {
            problems.push(Problem::new(
                field(path, "status"),
                "must be between 200 and 599",
            ));
        }
        if let Some(body) = &self.body {
            if body.len() > MAX_DIRECT_RESPONSE_BODY {
                problems.push(Problem::new(
                    field(path, "body"),
                    format!("must be at most {} KiB", MAX_DIRECT_RESPONSE_BODY / 1024),
                ));
            }
        }
    }
}

impl RouteOptions {
    fn validate(&self, path: &str, forwards: bool, prefix_match: bool, problems: &mut Problems) {
        let only_forwarding = "only applies to routes with an upstream or split action";
        if let Some(timeout) = self.timeout {
            if !forwards {
                problems.push(Problem::new(field(path, "timeout"), only_forwarding));
            }
            if timeout > MAX_ROUTE_TIMEOUT {
                problems.push(Problem::new(
                    field(path, "timeout"),
                    format!("must be at most {MAX_ROUTE_TIMEOUT} (0s disables it)"),
                ));
            }
        }
        if let Some(retries) = &self.retries {
            let p = field(path, "retries");
            if !forwards {
                problems.push(Problem::new(&p, only_forwarding));
            }
            retries.validate(&p, self.timeout, problems);
        }
        if let Some(rewrite) = &self.prefix_rewrite {
            let p = field(path, "prefixRewrite");
            if !forwards {
                problems.push(Problem::new(&p, only_forwarding));
            } else if !prefix_match {
                problems.push(Problem::new(&p, "requires a prefix match"));
            }
            check_http_path(&p, rewrite, problems);
        }
        if let Some(h) = &self.request_headers {
            h.validate(&field(path, "requestHeaders"), problems);
        }
        if let Some(h) = &self.response_headers {
            h.validate(&field(path, "responseHeaders"), problems);
        }
    }
}

impl Retries {
    /// The `retryOn` conditions, trimmed.
    pub fn retry_on_items(&self) -> Vec<&str> {
        self.retry_on.split(',').map(str::trim).collect()
    }

    /// `timeout`: the route's (`None`: Envoy's default of 15 s; `0s`: none).
    fn validate(&self, path: &str, timeout: Option<Duration>, problems: &mut Problems) {
        if !(1..=MAX_RETRY_ATTEMPTS).contains(&self.attempts) {
            problems.push(Problem::new(
                field(path, "attempts"),
                format!("must be between 1 and {MAX_RETRY_ATTEMPTS}"),
            ));
        }
        if let Some(per_try) = self.per_try_timeout {
            let p = field(path, "perTryTimeout");
            let route = timeout.unwrap_or(DEFAULT_ROUTE_TIMEOUT);
            if per_try.is_zero() {
                problems.push(Problem::new(p, "must be greater than 0s"));
            } else if per_try > MAX_ROUTE_TIMEOUT {
                problems.push(Problem::new(
                    p,
                    format!("must be at most {MAX_ROUTE_TIMEOUT}"),
                ));
            } else if !route.is_zero() && per_try > route {
                let which = if timeout.is_some() {
                    "the route's timeout"
                } else {
                    "the route's timeout (15s when not set)"
                };
                problems.push(Problem::new(
                    p,
                    format!("{per_try} is longer than {which}, {route}: no retry could start"),
                ));
            }
        }
        let items = self.retry_on_items();
        for item in &items {
            if let Some((_, why)) = RETRY_ON_NEVER.iter().find(|(v, _)| v == item) {
                problems.push(Problem::new(
                    field(path, "retryOn"),
                    format!("{item:?} can never fire: it means {why}"),
                ));
            } else if !RETRY_ON_VALUES.contains(item) {
                problems.push(Problem::new(
                    field(path, "retryOn"),
                    format!(
                        "unknown retry condition {item:?}; use a comma-separated list of {}",
                        RETRY_ON_VALUES.join(", ")
                    ),
                ));
            }
        }
        let codes_path = field(path, "retriableStatusCodes");
        let codes_wanted = items.contains(&"retriable-status-codes");
        match (codes_wanted, self.retriable_status_codes.is_empty()) {
            (true, true) => problems.push(Problem::new(
                &codes_path,
                "list the status codes that retryOn \"retriable-status-codes\" retries on",
            )),
            (false, false) => problems.push(Problem::new(
                &codes_path,
                "only used with retryOn \"retriable-status-codes\"; add it there",
            )),
            _ => {}
        }
        let codes = at_most(
            &codes_path,
            &self.retriable_status_codes,
            MAX_MATCHERS,
            problems,
        );
        for (i, code) in codes.iter().enumerate() {
            if !(100..=599).contains(code) {
                problems.push(Problem::new(
                    index(&codes_path, i),
                    "must be an HTTP status code between 100 and 599",
                ));
            }
        }
        let headers_path = field(path, "retriableHeaders");
        let headers_wanted = items.contains(&"retriable-headers");
        match (headers_wanted, self.retriable_headers.is_empty()) {
            (true, true) => problems.push(Problem::new(
                &headers_path,
                "list the response headers that retryOn \"retriable-headers\" retries on",
            )),
            (false, false) => problems.push(Problem::new(
                &headers_path,
                "only used with retryOn \"retriable-headers\"; add it there",
            )),
            _ => {}
        }
        let headers = at_most(
            &headers_path,
            &self.retriable_headers,
            MAX_MATCHERS,
            problems,
        );
        for (i, name) in headers.iter().enumerate() {
            check_match_header_name(&index(&headers_path, i), name, problems);
        }
    }
}

impl HeaderMutations {
    fn validate(&self, path: &str, problems: &mut Problems) {
        let add_path = field(path, "add");
        let add = at_most(&add_path, &self.add, MAX_HEADER_MUTATIONS, problems);
        for (i, h) in add.iter().enumerate() {
            let p = index(&add_path, i);
            check_mutable_header_name(&field(&p, "name"), &h.name, problems);
            check_header_value(&field(&p, "value"), &h.value, problems);
        }
        let remove_path = field(path, "remove");
        let remove = at_most(&remove_path, &self.remove, MAX_HEADER_MUTATIONS, problems);
        for (i, name) in remove.iter().enumerate() {
            check_mutable_header_name(&index(&remove_path, i), name, problems);
        }
    }
}

impl VirtualServiceSpec {
    pub(crate) fn validate(&self, path: &str, problems: &mut Problems) {
        let domains_path = field(path, "domains");
        if self.domains.is_empty() {
            problems.push(Problem::new(&domains_path, "must list at least one domain"));
        }
        let mut seen = BTreeSet::new();
        let domains = at_most(&domains_path, &self.domains, MAX_DOMAINS, problems);
        for (i, domain) in domains.iter().enumerate() {
            let p = index(&domains_path, i);
            if let Err(message) = check_domain(domain) {
                problems.push(Problem::new(p, message));
            } else if !seen.insert(domain.to_ascii_lowercase()) {
                problems.push(Problem::new(p, format!("duplicate domain {domain:?}")));
            }
        }
        let routes_path = field(path, "routes");
        if self.routes.is_empty() {
            problems.push(Problem::new(&routes_path, "must list at least one route"));
        }
        let routes = at_most(&routes_path, &self.routes, MAX_ROUTES, problems);
        for (i, route) in routes.iter().enumerate() {
            route.validate(&index(&routes_path, i), problems);
        }
        // Each regex costs compiling it here and in every Envoy: a bounded number per object.
        let regexes = routes.iter().map(Route::regex_count).sum::<usize>();
        if regexes > MAX_REGEXES {
            problems.push(Problem::new(
                &routes_path,
                format!("the routes hold {regexes} regexes; the limit is {MAX_REGEXES}"),
            ));
        }
    }
}

/// `host[:port]` with host a DNS name or IP literal (IPv6 in brackets).
fn is_valid_authority(value: &str) -> bool {
    let (host, port) = split_port(value);
    if port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
        return false;
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    is_host_chars(host) && !host.starts_with(['.', '-']) && !host.ends_with(['-'])
}

fn is_host_chars(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// Splits `host:port` (the port being all digits); IPv6 literals must use brackets.
/// The host of a domain, without its port: requests are matched on the host alone (the
/// gateway strips the port from `Host`), so `shop.example.com:8080` matches as
/// `shop.example.com`.
pub fn domain_host(domain: &str) -> &str {
    split_port(domain).0
}

fn split_port(value: &str) -> (&str, Option<&str>) {
    match value.rsplit_once(':') {
        Some((host, port))
            if !host.ends_with(':') && (host.starts_with('[') || !host.contains(':')) =>
        {
            (host, Some(port))
        }
        _ => (value, None),
    }
}

/// A virtual host domain: `*`, `*.suffix` / `*suffix`, `prefix*`, or a host,
/// each optionally with `:port`.
fn check_domain(domain: &str) -> Result<(), String> {
    if domain == "*" {
        return Ok(());
    }
    let invalid = || {
        format!(
            "invalid domain {domain:?}: use a host name (optionally with :port), \"*\", \"*.suffix\" or \"prefix*\""
        )
    };
    let (host, port) = split_port(domain);
    if port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
        return Err(invalid());
    }
    let stars = host.matches('*').count();
    let bare = match stars {
        0 => host,
        1 if host.len() > 1 => host
            .strip_prefix('*')
            .or_else(|| host.strip_suffix('*'))
            .ok_or_else(invalid)?,
        _ => return Err(invalid()),
    };
    let ok = if stars == 0 {
        is_valid_authority(host)
    } else {
        is_host_chars(bare)
    };
    if ok {
        Ok(())
    } else {
        Err(invalid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains() {
        for ok in [
            "*",
            "example.com",
            "example.com:8080",
            "*.example.com",
            "*-api.example.com",
            "api.*",
            "localhost",
            "127.0.0.1:10000",
            "[::1]:10000",
            "Example.COM",
        ] {
            assert_eq!(check_domain(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "*.*",
            "a*b",
            "**",
            "exa mple.com",
            "example.com:0",
            "example.com:x",
            "::1",
            "example.com:99999",
            "-a.com",
            "*:80:80",
            "ex/ample",
        ] {
            assert!(check_domain(bad).is_err(), "{bad}");
        }
    }
}

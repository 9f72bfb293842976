//! VirtualService routes → Envoy routes.
//!
//! Each virtual service is translated once, whatever the number of gateways that
//! serve it, so its warnings are reported once. A route whose upstream is not
//! available is never dropped silently, and its traffic never moves elsewhere: the
//! missing upstream's share (all of it, or its weight in a split, the proportions
//! kept) goes to [`UNAVAILABLE_CLUSTER`], which answers 503, and the object shows a
//! warning naming the upstream (a response never does).

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::{
    data_source, header_value_option::HeaderAppendAction, DataSource, HeaderValue,
    HeaderValueOption,
};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier,
    query_parameter_matcher::QueryParameterMatchSpecifier,
    redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier},
    route::Action,
    route_action::ClusterSpecifier,
    route_match::PathSpecifier,
    weighted_cluster::ClusterWeight,
    DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction, RetryPolicy,
    Route as PbRoute, RouteAction as PbRouteAction, RouteMatch as PbRouteMatch, WeightedCluster,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatcher, StringMatcher,
};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use vmesh_model::{
    Config, DirectResponse, HeaderMutations, ObjectKey, PathMatch, Redirect, Route, RouteAction,
    RouteOptions, ValueMatch, VirtualServiceSpec,
};

use crate::upstream::UNAVAILABLE_CLUSTER;
use crate::{pb_duration, Reports};

/// A translated virtual service.
#[derive(Clone, Debug, Default)]
pub(crate) struct VirtualServiceRoutes {
    pub routes: Vec<PbRoute>,
    /// Upstreams (= cluster names) its routes send traffic to.
    pub clusters: BTreeSet<String>,
}

pub(crate) fn translate_all(
    config: &Config,
    reports: &mut Reports,
) -> BTreeMap<String, VirtualServiceRoutes> {
    config
        .virtual_services
        .iter()
        .map(|(name, spec)| {
            (
                name.clone(),
                translate_virtual_service(config, name, spec, reports),
            )
        })
        .collect()
}

fn translate_virtual_service(
    config: &Config,
    name: &str,
    spec: &VirtualServiceSpec,
    reports: &mut Reports,
) -> VirtualServiceRoutes {
    let key = ObjectKey::virtual_service(name);
    let mut out = VirtualServiceRoutes::default();
    for (i, route) in spec.routes.iter().enumerate() {
        let path = format!("spec.routes[{i}]");
        let action = translate_action(config, &key, &path, route, reports, &mut out.clusters);
        let mut pb = PbRoute {
            name: format!("{name}/{i}"),
            r#match: Some(translate_match(route)),
            action: Some(action),
            ..Default::default()
        };
        if let Some(options) = &route.options {
            apply_header_mutations(&mut pb, options);
        }
        out.routes.push(pb);
    }
    out
}

fn translate_action(
    config: &Config,
    key: &ObjectKey,
    path: &str,
    route: &Route,
    reports: &mut Reports,
    clusters: &mut BTreeSet<String>,
) -> Action {
    // The cluster of `upstream`, or the unavailable one (with a warning on `field` saying
    // what becomes of `share` of the traffic).
    let mut cluster_for = |field: String, upstream: &str, share: &str, reports: &mut Reports| {
        if config.upstreams.contains_key(upstream) {
            clusters.insert(upstream.to_string());
            return upstream.to_string();
        }
        let reason = reports.unavailable_reason(&ObjectKey::upstream(upstream));
        reports.warn(
            key.clone(),
            field,
            format!("upstream {upstream:?} {reason}; {share} is answered 503"),
        );
        clusters.insert(UNAVAILABLE_CLUSTER.to_string());
        UNAVAILABLE_CLUSTER.to_string()
    };
    match route.action() {
        Some(RouteAction::Upstream(upstream)) => {
            let cluster = cluster_for(format!("{path}.upstream"), upstream, "its traffic", reports);
            Action::Route(route_action(
                ClusterSpecifier::Cluster(cluster),
                route.options.as_ref(),
            ))
        }
        Some(RouteAction::Split(backends)) => {
            let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
            let weighted = WeightedCluster {
                clusters: backends
                    .iter()
                    .enumerate()
                    .map(|(j, b)| ClusterWeight {
                        name: cluster_for(
                            format!("{path}.split[{j}].upstream"),
                            &b.upstream,
                            &format!("its share ({} of {total})", b.weight),
                            reports,
                        ),
                        weight: Some(UInt32Value { value: b.weight }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            Action::Route(route_action(
                ClusterSpecifier::WeightedClusters(weighted),
                route.options.as_ref(),
            ))
        }
        Some(RouteAction::Redirect(redirect)) => Action::Redirect(redirect_action(redirect)),
        Some(RouteAction::DirectResponse(direct)) => {
            Action::DirectResponse(direct_response(direct))
        }
        // Validation guarantees exactly one action; answer rather than panic if not.
        None => Action::DirectResponse(DirectResponseAction {
            status: 500,
            body: Some(inline(format!("route {path} has no valid action"))),
            ..Default::default()
        }),
    }
}

fn inline(text: String) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::InlineString(text)),
        ..Default::default()
    }
}

fn route_action(cluster: ClusterSpecifier, options: Option<&RouteOptions>) -> PbRouteAction {
    let mut action = PbRouteAction {
        cluster_specifier: Some(cluster),
        ..Default::default()
    };
    if let Some(options) = options {
        action.timeout = options.timeout.map(|t| pb_duration(t.get()));
        action.retry_policy = options.retries.as_ref().map(|r| RetryPolicy {
            retry_on: r.retry_on_items().join(","),
            num_retries: Some(UInt32Value { value: r.attempts }),
            per_try_timeout: r.per_try_timeout.map(|t| pb_duration(t.get())),
            retriable_status_codes: r
                .retriable_status_codes
                .iter()
                .map(|c| u32::from(*c))
                .collect(),
            retriable_headers: r
                .retriable_headers
                .iter()
                .map(|name| HeaderMatcher {
                    name: name.clone(),
                    header_match_specifier: Some(HeaderMatchSpecifier::PresentMatch(true)),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        if let Some(rewrite) = &options.prefix_rewrite {
            action.prefix_rewrite = rewrite.clone();
        }
    }
    action
}

fn redirect_action(redirect: &Redirect) -> RedirectAction {
    let response_code = match redirect.response_code {
        302 => RedirectResponseCode::Found,
        303 => RedirectResponseCode::SeeOther,
        307 => RedirectResponseCode::TemporaryRedirect,
        308 => RedirectResponseCode::PermanentRedirect,
        _ => RedirectResponseCode::MovedPermanently,
    };
    let path_rewrite_specifier = match (&redirect.path_redirect, &redirect.prefix_rewrite) {
        (Some(p), _) => Some(PathRewriteSpecifier::PathRedirect(p.clone())),
        (None, Some(p)) => Some(PathRewriteSpecifier::PrefixRewrite(p.clone())),
        (None, None) => None,
    };
    RedirectAction {
        host_redirect: redirect.host_redirect.clone().unwrap_or_default(),
        response_code: response_code as i32,
        strip_query: redirect.strip_query,
        scheme_rewrite_specifier: redirect
            .https_redirect
            .then_some(SchemeRewriteSpecifier::HttpsRedirect(true)),
        path_rewrite_specifier,
        ..Default::default()
    }
}

fn direct_response(direct: &DirectResponse) -> DirectResponseAction {
    DirectResponseAction {
        status: u32::from(direct.status),
        body: direct.body.clone().map(inline),
        ..Default::default()
    }
}

fn exact(value: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(MatchPattern::Exact(value.to_string())),
        ..Default::default()
    }
}

fn safe_regex(regex: &str) -> RegexMatcher {
    // No engine_type: Envoy's default is RE2, and the google_re2 field is deprecated.
    RegexMatcher {
        regex: regex.to_string(),
        engine_type: None,
    }
}

fn regex_string_matcher(regex: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(MatchPattern::SafeRegex(safe_regex(regex))),
        ..Default::default()
    }
}

fn translate_match(route: &Route) -> PbRouteMatch {
    let path_specifier = match route.path_match() {
        PathMatch::Prefix(p) => PathSpecifier::Prefix(p.to_string()),
        PathMatch::Exact(p) => PathSpecifier::Path(p.to_string()),
        PathMatch::Regex(r) => PathSpecifier::SafeRegex(safe_regex(r)),
    };
    let mut pb = PbRouteMatch {
        path_specifier: Some(path_specifier),
        ..Default::default()
    };
    let Some(m) = &route.route_match else {
        return pb;
    };
    if !m.case_sensitive {
        pb.case_sensitive = Some(BoolValue { value: false });
    }
    for h in &m.headers {
        let specifier = match h.value_match() {
            Some(ValueMatch::Exact(v)) => HeaderMatchSpecifier::StringMatch(exact(v)),
            Some(ValueMatch::Regex(r)) => {
                HeaderMatchSpecifier::StringMatch(regex_string_matcher(r))
            }
            Some(ValueMatch::Present(p)) => HeaderMatchSpecifier::PresentMatch(p),
            None => HeaderMatchSpecifier::PresentMatch(true),
        };
        pb.headers.push(HeaderMatcher {
            name: h.name.clone(),
            invert_match: h.invert,
            header_match_specifier: Some(specifier),
            ..Default::default()
        });
    }
    match m.methods.as_slice() {
        [] => {}
        [one] => pb.headers.push(HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(exact(one.as_str()))),
            ..Default::default()
        }),
        many => {
            let alternatives: Vec<&str> = many.iter().map(|m| m.as_str()).collect();
            pb.headers.push(HeaderMatcher {
                name: ":method".into(),
                header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(
                    regex_string_matcher(&alternatives.join("|")),
                )),
                ..Default::default()
            });
        }
    }
    for q in &m.query_parameters {
        let specifier = match q.value_match() {
            Some(ValueMatch::Exact(v)) => QueryParameterMatchSpecifier::StringMatch(exact(v)),
            Some(ValueMatch::Regex(r)) => {
                QueryParameterMatchSpecifier::StringMatch(regex_string_matcher(r))
            }
            Some(ValueMatch::Present(false)) => {
                // "Absent", said explicitly: Envoy's own present_match: false means that only
                // under a runtime flag. The path's query does not name the parameter.
                pb.headers.push(HeaderMatcher {
                    name: ":path".into(),
                    invert_match: true,
                    header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(
                        regex_string_matcher(&query_parameter_regex(&q.name)),
                    )),
                    ..Default::default()
                });
                continue;
            }
            Some(ValueMatch::Present(true)) | None => {
                QueryParameterMatchSpecifier::PresentMatch(true)
            }
        };
        pb.query_parameters.push(QueryParameterMatcher {
            name: q.name.clone(),
            query_parameter_match_specifier: Some(specifier),
        });
    }
    pb
}

/// A regex (RE2) matching a path whose query string has the parameter `name` (with or without a
/// value).
pub(crate) fn query_parameter_regex(name: &str) -> String {
    let mut escaped = String::new();
    for c in name.chars() {
        if c.is_ascii_punctuation() {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    format!("^[^?]*\\?(.*&)?{escaped}(=[^&]*)?(&.*)?$")
}

fn header_options(mutations: &HeaderMutations) -> Vec<HeaderValueOption> {
    mutations
        .add
        .iter()
        .map(|h| HeaderValueOption {
            header: Some(HeaderValue {
                key: h.name.clone(),
                value: h.value.clone(),
                ..Default::default()
            }),
            append_action: if h.append {
                HeaderAppendAction::AppendIfExistsOrAdd
            } else {
                HeaderAppendAction::OverwriteIfExistsOrAdd
            } as i32,
            ..Default::default()
        })
        .collect()
}

fn apply_header_mutations(pb: &mut PbRoute, options: &RouteOptions) {
    if let Some(h) = &options.request_headers {
        pb.request_headers_to_add = header_options(h);
        pb.request_headers_to_remove = h.remove.clone();
    }
    if let Some(h) = &options.response_headers {
        pb.response_headers_to_add = header_options(h);
        pb.response_headers_to_remove = h.remove.clone();
    }
}

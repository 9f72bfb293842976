//! `kind: Gateway`: a listener on a set of proxies that serves virtual services.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::limits::{at_most, MAX_GATEWAY_VIRTUAL_SERVICES, MAX_PROXY_NAMES};
use crate::problem::{field, index, Problem};
use crate::tls::{GatewayTls, HttpsRedirect};
use crate::validate::{check_ip, check_name, Problems};

pub const DEFAULT_BIND_ADDRESS: &str = "0.0.0.0";
pub const DEFAULT_PROXY_NAME: &str = "gateway-proxy";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default = "default_bind_address")]
    pub bind_address: String,
    pub bind_port: u16,
    /// Envoy node ids of the proxies that run this gateway.
    #[serde(default = "default_proxy_names")]
    pub proxy_names: Vec<String>,
    /// Virtual services served, by name; `None` serves all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_services: Option<Vec<String>>,
    /// How many proxies in front of this gateway append to `X-Forwarded-For` and are trusted
    /// to: the client address is that many entries from the right (0: the TCP peer).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub xff_num_trusted_hops: u32,
    /// Access logs, one JSON object per request; none when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLog>,
    /// Terminate TLS with these certificates (chosen by SNI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Box<GatewayTls>>,
    /// Answer every request with a redirect to HTTPS (a plaintext gateway only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_redirect: Option<HttpsRedirect>,
}

/// `spec.accessLog`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AccessLog {
    /// `stdout`, or an absolute path Envoy can write to.
    #[serde(default = "default_log_to")]
    pub to: String,
    /// Field name → Envoy format string (`%RESPONSE_CODE%`, `%REQ(user-agent)%`, literal text
    /// around them): replaces [`DEFAULT_ACCESS_LOG_FIELDS`] when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<BTreeMap<String, String>>,
}

fn default_log_to() -> String {
    "stdout".to_string()
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The most proxies a gateway can trust in front of it.
pub const MAX_TRUSTED_HOPS: u32 = 10;

/// The access log's fields when `fields` is not given: what a user needs to see of each request.
pub const DEFAULT_ACCESS_LOG_FIELDS: [(&str, &str); 21] = [
    ("authority", "%REQ(:AUTHORITY)%"),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    (
        "downstream_direct_remote_address",
        "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%",
    ),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("duration_ms", "%DURATION%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("route_name", "%ROUTE_NAME%"),
    ("start_time", "%START_TIME%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
];

/// The command operators a format string may use without arguments; `REQ(...)`, `RESP(...)`
/// and `TRAILER(...)` take a header name. Anything else Envoy might refuse, and a refused log
/// format would take the gateway's listener with it, so it is refused here, on its field.
const LOG_OPERATORS: [&str; 27] = [
    "START_TIME",
    "PROTOCOL",
    "RESPONSE_CODE",
    "RESPONSE_CODE_DETAILS",
    "RESPONSE_FLAGS",
    "RESPONSE_FLAGS_LONG",
    "BYTES_RECEIVED",
    "BYTES_SENT",
    "DURATION",
    "REQUEST_DURATION",
    "REQUEST_TX_DURATION",
    "RESPONSE_DURATION",
    "RESPONSE_TX_DURATION",
    "UPSTREAM_HOST",
    "UPSTREAM_CLUSTER",
    "UPSTREAM_LOCAL_ADDRESS",
    "UPSTREAM_TRANSPORT_FAILURE_REASON",
    "ROUTE_NAME",
    "DOWNSTREAM_REMOTE_ADDRESS",
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS",
    "DOWNSTREAM_LOCAL_ADDRESS",
    "CONNECTION_ID",
    "REQUESTED_SERVER_NAME",
    "HOSTNAME",
    "CONNECTION_TERMINATION_DETAILS",
    "UPSTREAM_REQUEST_ATTEMPT_COUNT",
];

/// Fields an access log may have, and the length of a format string.
const MAX_LOG_FIELDS: usize = 32;
const MAX_LOG_FORMAT_BYTES: usize = 256;

impl AccessLog {
    /// The fields to log, in name order.
    pub fn fields(&self) -> BTreeMap<String, String> {
        self.fields.clone().unwrap_or_else(|| {
            DEFAULT_ACCESS_LOG_FIELDS
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect()
        })
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        if self.to != "stdout" && !self.to.starts_with('/') {
            problems.push(Problem::new(
                field(path, "to"),
                format!("{:?}: use \"stdout\" or an absolute path", self.to),
            ));
        }
        if self.to.chars().any(char::is_control) {
            problems.push(Problem::new(
                field(path, "to"),
                "must not contain control characters",
            ));
        }
        let Some(fields) = &self.fields else {
            return;
        };
        let fields_path = field(path, "fields");
        if fields.is_empty() {
            problems.push(Problem::new(
                &fields_path,
                "must name at least one field (or be omitted)",
            ));
        }
        if fields.len() > MAX_LOG_FIELDS {
            problems.push(Problem::new(
                &fields_path,
                format!("has {} fields; the limit is {MAX_LOG_FIELDS}", fields.len()),
            ));
            return;
        }
        for (name, format) in fields {
            let p = field(&fields_path, name);
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                problems.push(Problem::new(
                    &p,
                    "field names are letters, digits, '_' and '-'",
                ));
            }
            if let Err(e) = check_log_format(format) {
                problems.push(Problem::new(&p, e));
            }
        }
    }
}

/// Checks an access log format string: literal text and `%OPERATOR%` / `%REQ(header)%`.
fn check_log_format(format: &str) -> Result<(), String> {
    if format.len() > MAX_LOG_FORMAT_BYTES {
        return Err(format!("must be at most {MAX_LOG_FORMAT_BYTES} bytes"));
    }
    if format.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    let mut rest = format;
    while let Some(start) = rest.find('%') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('%') else {
            return Err(format!("{format:?}: a '%' without its closing '%'"));
        };
        let operator = &after[..end];
        check_log_operator(operator).map_err(|e| format!("%{operator}%: {e}"))?;
        rest = &after[end + 1..];
    }
    Ok(())
}

fn check_log_operator(operator: &str) -> Result<(), String> {
    if LOG_OPERATORS.contains(&operator) {
        return Ok(());
    }
    for command in ["REQ", "RESP", "TRAILER"] {
        let Some(args) = operator
            .strip_prefix(command)
            .and_then(|a| a.strip_prefix('('))
        else {
            continue;
        };
        // REQ(name), REQ(name?alternative), optionally :max-length after the parenthesis.
        let (inside, max_len) = match args.split_once(')') {
            Some((inside, "")) => (inside, None),
            Some((inside, tail)) => (inside, Some(tail)),
            None => return Err("missing ')'".into()),
        };
        if let Some(tail) = max_len {
            let n = tail.strip_prefix(':').unwrap_or("");
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err("after ')' only :<max length> may follow".into());
            }
        }
        let names: Vec<&str> = inside.split('?').collect();
        if names.len() > 2 || names.iter().any(|n| !is_header_token(n)) {
            return Err(format!(
                "{command}(...) takes a header name, optionally ?another"
            ));
        }
        return Ok(());
    }
    Err(format!(
        "not a supported command; use REQ(header), RESP(header), TRAILER(header) or one of {}",
        LOG_OPERATORS.join(", ")
    ))
}

fn is_header_token(name: &str) -> bool {
    let name = name.strip_prefix(':').unwrap_or(name);
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn default_bind_address() -> String {
    DEFAULT_BIND_ADDRESS.to_string()
}

fn default_proxy_names() -> Vec<String> {
    vec![DEFAULT_PROXY_NAME.to_string()]
}

impl GatewaySpec {
    /// Whether this gateway serves the named virtual service.
    pub fn serves(&self, virtual_service: &str) -> bool {
        match &self.virtual_services {
            None => true,
            Some(names) => names.iter().any(|n| n == virtual_service),
        }
    }

    pub(crate) fn validate(&self, path: &str, problems: &mut Problems) {
        check_ip(&field(path, "bindAddress"), &self.bind_address, problems);
        if self.bind_port == 0 {
            problems.push(Problem::new(
                field(path, "bindPort"),
                "must be between 1 and 65535",
            ));
        }
        let proxies_path = field(path, "proxyNames");
        if self.proxy_names.is_empty() {
            problems.push(Problem::new(
                &proxies_path,
                "must list at least one proxy (or be omitted)",
            ));
        }
        let mut seen = BTreeSet::new();
        let proxy_names = at_most(&proxies_path, &self.proxy_names, MAX_PROXY_NAMES, problems);
        for (i, name) in proxy_names.iter().enumerate() {
            let p = index(&proxies_path, i);
            if name.trim().is_empty() {
                problems.push(Problem::new(p, "must not be empty"));
            } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                problems.push(Problem::new(
                    p,
                    format!("{name:?} must not contain whitespace"),
                ));
            } else if !seen.insert(name.as_str()) {
                problems.push(Problem::new(p, format!("duplicate proxy name {name:?}")));
            }
        }
        if self.xff_num_trusted_hops > MAX_TRUSTED_HOPS {
            problems.push(Problem::new(
                field(path, "xffNumTrustedHops"),
                format!("must be at most {MAX_TRUSTED_HOPS}"),
            ));
        }
        if let Some(log) = &self.access_log {
            log.validate(&field(path, "accessLog"), problems);
        }
        if let Some(tls) = &self.tls {
            tls.validate(&field(path, "tls"), problems);
        }
        if let Some(redirect) = &self.https_redirect {
            redirect.validate(&field(path, "httpsRedirect"), problems);
            if self.tls.is_some() {
                problems.push(Problem::new(
                    field(path, "httpsRedirect"),
                    "a gateway with tls serves HTTPS itself; put httpsRedirect on the plaintext gateway",
                ));
            }
        }
        if let Some(names) = &self.virtual_services {
            let vs_path = field(path, "virtualServices");
            if names.is_empty() {
                problems.push(Problem::new(
                    &vs_path,
                    "must list at least one virtual service; omit it to serve all of them",
                ));
            }
            let mut seen = BTreeSet::new();
            let names = at_most(&vs_path, names, MAX_GATEWAY_VIRTUAL_SERVICES, problems);
            for (i, name) in names.iter().enumerate() {
                let p = index(&vs_path, i);
                check_name(&p, name, problems);
                if !seen.insert(name.as_str()) {
                    problems.push(Problem::new(
                        p,
                        format!("duplicate virtual service {name:?}"),
                    ));
                }
            }
        }
    }
}

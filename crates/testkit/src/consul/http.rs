//! The HTTP API: one fallback handler that dispatches on method and path like Consul's mux.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Value};

use super::acl::Authz;
use super::agent::{AgentCheck, AgentService, CheckRegistration, CheckStatus, ServiceRegistration};
use super::store::{KvEntry, NewSession, Session, SessionBehavior, Store};
use super::util::{format_go_duration, parse_go_duration, percent_decode, random_u64, Query};
use super::Shared;

/// Consul's default and maximum blocking wait.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Consul's maximum session TTL.
const SESSION_TTL_MAX: Duration = Duration::from_secs(86_400);
/// Header Consul sets when ACLs removed entries from a list.
const FILTERED_HEADER: &str = "x-consul-results-filtered-by-acls";

/// What a read produces before it becomes a response: blocking compares `index`.
struct Reply {
    status: StatusCode,
    /// `X-Consul-Index` (and the other read headers) when set.
    index: Option<u64>,
    body: ReplyBody,
    filtered: bool,
}

enum ReplyBody {
    Empty,
    Json(Value),
    Text(String),
    Raw(Vec<u8>),
}

impl Reply {
    fn read(index: u64, body: Value) -> Reply {
        Reply {
            status: StatusCode::OK,
            index: Some(index),
            body: ReplyBody::Json(body),
            filtered: false,
        }
    }

    fn not_found(index: u64) -> Reply {
        Reply {
            status: StatusCode::NOT_FOUND,
            index: Some(index),
            body: ReplyBody::Empty,
            filtered: false,
        }
    }

    fn error(status: StatusCode, msg: impl Into<String>) -> Reply {
        Reply {
            status,
            index: None,
            body: ReplyBody::Text(msg.into()),
            filtered: false,
        }
    }

    fn json(body: Value) -> Reply {
        Reply {
            status: StatusCode::OK,
            index: None,
            body: ReplyBody::Json(body),
            filtered: false,
        }
    }

    fn is_error(&self) -> bool {
        self.status != StatusCode::OK && self.status != StatusCode::NOT_FOUND
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut headers = HeaderMap::new();
        if let Some(index) = self.index {
            headers.insert("x-consul-index", HeaderValue::from(index));
            headers.insert("x-consul-knownleader", HeaderValue::from_static("true"));
            headers.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
        }
        if self.filtered {
            headers.insert(FILTERED_HEADER, HeaderValue::from_static("true"));
        }
        let body = match self.body {
            ReplyBody::Empty => Body::empty(),
            ReplyBody::Json(v) => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Body::from(v.to_string())
            }
            ReplyBody::Text(t) => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                Body::from(t)
            }
            ReplyBody::Raw(b) => {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                headers.insert(
                    "x-content-type-options",
                    HeaderValue::from_static("nosniff"),
                );
                Body::from(b)
            }
        };
        (self.status, headers, body).into_response()
    }
}

pub(crate) async fn handle(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    sh.requests.fetch_add(1, Ordering::Relaxed);
    let mut hung = sh.hung.subscribe();
    while *hung.borrow_and_update() {
        if hung.changed().await.is_err() {
            break;
        }
    }
    if sh.failing.load(Ordering::Relaxed) {
        return Reply::error(StatusCode::INTERNAL_SERVER_ERROR, "No cluster leader")
            .into_response();
    }
    let (parts, body) = req.into_parts();
    let q = Query::parse(parts.uri.query());
    if let Some(dc) = q.get("dc").filter(|dc| !dc.is_empty()) {
        if dc != sh.opts.datacenter {
            return Reply::error(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter")
                .into_response();
        }
    }
    if q.has("stale") && q.has("consistent") {
        return Reply::error(
            StatusCode::BAD_REQUEST,
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        )
        .into_response();
    }
    let token = request_token(&parts.headers, &q);
    let authz = match Authz::resolve(sh.opts.acl.as_ref(), token.as_deref()) {
        Ok(a) => a,
        Err(msg) => return Reply::error(StatusCode::FORBIDDEN, msg).into_response(),
    };
    let path = percent_decode(parts.uri.path(), false);
    let method = parts.method;

    if let Some(key) = path
        .strip_prefix("/v1/kv/")
        .or((path == "/v1/kv").then_some(""))
    {
        let key = key.to_owned();
        return match method {
            Method::GET if !q.has("index") => {
                *sh.kv_reads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(key.clone())
                    .or_default() += 1;
                kv_get(&sh, &key, &q, &authz).await
            }
            Method::GET => kv_get(&sh, &key, &q, &authz).await,
            Method::PUT => kv_put(&sh, &key, &q, &authz, &parts.headers, body).await,
            Method::DELETE => kv_delete(&sh, &key, &q, &authz),
            m => method_not_allowed(&m),
        }
        .into_response();
    }
    if path == "/v1/status/leader" {
        // The Raft address of the leader: the one server this emulator is.
        return Reply::json(Value::String(format!("{}:8300", sh.opts.node_address)))
            .into_response();
    }
    if let Some(rest) = path.strip_prefix("/v1/session/") {
        let (op, id) = rest.split_once('/').unwrap_or((rest, ""));
        let reply = match (op, &method) {
            ("create", &Method::PUT) => session_create(&sh, &authz, body).await,
            ("renew", &Method::PUT) => session_renew(&sh, &authz, id),
            ("destroy", &Method::PUT) => session_destroy(&sh, &authz, id),
            ("info", &Method::GET) => session_info(&sh, &authz, id, &q).await,
            ("list", &Method::GET) => session_list(&sh, &authz, &q).await,
            ("create" | "renew" | "destroy" | "info" | "list", m) => method_not_allowed(m),
            _ => Reply::error(StatusCode::NOT_FOUND, "404 page not found"),
        };
        return reply.into_response();
    }
    if let Some(rest) = path.strip_prefix("/v1/agent/") {
        let reply = match (rest, &method) {
            ("self", &Method::GET) => agent_self(&sh),
            ("services", &Method::GET) => agent_services(&sh),
            ("checks", &Method::GET) => agent_checks(&sh),
            ("service/register", &Method::PUT) => agent_register(&sh, &q, body).await,
            ("self" | "services" | "checks" | "service/register", m) => method_not_allowed(m),
            _ => {
                if let Some(id) = rest.strip_prefix("service/deregister/") {
                    match method {
                        Method::PUT => agent_deregister(&sh, id),
                        m => method_not_allowed(&m),
                    }
                } else if let Some((op, id)) = rest
                    .strip_prefix("check/")
                    .and_then(|r| r.split_once('/'))
                    .filter(|(op, _)| matches!(*op, "pass" | "warn" | "fail"))
                {
                    match method {
                        Method::PUT => agent_check_update(&sh, op, id, &q),
                        m => method_not_allowed(&m),
                    }
                } else {
                    Reply::error(StatusCode::NOT_FOUND, "404 page not found")
                }
            }
        };
        return reply.into_response();
    }
    if let Some(node) = path.strip_prefix("/v1/catalog/node-services/") {
        let node = node.to_owned();
        return match method {
            Method::GET => catalog_node_services(&sh, &node, &q).await,
            m => method_not_allowed(&m),
        }
        .into_response();
    }
    if let Some(node) = path.strip_prefix("/v1/health/node/") {
        let node = node.to_owned();
        return match method {
            Method::GET => health_node(&sh, &node, &q).await,
            m => method_not_allowed(&m),
        }
        .into_response();
    }
    Reply::error(StatusCode::NOT_FOUND, "404 page not found").into_response()
}

fn method_not_allowed(m: &Method) -> Reply {
    Reply::error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {m} not allowed"),
    )
}

/// `X-Consul-Token`, else `Authorization: Bearer`, else the (deprecated) `?token=`.
fn request_token(headers: &HeaderMap, q: &Query) -> Option<String> {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(t) = h("x-consul-token").filter(|t| !t.is_empty()) {
        return Some(t.to_owned());
    }
    if let Some(auth) = h("authorization") {
        let mut it = auth.splitn(2, ' ');
        if let (Some(scheme), Some(t)) = (it.next(), it.next()) {
            if scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty() {
                return Some(t.trim().to_owned());
            }
        }
    }
    q.get("token").filter(|t| !t.is_empty()).map(str::to_owned)
}

// ---- blocking ----

/// Runs `eval` under the lock; with `?index=N` (N > 0) waits until the reply's index passes N or
/// the wait (plus jitter up to wait/16) ends, re-evaluating whenever the store changes.
async fn blocking(sh: &Arc<Shared>, q: &Query, eval: impl Fn(&Store) -> Reply) -> Reply {
    let min_index = match q.get("index") {
        None | Some("") => 0,
        Some(s) => match s.parse::<u64>() {
            Ok(i) => i,
            Err(_) => return Reply::error(StatusCode::BAD_REQUEST, "Invalid index"),
        },
    };
    let wait = match q.get("wait") {
        None | Some("") => DEFAULT_WAIT,
        Some(s) => match parse_go_duration(s) {
            Ok(d) => d.min(MAX_WAIT),
            Err(_) => return Reply::error(StatusCode::BAD_REQUEST, "Invalid wait time"),
        },
    };
    let wait = if wait.is_zero() { DEFAULT_WAIT } else { wait };
    let jitter_max = (wait / 16).as_nanos() as u64;
    let jitter = Duration::from_nanos(if jitter_max == 0 {
        0
    } else {
        random_u64() % jitter_max
    });
    let deadline = tokio::time::Instant::now() + wait + jitter;
    loop {
        let (reply, mut changed) = {
            let st = sh.lock();
            (eval(&st), sh.changed.subscribe())
        };
        let done = min_index == 0 || reply.is_error() || reply.index.is_none_or(|i| i > min_index);
        if done {
            return reply;
        }
        match tokio::time::timeout_at(deadline, changed.changed()).await {
            Ok(Ok(())) => continue,
            // Wait over (or the emulator is shutting down): answer with the current state.
            _ => return eval(&sh.lock()),
        }
    }
}

// ---- KV ----

fn entry_json(e: &KvEntry) -> Value {
    let mut v = json!({
        "LockIndex": e.lock_index,
        "Key": e.key,
        "Flags": e.flags,
        "Value": if e.value.is_empty() {
            Value::Null
        } else {
            Value::String(base64::engine::general_purpose::STANDARD.encode(&e.value))
        },
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    });
    if let (Some(s), Some(obj)) = (&e.session, v.as_object_mut()) {
        obj.insert("Session".into(), Value::String(s.clone()));
    }
    v
}

async fn kv_get(sh: &Arc<Shared>, key: &str, q: &Query, authz: &Authz) -> Reply {
    if q.has("keys") {
        let sep = q
            .get("separator")
            .or_else(|| q.get("seperator"))
            .unwrap_or("")
            .to_owned();
        return blocking(sh, q, |st| {
            let index = st.prefix_index(key);
            let entries = st.list(key);
            let total = entries.len();
            let readable: Vec<&KvEntry> = entries
                .into_iter()
                .filter(|e| authz.key_read(&e.key))
                .collect();
            let filtered = readable.len() != total;
            let mut keys: Vec<String> = Vec::new();
            for e in readable {
                let k = match (!sep.is_empty())
                    .then(|| e.key[key.len()..].find(sep.as_str()))
                    .flatten()
                {
                    Some(i) => e.key[..key.len() + i + sep.len()].to_owned(),
                    None => e.key.clone(),
                };
                if keys.last() != Some(&k) {
                    keys.push(k);
                }
            }
            let mut reply = if keys.is_empty() && !key.is_empty() {
                Reply::not_found(index)
            } else {
                Reply::read(index, json!(keys))
            };
            reply.filtered = filtered;
            reply
        })
        .await;
    }
    if q.has("recurse") {
        return blocking(sh, q, |st| {
            let index = st.prefix_index(key);
            let entries = st.list(key);
            let total = entries.len();
            let readable: Vec<Value> = entries
                .into_iter()
                .filter(|e| authz.key_read(&e.key))
                .map(entry_json)
                .collect();
            let filtered = readable.len() != total;
            let mut reply = if readable.is_empty() {
                Reply::not_found(index)
            } else {
                Reply::read(index, Value::Array(readable))
            };
            reply.filtered = filtered;
            reply
        })
        .await;
    }
    if key.is_empty() {
        return Reply::error(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let raw = q.has("raw");
    blocking(sh, q, |st| {
        if !authz.key_read(key) {
            return Reply::error(StatusCode::FORBIDDEN, authz.denied("key:read", key));
        }
        match st.get(key) {
            (index, None) => Reply::not_found(index),
            (index, Some(e)) if raw => Reply {
                status: StatusCode::OK,
                index: Some(index),
                body: ReplyBody::Raw(e.value.clone()),
                filtered: false,
            },
            (index, Some(e)) => Reply::read(index, json!([entry_json(e)])),
        }
    })
    .await
}

/// More than one of these flags in one request is a 400, as in Consul.
fn conflicting(q: &Query, flags: &[&str]) -> Option<Reply> {
    (flags.iter().filter(|f| q.has(f)).count() > 1).then(|| {
        Reply::error(
            StatusCode::BAD_REQUEST,
            format!("Conflicting flags: {}\n", q.encode()),
        )
    })
}

fn parse_u64_param(q: &Query, name: &str) -> Result<Option<u64>, Reply> {
    match q.get(name) {
        None => Ok(None),
        Some(s) => s.parse::<u64>().map(Some).map_err(|e| {
            Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("strconv.ParseUint: parsing {s:?}: {e}"),
            )
        }),
    }
}

async fn kv_put(
    sh: &Arc<Shared>,
    key: &str,
    q: &Query,
    authz: &Authz,
    headers: &HeaderMap,
    body: Body,
) -> Reply {
    if key.is_empty() {
        return Reply::error(StatusCode::BAD_REQUEST, "Missing key name");
    }
    if let Some(r) = conflicting(q, &["cas", "acquire", "release"]) {
        return r;
    }
    let flags = match parse_u64_param(q, "flags") {
        Ok(f) => f.unwrap_or(0),
        Err(r) => return r,
    };
    let cas = match parse_u64_param(q, "cas") {
        Ok(c) => c,
        Err(r) => return r,
    };
    let max = sh.opts.max_value_size;
    let too_large = |len: u64| {
        Reply::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Request body({len} bytes) too large, max size: {max} bytes. See \
                 https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|len| *len > max as u64) {
        // Read (and drop) a moderately oversized body before answering, so a client still
        // writing it gets the 413 rather than a broken pipe (under load the early answer and
        // close raced with the client's write).
        if len <= 16 * max as u64 {
            let _ = axum::body::to_bytes(body, len as usize).await;
        }
        return too_large(len);
    }
    let value: Bytes = match axum::body::to_bytes(body, max + 1).await {
        Ok(b) => b,
        Err(_) => return too_large(max as u64 + 1),
    };
    if value.len() > max {
        return too_large(value.len() as u64);
    }
    if !authz.key_write(key) {
        return Reply::error(StatusCode::FORBIDDEN, authz.denied("key:write", key));
    }
    let value = value.to_vec();
    let result = sh.write(|st| {
        if let Some(session) = q.get("acquire") {
            st.lock(key, value, flags, session, Instant::now())
        } else if let Some(session) = q.get("release") {
            Ok(st.unlock(key, value, flags, session))
        } else if let Some(cas) = cas {
            Ok(st.cas(key, value, flags, cas))
        } else {
            Ok(st.set(key, value, flags))
        }
    });
    match result {
        Ok(ok) => Reply::json(json!(ok)),
        Err(msg) => Reply::error(StatusCode::INTERNAL_SERVER_ERROR, msg),
    }
}

fn kv_delete(sh: &Arc<Shared>, key: &str, q: &Query, authz: &Authz) -> Reply {
    if let Some(r) = conflicting(q, &["recurse", "cas"]) {
        return r;
    }
    let cas = match parse_u64_param(q, "cas") {
        Ok(c) => c,
        Err(r) => return r,
    };
    if q.has("recurse") {
        if !authz.key_write_prefix(key) {
            return Reply::error(StatusCode::FORBIDDEN, authz.denied("key:write", key));
        }
        sh.write(|st| st.delete_tree(key));
        return Reply::json(json!(true));
    }
    if key.is_empty() {
        return Reply::error(StatusCode::BAD_REQUEST, "Missing key name");
    }
    if !authz.key_write(key) {
        return Reply::error(StatusCode::FORBIDDEN, authz.denied("key:write", key));
    }
    let ok = sh.write(|st| match cas {
        Some(cas) => st.delete_cas(key, cas),
        None => {
            st.delete(key);
            true
        }
    });
    Reply::json(json!(ok))
}

// ---- sessions ----

fn session_json(s: &Session) -> Value {
    json!({
        "ID": s.id,
        "Name": s.name,
        "Node": s.node,
        "LockDelay": s.lock_delay.as_nanos() as u64,
        "Behavior": s.behavior.as_str(),
        "TTL": s.ttl_text,
        "NodeChecks": s.node_checks,
        "ServiceChecks": Value::Null,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

/// Reads a duration field given as a Go duration string or as nanoseconds; values below 1000
/// are seconds (Consul's `FixupLockDelay`).
fn lock_delay_value(v: &Value) -> Result<Duration, String> {
    let d = match v {
        Value::String(s) => parse_go_duration(s)?,
        Value::Number(n) => Duration::from_nanos(n.as_f64().unwrap_or(0.0).max(0.0) as u64),
        Value::Null => return Ok(Duration::from_secs(15)),
        other => return Err(format!("invalid LockDelay {other}")),
    };
    Ok(if d.as_nanos() < 1000 {
        Duration::from_secs(d.as_nanos() as u64)
    } else {
        d
    })
}

async fn session_create(sh: &Arc<Shared>, authz: &Authz, body: Body) -> Reply {
    let bytes = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(b) => b,
        Err(e) => {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: {e}"),
            )
        }
    };
    let req: serde_json::Map<String, Value> = if bytes.iter().all(u8::is_ascii_whitespace) {
        serde_json::Map::new()
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(m)) => m,
            Ok(other) => {
                return Reply::error(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: expected an object, got {other}"),
                )
            }
            Err(e) => {
                return Reply::error(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: {e}"),
                )
            }
        }
    };
    // Consul decodes field names case-insensitively.
    let field = |name: &str| {
        req.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    };
    let text = |name: &str| field(name).and_then(Value::as_str).unwrap_or("").to_owned();
    let bad = |msg: String| {
        Reply::error(
            StatusCode::BAD_REQUEST,
            format!("Request decode failed: {msg}"),
        )
    };
    let lock_delay = match field("LockDelay").map_or(Ok(Duration::from_secs(15)), lock_delay_value)
    {
        Ok(d) => d,
        Err(e) => return bad(e),
    };
    let node = match text("Node") {
        n if n.is_empty() => sh.opts.node_name.clone(),
        n => n,
    };
    if !authz.session_write() {
        return Reply::error(StatusCode::FORBIDDEN, authz.denied("session:write", &node));
    }
    if node != sh.opts.node_name {
        return Reply::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Missing node registration for {node:?}"),
        );
    }
    let behavior = match text("Behavior").as_str() {
        "" | "release" => SessionBehavior::Release,
        "delete" => SessionBehavior::Delete,
        other => {
            return Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Invalid Behavior setting '{other}'"),
            )
        }
    };
    let ttl_text = text("TTL");
    let ttl = if ttl_text.is_empty() {
        None
    } else {
        match parse_go_duration(&ttl_text) {
            Err(e) => {
                return Reply::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("Session TTL '{ttl_text}' invalid: {e}"),
                )
            }
            Ok(d) if d.is_zero() => None,
            Ok(d) if d < sh.opts.session_ttl_min || d > SESSION_TTL_MAX => {
                return Reply::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "Invalid Session TTL '{}', must be between [{}={}]",
                        d.as_nanos(),
                        format_go_duration(sh.opts.session_ttl_min),
                        format_go_duration(SESSION_TTL_MAX)
                    ),
                )
            }
            Ok(d) => Some(d),
        }
    };
    let explicit_checks = ["Checks", "NodeChecks"]
        .iter()
        .find_map(|n| field(n))
        .map(|v| {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c.as_str().map(str::to_owned))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        });
    let node_checks = match explicit_checks {
        None => Some(vec!["serfHealth".to_owned()]),
        Some(c) if c.is_empty() => None,
        Some(c) => Some(c),
    };
    let new = NewSession {
        name: text("Name"),
        node,
        lock_delay,
        behavior,
        ttl_text,
        ttl,
        node_checks,
    };
    let id = sh.write(|st| st.session_create(new, Instant::now(), true));
    sh.timers_changed.notify_one();
    Reply::json(json!({ "ID": id }))
}

fn session_renew(sh: &Arc<Shared>, authz: &Authz, id: &str) -> Reply {
    if id.is_empty() {
        return Reply::error(StatusCode::BAD_REQUEST, "Missing session");
    }
    if !authz.session_write() {
        return Reply::error(
            StatusCode::FORBIDDEN,
            authz.denied("session:write", &sh.opts.node_name),
        );
    }
    let mut st = sh.lock();
    let index = st.sessions_index.max(1);
    let reply = match st.session_renew(id, Instant::now()) {
        Some(s) => Reply::read(index, json!([session_json(s)])),
        None => Reply::error(
            StatusCode::NOT_FOUND,
            format!("Session id '{id}' not found"),
        ),
    };
    drop(st);
    sh.timers_changed.notify_one();
    reply
}

fn session_destroy(sh: &Arc<Shared>, authz: &Authz, id: &str) -> Reply {
    if id.is_empty() {
        return Reply::error(StatusCode::BAD_REQUEST, "Missing session");
    }
    if !authz.session_write() {
        return Reply::error(
            StatusCode::FORBIDDEN,
            authz.denied("session:write", &sh.opts.node_name),
        );
    }
    sh.write(|st| st.session_destroy(id, Instant::now()));
    sh.timers_changed.notify_one();
    Reply::json(json!(true))
}

async fn session_info(sh: &Arc<Shared>, authz: &Authz, id: &str, q: &Query) -> Reply {
    if id.is_empty() {
        return Reply::error(StatusCode::BAD_REQUEST, "Missing session");
    }
    blocking(sh, q, |st| {
        let found: Vec<Value> = st
            .sessions
            .get(id)
            .filter(|_| authz.session_write())
            .map(session_json)
            .into_iter()
            .collect();
        Reply::read(st.sessions_index.max(1), Value::Array(found))
    })
    .await
}

async fn session_list(sh: &Arc<Shared>, authz: &Authz, q: &Query) -> Reply {
    blocking(sh, q, |st| {
        let all: Vec<Value> = st
            .sessions
            .values()
            .filter(|_| authz.session_write())
            .map(session_json)
            .collect();
        Reply::read(st.sessions_index.max(1), Value::Array(all))
    })
    .await
}

// ---- the local agent ----

fn agent_self(sh: &Arc<Shared>) -> Reply {
    let o = &sh.opts;
    Reply::json(json!({
        "Config": {
            "Datacenter": o.datacenter,
            "PrimaryDatacenter": o.datacenter,
            "NodeName": o.node_name,
            "NodeID": sh.node_id,
            "Revision": "vmesh-emulator",
            "Server": false,
            "Version": "1.18.0",
            "BuildDate": "2024-01-01T00:00:00Z",
        },
        "Member": {
            "Name": o.node_name,
            "Addr": o.node_address.to_string(),
            "Port": 8301,
            "Tags": {
                "dc": o.datacenter,
                "id": sh.node_id,
                "role": "node",
                "segment": "",
            },
            "Status": 1,
            "ProtocolMin": 1,
            "ProtocolMax": 5,
            "ProtocolCur": 2,
            "DelegateMin": 2,
            "DelegateMax": 5,
            "DelegateCur": 4,
        },
        "Meta": {"consul-network-segment": ""},
    }))
}

fn weights_json(w: (u64, u64)) -> Value {
    json!({"Passing": w.0, "Warning": w.1})
}

/// `GET /v1/agent/services` entry.
fn agent_service_json(s: &AgentService, dc: &str) -> Value {
    let mut v = json!({
        "ID": s.id,
        "Service": s.name,
        "Tags": s.tags,
        "Meta": s.meta,
        "Port": s.port,
        "Address": s.address,
        "Weights": weights_json(s.weights),
        "EnableTagOverride": s.enable_tag_override,
        "Datacenter": dc,
    });
    if let (Some(t), Some(obj)) = (&s.tagged_addresses, v.as_object_mut()) {
        obj.insert("TaggedAddresses".into(), Value::Object(t.clone()));
    }
    v
}

/// A check as the agent and health endpoints describe it (indexes 0 in the agent's view).
fn check_json(c: &AgentCheck, node: &str, with_indexes: bool) -> Value {
    json!({
        "Node": node,
        "CheckID": c.id,
        "Name": c.name,
        "Status": c.status.as_str(),
        "Notes": c.notes,
        "Output": c.output,
        "ServiceID": c.service_id,
        "ServiceName": c.service_name,
        "ServiceTags": c.service_tags,
        "Type": "ttl",
        "Interval": "",
        "Timeout": "",
        "ExposedPort": 0,
        "Definition": {},
        "CreateIndex": if with_indexes { c.create_index } else { 0 },
        "ModifyIndex": if with_indexes { c.modify_index } else { 0 },
    })
}

fn agent_services(sh: &Arc<Shared>) -> Reply {
    let st = sh.lock();
    let map: serde_json::Map<String, Value> = st
        .agent
        .services
        .values()
        .map(|s| (s.id.clone(), agent_service_json(s, &sh.opts.datacenter)))
        .collect();
    Reply::json(Value::Object(map))
}

fn agent_checks(sh: &Arc<Shared>) -> Reply {
    let st = sh.lock();
    let map: serde_json::Map<String, Value> = st
        .agent
        .checks
        .values()
        .map(|c| (c.id.clone(), check_json(c, &sh.opts.node_name, false)))
        .collect();
    Reply::json(Value::Object(map))
}

/// Looks a field up case-insensitively, also accepting its snake_case spelling (Consul's
/// decoder does both).
fn field<'a>(obj: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    let snake: String = name
        .chars()
        .enumerate()
        .flat_map(|(i, c)| {
            let lower = c.to_ascii_lowercase();
            if c.is_ascii_uppercase() && i > 0 {
                vec!['_', lower]
            } else {
                vec![lower]
            }
        })
        .collect();
    obj.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name) || k.eq_ignore_ascii_case(&snake))
        .map(|(_, v)| v)
        .filter(|v| !v.is_null())
}

fn str_field(obj: &serde_json::Map<String, Value>, name: &str) -> Result<String, String> {
    match field(obj, name) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("{name}: expected a string, got {other}")),
    }
}

fn parse_check(v: &Value) -> Result<CheckRegistration, String> {
    let Value::Object(c) = v else {
        return Err(format!("Check: expected an object, got {v}"));
    };
    let ttl_text = str_field(c, "TTL")?;
    if ttl_text.is_empty() {
        return Err(
            "Invalid check: the emulator supports only TTL checks (TTL must be set)".to_owned(),
        );
    }
    let ttl = parse_go_duration(&ttl_text)?;
    if ttl.is_zero() {
        return Err("Invalid check: TTL must be > 0 for TTL checks".to_owned());
    }
    let status = match str_field(c, "Status")?.as_str() {
        "" => None,
        s => Some(s.parse::<CheckStatus>()?),
    };
    let id = match str_field(c, "CheckID")? {
        id if id.is_empty() => str_field(c, "ID")?,
        id => id,
    };
    Ok(CheckRegistration {
        id,
        name: str_field(c, "Name")?,
        ttl,
        status,
        notes: str_field(c, "Notes")?,
    })
}

fn parse_registration(bytes: &[u8]) -> Result<ServiceRegistration, String> {
    let obj = match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => m,
        Ok(other) => return Err(format!("expected an object, got {other}")),
        Err(e) => return Err(e.to_string()),
    };
    let mut reg = ServiceRegistration::new(&str_field(&obj, "Name")?, 0);
    reg.id = str_field(&obj, "ID")?;
    reg.address = str_field(&obj, "Address")?;
    if let Some(p) = field(&obj, "Port") {
        reg.port = p
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| format!("Port: invalid port {p}"))?;
    }
    if let Some(t) = field(&obj, "Tags") {
        reg.tags = t
            .as_array()
            .ok_or_else(|| format!("Tags: expected an array, got {t}"))?
            .iter()
            .map(|t| t.as_str().map(str::to_owned).ok_or(format!("Tags: {t}")))
            .collect::<Result<_, _>>()?;
    }
    if let Some(m) = field(&obj, "Meta") {
        reg.meta = m
            .as_object()
            .ok_or_else(|| format!("Meta: expected an object, got {m}"))?
            .iter()
            .map(|(k, v)| {
                v.as_str()
                    .map(|v| (k.clone(), v.to_owned()))
                    .ok_or(format!("Meta: {k}: {v}"))
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(t) = field(&obj, "TaggedAddresses") {
        let t = t
            .as_object()
            .ok_or_else(|| format!("TaggedAddresses: expected an object, got {t}"))?;
        if !t.is_empty() {
            reg.tagged_addresses = Some(t.clone());
        }
    }
    if let Some(Value::Object(w)) = field(&obj, "Weights") {
        let get = |n: &str| field(w, n).and_then(Value::as_u64);
        reg.weights = (get("Passing").unwrap_or(1), get("Warning").unwrap_or(1));
    }
    reg.enable_tag_override = field(&obj, "EnableTagOverride")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if let Some(c) = field(&obj, "Check") {
        reg.checks.push(parse_check(c)?);
    }
    if let Some(cs) = field(&obj, "Checks") {
        for c in cs
            .as_array()
            .ok_or_else(|| format!("Checks: expected an array, got {cs}"))?
        {
            reg.checks.push(parse_check(c)?);
        }
    }
    Ok(reg)
}

async fn agent_register(sh: &Arc<Shared>, q: &Query, body: Body) -> Reply {
    let bytes = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(b) => b,
        Err(e) => {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: {e}"),
            )
        }
    };
    let reg = match parse_registration(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: {e}"),
            )
        }
    };
    if reg.name.is_empty() {
        return Reply::error(StatusCode::BAD_REQUEST, "Missing service name");
    }
    let replace = q.has("replace-existing-checks");
    sh.write(|st| {
        st.agent
            .register_service(&mut st.raft_index, reg, replace, Instant::now())
    });
    sh.timers_changed.notify_one();
    empty_ok()
}

fn empty_ok() -> Reply {
    Reply {
        status: StatusCode::OK,
        index: None,
        body: ReplyBody::Empty,
        filtered: false,
    }
}

fn agent_deregister(sh: &Arc<Shared>, id: &str) -> Reply {
    if sh.write(|st| st.agent.deregister_service(&mut st.raft_index, id)) {
        empty_ok()
    } else {
        Reply::error(
            StatusCode::NOT_FOUND,
            format!(
                "Unknown service ID {id:?}. Ensure that the service ID is passed, not the \
                 service name."
            ),
        )
    }
}

fn agent_check_update(sh: &Arc<Shared>, op: &str, id: &str, q: &Query) -> Reply {
    let status = match op {
        "pass" => CheckStatus::Passing,
        "warn" => CheckStatus::Warning,
        _ => CheckStatus::Critical,
    };
    let note = q.get("note").unwrap_or("");
    let found = sh.write(|st| {
        st.agent
            .update_check(&mut st.raft_index, id, status, note, Instant::now())
    });
    sh.timers_changed.notify_one();
    if found {
        empty_ok()
    } else {
        Reply::error(
            StatusCode::NOT_FOUND,
            format!(
                "Unknown check ID {id:?}. Ensure that the check ID is passed, not the check \
                 name."
            ),
        )
    }
}

// ---- blocking node views ----

fn node_json(sh: &Shared, st: &Store) -> Value {
    let addr = sh.opts.node_address.to_string();
    json!({
        "ID": sh.node_id,
        "Node": sh.opts.node_name,
        "Address": addr,
        "Datacenter": sh.opts.datacenter,
        "TaggedAddresses": {"lan": addr, "lan_ipv4": addr, "wan": addr, "wan_ipv4": addr},
        "Meta": {"consul-network-segment": ""},
        "CreateIndex": st.agent.node_index.max(1),
        "ModifyIndex": st.agent.node_index.max(1),
    })
}

fn catalog_service_json(s: &AgentService) -> Value {
    let mut v = json!({
        "ID": s.id,
        "Service": s.name,
        "Tags": s.tags,
        "Address": s.address,
        "Meta": s.meta,
        "Port": s.port,
        "Weights": weights_json(s.weights),
        "EnableTagOverride": s.enable_tag_override,
        "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
        "Connect": {},
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    });
    if let (Some(t), Some(obj)) = (&s.tagged_addresses, v.as_object_mut()) {
        obj.insert("TaggedAddresses".into(), Value::Object(t.clone()));
    }
    v
}

async fn catalog_node_services(sh: &Arc<Shared>, node: &str, q: &Query) -> Reply {
    if node.is_empty() {
        return Reply::error(StatusCode::BAD_REQUEST, "Missing node name");
    }
    blocking(sh, q, |st| {
        let index = st.agent.node_services_index();
        if node != sh.opts.node_name {
            return Reply::read(index, json!({"Node": null, "Services": null}));
        }
        let services: Vec<Value> = st
            .agent
            .services
            .values()
            .map(catalog_service_json)
            .collect();
        Reply::read(
            index,
            json!({"Node": node_json(sh, st), "Services": services}),
        )
    })
    .await
}

async fn health_node(sh: &Arc<Shared>, node: &str, q: &Query) -> Reply {
    if node.is_empty() {
        return Reply::error(StatusCode::BAD_REQUEST, "Missing node name");
    }
    blocking(sh, q, |st| {
        let index = st.agent.node_checks_index();
        if node != sh.opts.node_name {
            return Reply::read(index, json!([]));
        }
        let mut checks = vec![json!({
            "Node": node,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": "passing",
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": st.agent.node_index.max(1),
            "ModifyIndex": st.agent.node_index.max(1),
        })];
        checks.extend(st.agent.checks.values().map(|c| check_json(c, node, true)));
        Reply::read(index, Value::Array(checks))
    })
    .await
}

//! The HTTP API: Vault's envelope, its status codes, and the endpoints the emulator has.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::{Request, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Map, Value};

use super::policy::{allows, Capability, Policy};
use super::{Shared, State, Token, Version};
use crate::consul::{new_uuid, parse_go_duration};

/// Bodies larger than this get 413, as Vault's default `max_request_size` (32 MiB) would.
const MAX_BODY: usize = 32 * 1024 * 1024;
/// The token TTL when none is asked for (Vault's default `max_lease_ttl`, 768 h).
const DEFAULT_TTL: Duration = Duration::from_secs(768 * 3600);
/// The KV v2 mount.
const KV: &str = "secret/";

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

fn errors(status: StatusCode, messages: &[&str]) -> Response {
    (status, axum::Json(json!({ "errors": messages }))).into_response()
}

/// A refusal: its status and message, made a response where the handler returns.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        errors(self.0, &[&self.1])
    }
}

fn denied() -> Failure {
    Failure(StatusCode::FORBIDDEN, "permission denied".into())
}

/// Vault's response envelope.
fn envelope(data: Value, auth: Value, mount_type: &str) -> Value {
    json!({
        "request_id": new_uuid(),
        "lease_id": "",
        "renewable": false,
        "lease_duration": 0,
        "data": data,
        "wrap_info": null,
        "warnings": null,
        "auth": auth,
        "mount_type": mount_type,
    })
}

fn ok(data: Value, mount_type: &str) -> Response {
    (
        StatusCode::OK,
        axum::Json(envelope(data, Value::Null, mount_type)),
    )
        .into_response()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

fn token_of(headers: &HeaderMap) -> Option<String> {
    if let Some(t) = headers.get("x-vault-token").and_then(|v| v.to_str().ok()) {
        return Some(t.to_string());
    }
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string)
}

/// The live token of the request, if it is allowed `capability` on `path`.
fn authorize(
    st: &State,
    token: Option<&str>,
    path: &str,
    capability: Capability,
) -> Result<Token, Failure> {
    let token = token.and_then(|t| st.tokens.get(t)).ok_or_else(denied)?;
    if token.expires.is_some_and(|e| e <= Instant::now()) {
        return Err(denied());
    }
    let root = token.policies.iter().any(|p| p == "root");
    let policies: Vec<&Policy> = token
        .policies
        .iter()
        .filter_map(|name| st.policies.get(name).map(|(_, p)| p))
        .collect();
    if allows(&policies, root, path, capability) {
        Ok(token.clone())
    } else {
        Err(denied())
    }
}

fn body_json(body: &Bytes) -> Result<Value, Failure> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| {
        Failure(
            StatusCode::BAD_REQUEST,
            format!("failed to parse JSON input: {e}"),
        )
    })
}

async fn handle(AxState(sh): AxState<Arc<Shared>>, req: Request) -> Response {
    sh.requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return errors(StatusCode::PAYLOAD_TOO_LARGE, &["request body too large"]),
    };
    let Some(path) = parts.uri.path().strip_prefix("/v1/") else {
        return errors(StatusCode::NOT_FOUND, &[]);
    };
    let path = path.trim_end_matches('/');
    let sealed = sh.sealed.load(Ordering::Relaxed);
    if path == "sys/health" {
        let code = if sealed {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        return (
            code,
            axum::Json(json!({
                "initialized": true, "sealed": sealed, "standby": false,
                "performance_standby": false, "server_time_utc": now,
                "version": "1.17.0-vmesh-emulator", "cluster_name": "vault-emulator",
            })),
        )
            .into_response();
    }
    if sealed {
        return errors(StatusCode::SERVICE_UNAVAILABLE, &["Vault is sealed"]);
    }
    // What needs no token: the CA certificates, and logging in.
    if method_is(&parts.method, "GET") && (path == "pki/ca/pem" || path == "pki/cert/ca_chain") {
        let pem = sh
            .lock()
            .pki
            .as_ref()
            .map(|p| p.ca_pem().to_string())
            .unwrap_or_default();
        return (
            StatusCode::OK,
            [("content-type", "application/pem-certificate-chain")],
            pem,
        )
            .into_response();
    }
    // The CA certificate as JSON (`vault read pki/cert/ca`), also without a token.
    if method_is(&parts.method, "GET") && path == "pki/cert/ca" {
        let pem = sh.lock().pki.as_ref().map(|p| p.ca_pem().to_string());
        return match pem {
            Some(pem) => ok(
                json!({"certificate": pem.trim_end(), "revocation_time": 0}),
                "pki",
            ),
            None => errors(StatusCode::NOT_FOUND, &[]),
        };
    }
    if path == "auth/approle/login" {
        return match body_json(&body) {
            Ok(b) => approle_login(&mut sh.lock(), &b),
            Err(r) => r.into_response(),
        };
    }
    let token = token_of(&parts.headers);
    let token = token.as_deref();
    let query = parts.uri.query().unwrap_or("");
    let method = parts.method.as_str();
    let list =
        method == "LIST" || (method == "GET" && query.split('&').any(|kv| kv == "list=true"));
    let version = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("version="))
        .and_then(|v| v.parse::<usize>().ok());
    let mut st = sh.lock();
    let st = &mut *st;
    match path {
        "auth/token/lookup-self" => lookup_self(st, token),
        "auth/token/renew-self" => match body_json(&body) {
            Ok(b) => renew_self(st, token, &b),
            Err(r) => r.into_response(),
        },
        "auth/token/create" => match body_json(&body) {
            Ok(b) => create_token(st, token, &b),
            Err(r) => r.into_response(),
        },
        "sys/auth/approle" | "sys/mounts/pki" => {
            // Both are there from the start, as `vault server -dev` would have them after
            // `vault auth enable approle` and `vault secrets enable pki`.
            match authorize(st, token, path, Capability::Update) {
                Ok(_) => errors(
                    StatusCode::BAD_REQUEST,
                    &[&format!(
                        "path is already in use at {}/",
                        path.rsplit('/').next().unwrap_or(path)
                    )],
                ),
                Err(r) => r.into_response(),
            }
        }
        "pki/root/generate/internal" => match authorize(st, token, path, Capability::Update) {
            // The root made at start is the one there is.
            Ok(_) => ok(
                json!({"certificate": st.pki.as_ref().map(|p| p.ca_pem().trim_end().to_string())}),
                "pki",
            ),
            Err(r) => r.into_response(),
        },
        _ => {
            if let Some(rest) = path.strip_prefix("pki/") {
                return pki(st, token, method, path, rest, &body);
            }
            if let Some(rest) = path.strip_prefix("auth/approle/role/") {
                return approle(st, token, method, path, rest, &body);
            }
            if let Some(name) = path.strip_prefix("sys/policies/acl/") {
                return policy(st, token, method, name, &body);
            }
            if let Some(key) = path.strip_prefix(&format!("{KV}data/")) {
                return kv_data(st, token, method, path, key, version, &body);
            }
            if let Some(key) = path
                .strip_prefix(&format!("{KV}metadata"))
                .map(|k| k.trim_start_matches('/'))
            {
                return if list {
                    kv_list(st, token, path, key)
                } else {
                    kv_metadata(st, token, path, key)
                };
            }
            errors(
                StatusCode::NOT_FOUND,
                &[&format!(
                    "no handler for route \"{path}\". route entry not found."
                )],
            )
        }
    }
}

fn method_is(m: &axum::http::Method, name: &str) -> bool {
    m.as_str() == name
}

fn pki(
    st: &mut State,
    token: Option<&str>,
    method: &str,
    path: &str,
    rest: &str,
    body: &Bytes,
) -> Response {
    let body = match body_json(body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let Some(pki) = st.pki.as_ref() else {
        return errors(StatusCode::NOT_FOUND, &[]);
    };
    if let Some(name) = rest.strip_prefix("roles/") {
        return match method {
            "GET" => match authorize(st, token, path, Capability::Read) {
                Ok(_) => match pki.roles.get(name) {
                    Some(role) => ok(role.to_json(), "pki"),
                    None => errors(StatusCode::NOT_FOUND, &[]),
                },
                Err(r) => r.into_response(),
            },
            "PUT" | "POST" => {
                let cap = if pki.roles.contains_key(name) {
                    Capability::Update
                } else {
                    Capability::Create
                };
                if let Err(r) = authorize(st, token, path, cap) {
                    return r.into_response();
                }
                match super::pki::Role::from_body(&body) {
                    Ok(role) => {
                        if let Some(pki) = st.pki.as_mut() {
                            pki.roles.insert(name.to_string(), role);
                        }
                        StatusCode::NO_CONTENT.into_response()
                    }
                    Err(e) => errors(StatusCode::BAD_REQUEST, &[&e]),
                }
            }
            _ => errors(StatusCode::METHOD_NOT_ALLOWED, &["unsupported operation"]),
        };
    }
    let (sign, role) = match (rest.strip_prefix("sign/"), rest.strip_prefix("issue/")) {
        (Some(role), _) => (true, role),
        (None, Some(role)) => (false, role),
        _ => {
            return errors(
                StatusCode::NOT_FOUND,
                &[&format!("no handler for route \"{path}\"")],
            )
        }
    };
    if !matches!(method, "PUT" | "POST") {
        return errors(StatusCode::METHOD_NOT_ALLOWED, &["unsupported operation"]);
    }
    if let Err(r) = authorize(st, token, path, Capability::Update) {
        return r.into_response();
    }
    let Some(role) = pki.roles.get(role) else {
        return errors(StatusCode::BAD_REQUEST, &[&format!("unknown role: {role}")]);
    };
    let signed = if sign {
        pki.sign_csr(role, &body)
    } else {
        pki.issue(role, &body)
    };
    match signed {
        Ok(data) => ok(data, "pki"),
        Err(e) => errors(StatusCode::BAD_REQUEST, &[&e]),
    }
}

fn approle(
    st: &mut State,
    token: Option<&str>,
    method: &str,
    path: &str,
    rest: &str,
    body: &Bytes,
) -> Response {
    let body = match body_json(body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let (name, what) = rest.split_once('/').unwrap_or((rest, ""));
    match (method, what) {
        ("PUT" | "POST", "") => {
            if let Err(r) = authorize(st, token, path, Capability::Update) {
                return r.into_response();
            }
            let policies: Vec<String> = match body.get("token_policies").or(body.get("policies")) {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|p| p.as_str().map(str::to_string))
                    .collect(),
                Some(Value::String(s)) => s
                    .split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect(),
                _ => Vec::new(),
            };
            let token_ttl = match body.get("token_ttl") {
                Some(Value::String(s)) => parse_go_duration(s).ok(),
                Some(Value::Number(n)) => n.as_u64().map(Duration::from_secs),
                _ => None,
            };
            let role = st.approles.entry(name.to_string()).or_default();
            if role.role_id.is_empty() {
                role.role_id = new_uuid();
            }
            role.policies = policies;
            role.token_ttl = token_ttl;
            StatusCode::NO_CONTENT.into_response()
        }
        ("GET", "role-id") => match authorize(st, token, path, Capability::Read) {
            Ok(_) => match st.approles.get(name) {
                Some(role) => ok(json!({"role_id": role.role_id}), "approle"),
                None => errors(StatusCode::BAD_REQUEST, &["role does not exist"]),
            },
            Err(r) => r.into_response(),
        },
        ("PUT" | "POST", "secret-id") => {
            if let Err(r) = authorize(st, token, path, Capability::Update) {
                return r.into_response();
            }
            let Some(role) = st.approles.get_mut(name) else {
                return errors(StatusCode::BAD_REQUEST, &["role does not exist"]);
            };
            let secret_id = new_uuid();
            role.secret_ids.insert(secret_id.clone());
            ok(
                json!({"secret_id": secret_id, "secret_id_accessor": new_uuid(), "secret_id_ttl": 0, "secret_id_num_uses": 0}),
                "approle",
            )
        }
        _ => errors(StatusCode::METHOD_NOT_ALLOWED, &["unsupported operation"]),
    }
}

fn approle_login(st: &mut State, body: &Value) -> Response {
    let field = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or_default();
    let (role_id, secret_id) = (field("role_id"), field("secret_id"));
    let Some((name, role)) = st
        .approles
        .iter()
        .find(|(_, r)| r.role_id == role_id && r.secret_ids.contains(secret_id))
    else {
        return errors(StatusCode::BAD_REQUEST, &["invalid role or secret ID"]);
    };
    let ttl = role.token_ttl.unwrap_or(DEFAULT_TTL);
    let mut policies = role.policies.clone();
    policies.push("default".into());
    policies.sort();
    policies.dedup();
    let name = name.clone();
    let (id, t) = issue(st, policies, ttl, true);
    let mut auth = auth_block(&id, &t, ttl);
    auth["metadata"] = json!({ "role_name": name });
    (
        StatusCode::OK,
        axum::Json(envelope(Value::Null, auth, "approle")),
    )
        .into_response()
}

fn token_data(id: &str, t: &Token) -> Value {
    let ttl = t
        .expires
        .map(|e| e.saturating_duration_since(Instant::now()).as_secs())
        .unwrap_or(0);
    let expire_time = t
        .expires
        .map(|e| rfc3339(SystemTime::now() + e.saturating_duration_since(Instant::now())));
    json!({
        "accessor": t.accessor,
        "creation_time": t
            .issued
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "creation_ttl": t.creation_ttl.as_secs(),
        "display_name": "token",
        "entity_id": "",
        "expire_time": expire_time,
        "explicit_max_ttl": 0,
        "id": id,
        "issue_time": rfc3339(t.issued),
        "meta": null,
        "num_uses": 0,
        "orphan": false,
        "path": "auth/token/create",
        "policies": t.policies,
        "renewable": t.renewable,
        "ttl": ttl,
        "type": "service",
    })
}

fn auth_block(id: &str, t: &Token, lease: Duration) -> Value {
    json!({
        "client_token": id,
        "accessor": t.accessor,
        "policies": t.policies,
        "token_policies": t.policies,
        "metadata": null,
        "lease_duration": lease.as_secs(),
        "renewable": t.renewable,
        "entity_id": "",
        "token_type": "service",
        "orphan": false,
    })
}

fn lookup_self(st: &State, token: Option<&str>) -> Response {
    match authorize(st, token, "auth/token/lookup-self", Capability::Read) {
        Ok(t) => ok(token_data(token.unwrap_or_default(), &t), "token"),
        Err(r) => r.into_response(),
    }
}

fn renew_self(st: &mut State, token: Option<&str>, body: &Value) -> Response {
    let t = match authorize(st, token, "auth/token/renew-self", Capability::Update) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let id = token.unwrap_or_default();
    if !t.renewable {
        return errors(StatusCode::FORBIDDEN, &["lease is not renewable"]);
    }
    let increment = match body.get("increment") {
        None => t.creation_ttl,
        Some(Value::Number(n)) => Duration::from_secs(n.as_u64().unwrap_or(0)),
        Some(Value::String(s)) => match parse_go_duration(s) {
            Ok(d) => d,
            Err(e) => return errors(StatusCode::BAD_REQUEST, &[&e]),
        },
        Some(_) => return errors(StatusCode::BAD_REQUEST, &["increment must be a duration"]),
    };
    let lease = increment.min(DEFAULT_TTL);
    let Some(stored) = st.tokens.get_mut(id) else {
        return denied().into_response();
    };
    stored.expires = Some(Instant::now() + lease);
    let t = stored.clone();
    (
        StatusCode::OK,
        axum::Json(envelope(Value::Null, auth_block(id, &t, lease), "token")),
    )
        .into_response()
}

fn create_token(st: &mut State, token: Option<&str>, body: &Value) -> Response {
    if let Err(r) = authorize(st, token, "auth/token/create", Capability::Update) {
        return r.into_response();
    }
    let mut policies: Vec<String> = body
        .get("policies")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if !body
        .get("no_default_policy")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        && !policies.iter().any(|p| p == "root")
    {
        policies.push("default".into());
    }
    policies.sort();
    policies.dedup();
    let ttl = match body.get("ttl") {
        None => DEFAULT_TTL,
        Some(Value::String(s)) => match parse_go_duration(s) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => DEFAULT_TTL,
            Err(e) => return errors(StatusCode::BAD_REQUEST, &[&e]),
        },
        Some(Value::Number(n)) => Duration::from_secs(n.as_u64().unwrap_or(0)),
        Some(_) => return errors(StatusCode::BAD_REQUEST, &["ttl must be a duration"]),
    };
    let renewable = body
        .get("renewable")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let (id, t) = issue(st, policies, ttl, renewable);
    (
        StatusCode::OK,
        axum::Json(envelope(Value::Null, auth_block(&id, &t, ttl), "token")),
    )
        .into_response()
}

/// A new service token, stored.
fn issue(st: &mut State, policies: Vec<String>, ttl: Duration, renewable: bool) -> (String, Token) {
    let id = format!("hvs.{}", new_uuid().replace('-', ""));
    let t = Token {
        accessor: new_uuid(),
        policies,
        expires: Some(Instant::now() + ttl),
        creation_ttl: ttl,
        renewable,
        issued: SystemTime::now(),
    };
    st.tokens.insert(id.clone(), t.clone());
    (id, t)
}

fn policy(st: &mut State, token: Option<&str>, method: &str, name: &str, body: &Bytes) -> Response {
    let path = format!("sys/policies/acl/{name}");
    match method {
        "GET" => {
            if let Err(r) = authorize(st, token, &path, Capability::Read) {
                return r.into_response();
            }
            match st.policies.get(name) {
                Some((text, _)) => ok(json!({"name": name, "policy": text}), "system"),
                None => errors(StatusCode::NOT_FOUND, &[]),
            }
        }
        "PUT" | "POST" => {
            let cap = if st.policies.contains_key(name) {
                Capability::Update
            } else {
                Capability::Create
            };
            if let Err(r) = authorize(st, token, &path, cap) {
                return r.into_response();
            }
            let body = match body_json(body) {
                Ok(b) => b,
                Err(r) => return r.into_response(),
            };
            let Some(text) = body.get("policy").and_then(Value::as_str) else {
                return errors(
                    StatusCode::BAD_REQUEST,
                    &["'policy' parameter not supplied or empty"],
                );
            };
            match Policy::parse(text) {
                Ok(p) => {
                    st.policies.insert(name.to_string(), (text.to_string(), p));
                    StatusCode::NO_CONTENT.into_response()
                }
                Err(e) => errors(StatusCode::BAD_REQUEST, &[&e]),
            }
        }
        "DELETE" => {
            if let Err(r) = authorize(st, token, &path, Capability::Delete) {
                return r.into_response();
            }
            st.policies.remove(name);
            StatusCode::NO_CONTENT.into_response()
        }
        _ => errors(StatusCode::METHOD_NOT_ALLOWED, &["unsupported operation"]),
    }
}

fn version_metadata(n: usize, v: &Version) -> Value {
    json!({
        "created_time": rfc3339(v.created),
        "custom_metadata": null,
        "deletion_time": v.deleted.map(rfc3339).unwrap_or_default(),
        "destroyed": false,
        "version": n,
    })
}

fn kv_data(
    st: &mut State,
    token: Option<&str>,
    method: &str,
    path: &str,
    key: &str,
    version: Option<usize>,
    body: &Bytes,
) -> Response {
    match method {
        "GET" => {
            if let Err(r) = authorize(st, token, path, Capability::Read) {
                return r.into_response();
            }
            let Some(secret) = st.kv.get(key) else {
                return errors(StatusCode::NOT_FOUND, &[]);
            };
            let n = version.unwrap_or(secret.versions.len());
            let Some(v) = n.checked_sub(1).and_then(|i| secret.versions.get(i)) else {
                return errors(StatusCode::NOT_FOUND, &[]);
            };
            let data = json!({"data": v.data, "metadata": version_metadata(n, v)});
            let status = if v.data.is_some() {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            };
            (status, axum::Json(envelope(data, Value::Null, "kv"))).into_response()
        }
        "PUT" | "POST" => {
            let cap = if st.kv.contains_key(key) {
                Capability::Update
            } else {
                Capability::Create
            };
            if let Err(r) = authorize(st, token, path, cap) {
                return r.into_response();
            }
            let body = match body_json(body) {
                Ok(b) => b,
                Err(r) => return r.into_response(),
            };
            let Some(data) = body.get("data").and_then(Value::as_object).cloned() else {
                return errors(StatusCode::BAD_REQUEST, &["no data provided"]);
            };
            let secret = st.kv.entry(key.to_string()).or_default();
            if let Some(cas) = body.pointer("/options/cas").and_then(Value::as_u64) {
                if cas as usize != secret.versions.len() {
                    return errors(
                        StatusCode::BAD_REQUEST,
                        &["check-and-set parameter did not match the current version"],
                    );
                }
            }
            let now = SystemTime::now();
            secret.versions.push(Version {
                data: Some(Map::clone(&data)),
                created: now,
                deleted: None,
            });
            secret.created.get_or_insert(now);
            secret.updated = Some(now);
            let n = secret.versions.len();
            let meta = version_metadata(n, &secret.versions[n - 1]);
            ok(meta, "kv")
        }
        "DELETE" => {
            if let Err(r) = authorize(st, token, path, Capability::Delete) {
                return r.into_response();
            }
            if let Some(v) = st.kv.get_mut(key).and_then(|s| s.versions.last_mut()) {
                v.data = None;
                v.deleted = Some(SystemTime::now());
            }
            StatusCode::NO_CONTENT.into_response()
        }
        _ => errors(StatusCode::METHOD_NOT_ALLOWED, &["unsupported operation"]),
    }
}

fn kv_metadata(st: &State, token: Option<&str>, path: &str, key: &str) -> Response {
    if let Err(r) = authorize(st, token, path, Capability::Read) {
        return r.into_response();
    }
    let Some(secret) = st.kv.get(key) else {
        return errors(StatusCode::NOT_FOUND, &[]);
    };
    let versions: Map<String, Value> = secret
        .versions
        .iter()
        .enumerate()
        .map(|(i, v)| {
            (
                (i + 1).to_string(),
                json!({
                    "created_time": rfc3339(v.created),
                    "deletion_time": v.deleted.map(rfc3339).unwrap_or_default(),
                    "destroyed": false,
                }),
            )
        })
        .collect();
    ok(
        json!({
            "cas_required": false,
            "created_time": secret.created.map(rfc3339),
            "current_version": secret.versions.len(),
            "custom_metadata": null,
            "delete_version_after": "0s",
            "max_versions": 0,
            "oldest_version": 0,
            "updated_time": secret.updated.map(rfc3339),
            "versions": versions,
        }),
        "kv",
    )
}

fn kv_list(st: &State, token: Option<&str>, path: &str, prefix: &str) -> Response {
    if let Err(r) = authorize(st, token, path, Capability::List) {
        return r.into_response();
    }
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    let mut keys: Vec<String> = st
        .kv
        .keys()
        .filter_map(|k| k.strip_prefix(&prefix))
        .map(|rest| match rest.find('/') {
            Some(i) => rest[..=i].to_string(),
            None => rest.to_string(),
        })
        .collect();
    keys.dedup();
    if keys.is_empty() {
        return errors(StatusCode::NOT_FOUND, &[]);
    }
    ok(json!({ "keys": keys }), "kv")
}

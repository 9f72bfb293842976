//! The admin HTTP endpoint: liveness, readiness, Prometheus metrics, object
//! status and a per-proxy config dump.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::json;
use vmesh_layout::{ControllerStatus, ProxyState, SourceState};
use vmesh_runtime::Readiness;
use vmesh_xds::resource::{short_type, Resource};
use vmesh_xds::server::Connections;

use crate::index::PublishedRx;
use crate::source::SourceHealth;
use crate::status::{local_acks, object_statuses, NackLog};

#[derive(Clone)]
pub struct AdminState {
    pub published: PublishedRx,
    pub connections: Arc<Connections>,
    pub nacks: Arc<NackLog>,
    pub health: Arc<SourceHealth>,
    pub registry: Arc<Registry>,
    /// The relay's agents, when the relay runs.
    pub agents: Option<Arc<crate::relay::Hub>>,
    /// Every component's state.
    pub readiness: Readiness,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/status/{kind}/{name}", get(status_one))
        .route("/config_dump", get(config_dump))
        .route("/agents", get(agents))
        .with_state(state)
}

/// Ready once the first config is translated and every component is serving (ready, or
/// degraded but still serving). A config source that cannot be read does not make the controller
/// unready: it keeps serving the last config it read, which is what proxies need; it says so
/// here, in /status and in the metrics. The first line sums it up; then one line per component.
async fn ready(State(s): State<AdminState>) -> Response {
    let generation = s.published.borrow().as_ref().map(|p| p.generation);
    let components = s.readiness.states();
    let mut text = match (generation, s.health.degraded()) {
        (None, Some(d)) => format!(
            "not ready, degraded: the config source failed {} times in a row ({})\n",
            d.failures, d.error
        ),
        (None, None) => "not ready: no config translated yet\n".to_string(),
        (Some(g), None) => format!("ready (generation {g})\n"),
        (Some(g), Some(d)) => format!(
            "ready, degraded: the config source failed {} times in a row, for {}s ({}); serving generation {g}\n",
            d.failures,
            d.since.elapsed().map(|e| e.as_secs()).unwrap_or(0),
            d.error
        ),
    };
    let waiting: Vec<&str> = components
        .iter()
        .filter(|(_, state)| !state.is_serving())
        .map(|(name, _)| *name)
        .collect();
    let ready = generation.is_some() && waiting.is_empty();
    if generation.is_some() && !ready {
        text = format!("not ready: {} not serving\n", waiting.join(", "));
    }
    for (name, state) in &components {
        text.push_str(&format!("{name}: {state}\n"));
    }
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, text).into_response()
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &s.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn not_ready() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": "no config translated yet"})),
    )
        .into_response()
}

async fn status(State(s): State<AdminState>) -> Response {
    let Some(published) = s.published.borrow().clone() else {
        return not_ready();
    };
    let connections = s.connections.list();
    let acks = local_acks(&published, &connections);
    let proxies = published
        .translation
        .proxies
        .keys()
        .map(|name| {
            let streams: Vec<_> = connections.iter().filter(|c| &c.node == name).collect();
            ProxyState {
                name: name.clone(),
                connected: streams.len(),
                in_sync: !streams.is_empty() && streams.iter().all(|c| c.in_sync),
            }
        })
        .collect();
    Json(ControllerStatus {
        generation: published.generation,
        translation_ms: published.took.as_secs_f64() * 1e3,
        source: match s.health.degraded() {
            None => SourceState {
                healthy: true,
                error: None,
                failures: None,
            },
            Some(d) => SourceState {
                healthy: false,
                error: Some(d.error),
                failures: Some(d.failures),
            },
        },
        objects: object_statuses(&published, &acks, &s.nacks),
        source_errors: published
            .source_errors
            .iter()
            .map(|(source, problems)| (source.clone(), vmesh_model::limits::shown(problems)))
            .collect(),
        proxies,
    })
    .into_response()
}

async fn status_one(
    State(s): State<AdminState>,
    Path((kind, name)): Path<(String, String)>,
) -> Response {
    let Some(published) = s.published.borrow().clone() else {
        return not_ready();
    };
    let connections = s.connections.list();
    let acks = local_acks(&published, &connections);
    match object_statuses(&published, &acks, &s.nacks)
        .into_iter()
        .find(|o| o.kind == kind && o.name == name)
    {
        Some(o) => Json(o).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no object {kind}/{name}")})),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct DumpQuery {
    proxy: String,
}

async fn config_dump(State(s): State<AdminState>, Query(q): Query<DumpQuery>) -> Response {
    let Some(published) = s.published.borrow().clone() else {
        return not_ready();
    };
    let Some(output) = published.translation.proxies.get(&q.proxy) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no gateway applies to proxy {:?}", q.proxy)})),
        )
            .into_response();
    };
    let connections: Vec<_> = s
        .connections
        .list()
        .into_iter()
        .filter(|c| c.node == q.proxy)
        .collect();
    let mut resources = Vec::new();
    for (type_url, by_name) in &output.snapshot.resources {
        for (name, r) in by_name {
            let key = (type_url.to_string(), name.clone());
            let acked = connections
                .iter()
                .filter(|c| c.acked.get(&key) == Some(&r.version))
                .count();
            let origins: Vec<String> = output
                .origins
                .get(&(*type_url, name.clone()))
                .map(|o| o.iter().map(|k| k.to_string()).collect())
                .unwrap_or_default();
            resources.push(json!({
                "type": short_type(type_url),
                "name": name,
                "version": r.version,
                "origins": origins,
                "ackedBy": acked,
                "body": render(r),
            }));
        }
    }
    Json(json!({
        "proxy": q.proxy,
        "generation": published.generation,
        "connections": connections.iter().map(|c| json!({"mode": c.mode.as_str(), "inSync": c.in_sync})).collect::<Vec<_>>(),
        "resources": resources,
    }))
    .into_response()
}

/// A resource body in Envoy's JSON form, as Envoy's own `/config_dump` prints it.
/// A secret's private key is never shown ([`vmesh_translate::redacted_secret`]).
fn render(r: &Resource) -> serde_json::Value {
    let redacted;
    let bytes = if r.type_url == vmesh_xds::resource::SECRET {
        let Some(secret) = vmesh_translate::redacted_secret(&r.body.value) else {
            return json!({ "error": "not a Secret" });
        };
        redacted = prost::Message::encode_to_vec(&secret);
        &redacted
    } else {
        &r.body.value
    };
    vmesh_envoy_json::to_json(r.type_url, bytes).unwrap_or_else(|e| json!({ "error": e }))
}

/// The agents the relay knows: connected, or within their grace period.
async fn agents(State(state): State<AdminState>) -> Response {
    let Some(hub) = &state.agents else {
        return (
            StatusCode::NOT_FOUND,
            "the relay is off (start the controller with --relay-addr)\n",
        )
            .into_response();
    };
    let agents: Vec<serde_json::Value> = hub
        .agents()
        .into_iter()
        .map(|a| {
            serde_json::json!({
                "spiffe_id": a.id.to_string(),
                "connected": a.connected,
                "instances": a.instances,
            })
        })
        .collect();
    Json(serde_json::json!({ "agents": agents })).into_response()
}

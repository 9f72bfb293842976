use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;

/// Response header naming the echo server that answered.
pub const SERVED_BY_HEADER: &str = "x-served-by";
/// Request header that makes the echo answer with that status instead of 200 (e.g. `503`), for
/// retry and outlier-detection tests. The body is the usual JSON.
pub const ECHO_STATUS_HEADER: &str = "x-echo-status";

#[derive(Clone)]
struct EchoState {
    name: Arc<str>,
    served_by: HeaderValue,
    requests: Arc<AtomicU64>,
}

/// The echo service as an axum router: every request gets `200` with the JSON body
/// `{"service", "method", "path", "query", "headers": {name: value}, "body"}` and the header
/// `x-served-by: <name>`. `requests` counts the requests answered.
///
/// `query` is the raw query string or `null`; repeated headers are joined with `", "`; `body` is the
/// request body as (lossy) UTF-8.
pub fn echo_router(name: &str, requests: Arc<AtomicU64>) -> Router {
    let served_by = HeaderValue::from_str(name)
        .unwrap_or_else(|_| panic!("echo name {name:?} is not a valid header value"));
    Router::new().fallback(echo).with_state(EchoState {
        name: name.into(),
        served_by,
        requests,
    })
}

async fn echo(
    State(st): State<EchoState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    st.requests.fetch_add(1, Ordering::Relaxed);
    let mut hdrs: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in &headers {
        let v = String::from_utf8_lossy(v.as_bytes());
        hdrs.entry(k.as_str().to_owned())
            .and_modify(|acc| {
                acc.push_str(", ");
                acc.push_str(&v);
            })
            .or_insert_with(|| v.into_owned());
    }
    let status = headers
        .get(ECHO_STATUS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|v| StatusCode::from_u16(v).ok())
        .unwrap_or(StatusCode::OK);
    let json = serde_json::json!({
        "service": &*st.name,
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "headers": hdrs,
        "body": String::from_utf8_lossy(&body),
    });
    (
        status,
        [(
            HeaderName::from_static(SERVED_BY_HEADER),
            st.served_by.clone(),
        )],
        axum::Json(json),
    )
        .into_response()
}

/// An in-process echo upstream on `127.0.0.1:<free port>`, served from its own thread and tokio
/// runtime (so synchronous tests can use it). Stops, closing all its connections, on drop.
pub struct EchoServer {
    name: String,
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EchoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoServer")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl EchoServer {
    /// Starts an echo server named `name` on a free port of 127.0.0.1. It accepts connections
    /// as soon as this returns.
    pub fn start(name: &str) -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("echo {name}: bind 127.0.0.1:0: {e}"));
        Self::start_on(listener, name)
    }

    /// Starts an echo server on an already bound listener.
    pub fn start_on(listener: TcpListener, name: &str) -> EchoServer {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("echo {name}: local_addr: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("echo {name}: set_nonblocking: {e}"));
        let requests = Arc::new(AtomicU64::new(0));
        let router = echo_router(name, requests.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread_name = format!("echo-{name}");
        let thread = std::thread::Builder::new()
            .name(thread_name.clone())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => panic!("{thread_name}: tokio runtime: {e}"),
                };
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => panic!("{thread_name}: listener: {e}"),
                    };
                    tokio::select! {
                        res = axum::serve(listener, router).into_future() => {
                            if let Err(e) = res {
                                eprintln!("{thread_name}: server failed: {e}");
                            }
                        }
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime cancels every connection task, closing their sockets.
                drop(rt);
            })
            .unwrap_or_else(|e| panic!("echo {name}: spawn thread: {e}"));
        EchoServer {
            name: name.to_owned(),
            addr,
            requests,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests this server has answered.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_get;

    #[test]
    fn echoes_and_counts() {
        let echo = EchoServer::start("web-v1");
        let url = format!("{}/some/path?x=1&y=2", echo.url());
        let resp = http_get(&url, &[("x-test", "a"), ("host", "example.com")]).expect("get");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header(SERVED_BY_HEADER), Some("web-v1"));
        let v = resp.json().expect("json");
        assert_eq!(v["service"], "web-v1");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/some/path");
        assert_eq!(v["query"], "x=1&y=2");
        assert_eq!(v["headers"]["x-test"], "a");
        assert_eq!(v["headers"]["host"], "example.com");
        assert_eq!(echo.requests(), 1);

        let resp = crate::request(
            "POST",
            &echo.url(),
            &[(ECHO_STATUS_HEADER, "503")],
            Some(b"hi"),
        )
        .expect("post");
        assert_eq!(resp.status, 503);
        let v = resp.json().expect("json");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["query"], serde_json::Value::Null);
        assert_eq!(v["body"], "hi");
        assert_eq!(echo.requests(), 2);
    }

    #[test]
    fn stops_on_drop() {
        let client = crate::HttpClient::pooled();
        let echo = EchoServer::start("gone");
        let addr = echo.addr();
        client.get(&echo.url(), &[]).expect("get");
        drop(echo);
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "still accepting"
        );
        assert!(client.get(&format!("http://{addr}/"), &[]).is_err());
    }
}

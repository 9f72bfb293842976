use std::time::Duration;

/// A response, whatever its status (4xx and 5xx are not errors here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased, in the order received; a repeated header appears repeatedly.
    pub headers: Vec<(String, String)>,
    /// The body, decoded as UTF-8 (lossily).
    pub body: String,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_str(&self.body).map_err(|e| {
            format!(
                "response body (status {}) is not JSON: {e}: {:?}",
                self.status,
                truncate(&self.body, 500)
            )
        })
    }
}

/// A blocking HTTP/1.1 client (plain HTTP only) that does not follow redirects, returns 4xx/5xx
/// responses as `Ok`, ignores proxy environment variables and has a 10 s timeout per request.
///
/// [`HttpClient::new`] opens a new connection per request; [`HttpClient::pooled`] keeps idle
/// connections for reuse (for load tests). Cloning shares the pool.
#[derive(Clone)]
pub struct HttpClient {
    agent: ureq::Agent,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").finish_non_exhaustive()
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// A client that uses a fresh connection for every request.
    pub fn new() -> Self {
        Self::build(0, Duration::from_secs(10))
    }

    /// A client that keeps up to 64 idle connections per host for reuse.
    pub fn pooled() -> Self {
        Self::build(64, Duration::from_secs(10))
    }

    /// A client with a custom overall timeout per request (connect, send and read the body).
    pub fn with_timeout(timeout: Duration, pooled: bool) -> Self {
        Self::build(if pooled { 64 } else { 0 }, timeout)
    }

    fn build(idle: usize, timeout: Duration) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .max_idle_connections(idle)
            .max_idle_connections_per_host(idle)
            // Shorter than the controller's admin request timeout (10 s by default), after which
            // it closes a kept-alive connection: never reuse one it may be closing.
            .max_idle_age(Duration::from_secs(5))
            .timeout_global(Some(timeout))
            .build();
        Self {
            agent: ureq::Agent::new_with_config(config),
        }
    }

    /// `GET url` with the given extra headers (a `host` header overrides the URL's authority).
    pub fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<Response, String> {
        self.request("GET", url, headers, None)
    }

    /// Sends `method url` with the headers and, if given, the body.
    pub fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, String> {
        let what = || format!("{method} {url}");
        let mut builder = ureq::http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let invalid = |e: ureq::http::Error| format!("{}: invalid request: {e}", what());
        let result = match body {
            None => self.agent.run(builder.body(()).map_err(invalid)?),
            Some(b) => self.agent.run(builder.body(b).map_err(invalid)?),
        };
        let mut resp = result.map_err(|e| format!("{}: {e}", what()))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_vec()
            .map_err(|e| format!("{}: reading body: {e}", what()))?;
        Ok(Response {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }
}

/// `GET url` on a fresh connection (see [`HttpClient`]).
pub fn http_get(url: &str, headers: &[(&str, &str)]) -> Result<Response, String> {
    HttpClient::new().get(url, headers)
}

/// Sends one request on a fresh connection (see [`HttpClient`]).
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response, String> {
    HttpClient::new().request(method, url, headers, body)
}

/// Sends `request_head` byte for byte (the request line and headers, without the blank line
/// that ends them; `Connection: close` is added) to `127.0.0.1:port` and reads the response
/// until the server closes the connection: for what a real client may send and [`HttpClient`]
/// would tidy up (`/a/../b`, `%2F`, header names with `_`). A connection reset before any
/// response is `Err`. Responses with chunked bodies keep their chunk framing in `body`.
pub fn raw_request(port: u16, request_head: &str) -> Result<Response, String> {
    use std::io::{Read, Write};
    let what = || format!("{:?}", request_head.lines().next().unwrap_or_default());
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| format!("{}: connect to port {port}: {e}", what()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let head = format!("{}\r\nconnection: close\r\n\r\n", request_head.trim_end());
    stream
        .write_all(head.as_bytes())
        .map_err(|e| format!("{}: send: {e}", what()))?;
    let mut bytes = Vec::new();
    if let Err(e) = stream.read_to_end(&mut bytes) {
        if bytes.is_empty() {
            return Err(format!("{}: no response: {e}", what()));
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{}: incomplete response {text:?}", what()))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("{}: no status line in {text:?}", what()))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

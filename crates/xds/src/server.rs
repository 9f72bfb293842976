//! The ADS gRPC service (state of the world and delta) around [`Stream`].
//!
//! Each stream waits for its first request to learn the proxy's node id, asks the
//! [`Authorize`] hook (if any) whether the stream's peer may speak for that node, then
//! moves bytes between the proxy, the state machine and the published
//! snapshots. All protocol decisions are the state machine's.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream as FutStream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status, Streaming};
use tracing::{debug, info, warn, Instrument};

use crate::resource::{short_type, ProxySnapshot};
use crate::stream::{Event, Mode, Response, SentMemory, Stream};

/// Every proxy's target resources, by node id, as published by the controller.
pub type Snapshots = BTreeMap<String, Arc<ProxySnapshot>>;

/// What the server reads: `None` until the controller has built its first snapshot. Streams
/// wait for it, so a restarted controller never tells a proxy that its config is empty.
pub type SnapshotsRx = watch::Receiver<Option<Arc<Snapshots>>>;

/// Identifies one ADS stream.
#[derive(Clone, Debug)]
pub struct StreamInfo {
    pub id: u64,
    pub node: String,
    pub mode: Mode,
}

/// Hooks for metrics and logs. Every method has a default that does nothing.
pub trait Observer: Send + Sync + 'static {
    fn opened(&self, _stream: &StreamInfo) {}
    fn closed(&self, _stream: &StreamInfo) {}
    fn sent(&self, _stream: &StreamInfo, _response: &Response) {}
    fn event(&self, _stream: &StreamInfo, _event: &Event) {}
}

/// An observer that observes nothing.
pub struct NoObserver;
impl Observer for NoObserver {}

/// Who may speak for a node. The server knows nothing of identities: it hands over what the
/// transport knows of the call (`extensions`: the peer's address and verified certificates, as
/// the listener recorded them) and the node id the stream's first request names.
pub trait Authorize: Send + Sync + 'static {
    /// `Ok`: the stream may go on. `Err`: it is ended with that status before anything is
    /// sent. (A credential that expires later is the transport's to enforce: the connection
    /// should not outlive it.)
    fn authorize(&self, extensions: &tonic::Extensions, node: &str) -> Result<(), Status>;
}

/// One connected stream and what its proxy has acknowledged.
#[derive(Clone, Debug)]
pub struct Connection {
    pub node: String,
    pub mode: Mode,
    /// (type URL, resource name) → acknowledged version.
    pub acked: HashMap<(String, String), String>,
    /// Of composed resources: (type URL, resource name) → part key → acknowledged version.
    pub acked_parts: HashMap<(String, String), BTreeMap<String, String>>,
    /// Whether the proxy holds exactly its target.
    pub in_sync: bool,
}

/// The connected streams, for status and readiness. Its generation moves on every change.
pub struct Connections {
    inner: Mutex<BTreeMap<u64, Connection>>,
    generation: watch::Sender<u64>,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            inner: Mutex::new(BTreeMap::new()),
            generation: watch::channel(0).0,
        }
    }
}

impl Connections {
    pub fn list(&self) -> Vec<Connection> {
        self.lock().values().cloned().collect()
    }

    /// Wakes when a stream opens, closes or acknowledges something.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Connection>> {
        // A panic elsewhere while holding the lock leaves the map whole; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, info: &StreamInfo, stream: &Stream) {
        let acked = stream
            .acked()
            .map(|(t, n, v)| ((t.to_string(), n.to_string()), v.to_string()))
            .collect();
        let mut acked_parts: HashMap<(String, String), BTreeMap<String, String>> = HashMap::new();
        for (t, n, key, version) in stream.acked_parts() {
            acked_parts
                .entry((t.to_string(), n.to_string()))
                .or_default()
                .insert(key.to_string(), version.to_string());
        }
        self.lock().insert(
            info.id,
            Connection {
                node: info.node.clone(),
                mode: info.mode,
                acked,
                acked_parts,
                in_sync: stream.in_sync(),
            },
        );
        self.generation.send_modify(|g| *g += 1);
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
        self.generation.send_modify(|g| *g += 1);
    }
}

/// The ADS service. Cheap to clone.
#[derive(Clone)]
pub struct AdsServer {
    inner: Arc<Inner>,
}

struct Inner {
    snapshots: SnapshotsRx,
    connections: Arc<Connections>,
    observer: Arc<dyn Observer>,
    authorizer: Option<Arc<dyn Authorize>>,
    next_id: AtomicU64,
    empty: Arc<ProxySnapshot>,
    /// What the streams sent of composed resources, for proxies that reconnect.
    memory: Arc<SentMemory>,
}

impl AdsServer {
    /// A server that serves every stream the config of the node it names.
    pub fn new(
        snapshots: SnapshotsRx,
        connections: Arc<Connections>,
        observer: Arc<dyn Observer>,
    ) -> Self {
        Self::build(snapshots, connections, observer, None)
    }

    /// A server that serves a stream only once `authorizer` let it speak for its node.
    pub fn with_authorizer(
        snapshots: SnapshotsRx,
        connections: Arc<Connections>,
        observer: Arc<dyn Observer>,
        authorizer: Arc<dyn Authorize>,
    ) -> Self {
        Self::build(snapshots, connections, observer, Some(authorizer))
    }

    fn build(
        snapshots: SnapshotsRx,
        connections: Arc<Connections>,
        observer: Arc<dyn Observer>,
        authorizer: Option<Arc<dyn Authorize>>,
    ) -> Self {
        AdsServer {
            inner: Arc::new(Inner {
                snapshots,
                connections,
                observer,
                authorizer,
                next_id: AtomicU64::new(1),
                empty: Arc::new(ProxySnapshot::default()),
                memory: Arc::new(SentMemory::default()),
            }),
        }
    }

    /// The tonic service to add to a server.
    pub fn service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(256 << 20)
    }

    fn spawn<Req, Resp>(
        &self,
        mode: Mode,
        request: Request<Streaming<Req>>,
    ) -> ReceiverStream<Result<Resp, Status>>
    where
        Req: AdsRequest,
        Resp: Send + 'static,
        Response: IntoWire<Resp>,
    {
        let (tx, rx) = mpsc::channel(16);
        let inner = self.inner.clone();
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            "ads",
            stream = id,
            mode = mode.as_str(),
            node = tracing::field::Empty
        );
        let (_, extensions, inbound) = request.into_parts();
        tokio::spawn(run_stream(inner, id, mode, extensions, inbound, tx).instrument(span));
        ReceiverStream::new(rx)
    }
}

/// What the stream task needs of a request type.
pub trait AdsRequest: prost::Message + Default + Send + 'static {
    fn node(&self) -> Option<&Node>;
    fn handle(&self, stream: &mut Stream) -> Vec<Event>;
}

impl AdsRequest for DiscoveryRequest {
    fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }
    fn handle(&self, stream: &mut Stream) -> Vec<Event> {
        stream.handle_sotw(self)
    }
}

impl AdsRequest for DeltaDiscoveryRequest {
    fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }
    fn handle(&self, stream: &mut Stream) -> Vec<Event> {
        stream.handle_delta(self)
    }
}

/// Turns a state-machine response into the message of one protocol.
pub trait IntoWire<T> {
    fn into_wire(self) -> Option<T>;
}

impl IntoWire<DiscoveryResponse> for Response {
    fn into_wire(self) -> Option<DiscoveryResponse> {
        match self {
            Response::Sotw(r) => Some(r),
            Response::Delta(_) => None,
        }
    }
}

impl IntoWire<DeltaDiscoveryResponse> for Response {
    fn into_wire(self) -> Option<DeltaDiscoveryResponse> {
        match self {
            Response::Delta(r) => Some(r),
            Response::Sotw(_) => None,
        }
    }
}

async fn run_stream<Req, Resp>(
    inner: Arc<Inner>,
    id: u64,
    mode: Mode,
    extensions: tonic::Extensions,
    mut inbound: Streaming<Req>,
    tx: mpsc::Sender<Result<Resp, Status>>,
) where
    Req: AdsRequest,
    Response: IntoWire<Resp>,
{
    let first = match inbound.message().await {
        Ok(Some(req)) => req,
        Ok(None) => return,
        Err(status) => {
            // A request over the size limit, or a client gone: say why, if it still listens.
            debug!(%status, "stream ended before its first request");
            let _ = tx.send(Err(status)).await;
            return;
        }
    };
    let node = first.node().map(|n| n.id.clone()).unwrap_or_default();
    if node.is_empty() {
        warn!("refusing a stream whose first request has no node.id");
        let _ = tx
            .send(Err(Status::invalid_argument(
                "the first request of a stream must carry node.id",
            )))
            .await;
        return;
    }
    tracing::Span::current().record("node", node.as_str());
    if let Some(authorizer) = &inner.authorizer {
        if let Err(status) = authorizer.authorize(&extensions, &node) {
            let _ = tx.send(Err(status)).await;
            return;
        }
    }
    drop(extensions);
    let info = StreamInfo { id, node, mode };
    info!(node = %info.node, "proxy connected");
    inner.observer.opened(&info);

    let mut snapshots = inner.snapshots.clone();
    if snapshots.wait_for(Option::is_some).await.is_err() {
        return;
    }
    let lookup = |all: &Option<Arc<Snapshots>>| {
        all.as_ref()
            .and_then(|all| all.get(&info.node).cloned())
            .unwrap_or_else(|| inner.empty.clone())
    };
    let target = lookup(&snapshots.borrow_and_update());
    let mut stream = Stream::new(mode, target).remembering(inner.memory.clone());
    inner.connections.update(&info, &stream);

    let mut next = Some(first);
    loop {
        if let Some(req) = next.take() {
            for event in req.handle(&mut stream) {
                log_event(&info, &event);
                inner.observer.event(&info, &event);
            }
            // Any request may change what the proxy holds: an ACK, or versions it
            // brought from an earlier stream.
            inner.connections.update(&info, &stream);
        }
        for response in stream.poll() {
            inner.observer.sent(&info, &response);
            debug!(
                r#type = short_type(response.type_url()),
                nonce = response.nonce(),
                "push"
            );
            let Some(wire) = response.into_wire() else {
                continue;
            };
            if tx.send(Ok(wire)).await.is_err() {
                break;
            }
        }
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => next = Some(req),
                Ok(None) => break,
                Err(status) => {
                    debug!(%status, "stream error");
                    let _ = tx.send(Err(status)).await;
                    break;
                }
            },
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                let target = lookup(&snapshots.borrow_and_update());
                if !Arc::ptr_eq(&target, stream.target()) {
                    stream.set_target(target);
                }
            }
            _ = tx.closed() => break,
        }
    }
    inner.connections.remove(id);
    inner.observer.closed(&info);
    info!(node = %info.node, "proxy disconnected");
}

fn log_event(info: &StreamInfo, event: &Event) {
    match event {
        Event::Ack {
            type_url,
            committed,
        } => debug!(
            node = %info.node,
            r#type = short_type(type_url),
            resources = committed.len(),
            "ack"
        ),
        Event::Nack {
            type_url,
            rejected,
            parts,
            trying,
            message,
        } => warn!(
            node = %info.node,
            r#type = short_type(type_url),
            rejected = ?rejected.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            at_fault = ?parts.iter().map(|(_, key)| key.as_str()).collect::<Vec<_>>(),
            trying_one_by_one = ?trying,
            message = %message.trim_end(),
            "proxy rejected config"
        ),
        Event::StaleNonce { type_url } => {
            debug!(node = %info.node, r#type = short_type(type_url), "stale nonce ignored")
        }
    }
}

type BoxStream<T> = Pin<Box<dyn FutStream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, Status> {
        let out = self.spawn(Mode::Sotw, request);
        Ok(tonic::Response::new(Box::pin(out)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let out = self.spawn(Mode::Delta, request);
        Ok(tonic::Response::new(Box::pin(out)))
    }
}

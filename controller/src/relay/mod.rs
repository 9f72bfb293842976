//! The relay: where `vmesh-agent`s register (a bootstrap token and a CSR for a short-lived
//! client certificate), renew, and stream the services of their VM. The rules are in
//! `vmesh-relay` (no IO); these modules move bytes:
//!
//! - `registration`: who may call, registration and renewal, on the registry and the CA.
//! - `tokens`: the bootstrap tokens, watched, so a bad token costs no Consul read.
//!
//! The listener's TLS (the controller's server certificate, handshakes) is the crate's `tls`,
//! shared with the xDS port; refusals are counted and logged by the crate's `refusals`, and
//! registrations limited per source address here.
//! - `service`: the `Registration` and `Relay` gRPC services (the only place that knows tonic).
//! - `hub`: the shell around `HubState`: streams, the deny list, the catalog published to the
//!   index.
//! - `revocations`: the deny list, watched in Consul KV (`records`: one way to watch records).
//! - `replicas`: discovery shared with the other replicas through Consul KV.
//!
//! [`Relay::start`] loads the CA, binds the listener and reads what must be known before the
//! first agent is served; [`RelayTasks`] are its long-running parts, which the controller's
//! `run()` spawns into its supervisor. Bootstrap tokens, registered agents and revocations live
//! in Consul KV (`vmesh-registry`), so `vmeshctl token` and `vmeshctl agent` work against any
//! replica.

mod hub;
mod records;
mod registration;
mod replicas;
mod revocations;
mod service;
mod tokens;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};
use vmesh_layout::{unix_secs, Layout};
use vmesh_proto::v1::registration_server::RegistrationServer;
use vmesh_proto::v1::relay_server::RelayServer;
use vmesh_registry::Registry;
use vmesh_relay::AddressLimiter;
use vmesh_relay::HubState;
use vmesh_runtime::{Readiness, Shutdown};
use vmesh_tls::{CertificateAuthority, SpiffeId};

use crate::metrics::Metrics;
use crate::refusals::Refusals;
use crate::source::SourceEvent;
use crate::tls::{self, ClientCert, ServerCert};

pub use hub::Hub;

/// How long start-up reads (revocations, registered agents) may take before the relay starts
/// without them: it goes on watching revocations, and the warm-up then runs its whole length.
const STARTUP_READ: Duration = Duration::from_secs(5);

/// The largest registration request (a bootstrap token, a CSR and a few names: about 2 KiB) the
/// relay reads; its callers are not yet authenticated.
pub const MAX_REGISTRATION_BYTES: usize = 64 * 1024;

/// How the relay is set up (from the command line).
#[derive(Clone, Debug)]
pub struct RelaySettings {
    pub addr: SocketAddr,
    pub trust_domain: String,
    pub agent_cert_ttl: Duration,
    pub grace: Duration,
    pub warmup: Duration,
    /// The relay port's connection limits.
    pub limits: crate::listener::Limits,
    pub grpc: crate::listener::GrpcLimits,
    /// Registrations allowed per source address.
    pub registrations: vmesh_relay::Rate,
}

/// This replica, for sharing discovery: its `--id`, its KV layout and its session.
pub struct Replica {
    pub id: String,
    pub layout: Layout,
    pub session: watch::Receiver<Option<String>>,
}

/// A long-running part of the relay.
pub type Task = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// The relay's long-running parts, each to be spawned as a critical task under its name.
pub struct RelayTasks {
    /// `relay`: the gRPC server on the listener.
    pub server: Task,
    /// `revocations`: the deny list, watched.
    pub revocations: Task,
    /// `tokens`: the bootstrap tokens, watched.
    pub tokens: Task,
    /// `relay-refusals`: refusals not logged one by one, summed up.
    pub refusals: Task,
    /// `discovery`: the catalog, published to the index.
    pub catalog: Task,
    /// `discovery-share`: this replica's records, written to Consul KV.
    pub share: Task,
    /// `discovery-read`: the other replicas' records, read from Consul KV.
    pub read: Task,
}

/// The relay, started: the hub (for `/agents`) and the tasks to spawn.
pub struct Relay {
    pub hub: Arc<Hub>,
    pub tasks: RelayTasks,
}

impl Relay {
    /// Binds the listener (serving `server_cert`, issued by `ca`), and reads the revocations
    /// (so a revoked agent is never served, even right after a start) and the registered agents
    /// (whom the first catalog waits for).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        settings: RelaySettings,
        ca: Arc<dyn CertificateAuthority>,
        server_cert: Arc<ServerCert>,
        registry: Registry,
        replica: Replica,
        metrics: Arc<Metrics>,
        events: mpsc::Sender<SourceEvent>,
        readiness: &Readiness,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Relay> {
        let config = tls::server_config(server_cert, ca.clone(), ClientCert::Optional)?;

        let state = HubState::new(&replica.id, settings.grace, settings.warmup);
        let hub = Arc::new(Hub::new(state, metrics.clone()));
        match tokio::time::timeout(STARTUP_READ, registry.deny()).await {
            Ok(Ok(deny)) => hub.set_deny(deny),
            Ok(Err(e)) => warn!(error = %e, "cannot read revoked agents yet; will keep trying"),
            Err(_) => warn!("cannot read revoked agents yet (Consul is slow); will keep trying"),
        }
        match tokio::time::timeout(STARTUP_READ, registry.list_agents()).await {
            Ok(Ok(records)) => {
                let now = unix_secs(SystemTime::now());
                let expected: Vec<SpiffeId> = records
                    .into_iter()
                    .filter(|r| r.not_after_unix > now)
                    .map(|r| r.spiffe_id)
                    .collect();
                info!(
                    agents = expected.len(),
                    warmup = ?settings.warmup,
                    "waiting for registered agents to report before serving discovered endpoints"
                );
                hub.await_agents(expected);
            }
            Ok(Err(e)) => {
                warn!(error = %e, "cannot list registered agents; waiting the whole warm-up")
            }
            Err(_) => warn!("cannot list registered agents in time; waiting the whole warm-up"),
        }

        let listener = tokio::net::TcpListener::bind(settings.addr)
            .await
            .with_context(|| format!("cannot listen for the relay on {}", settings.addr))?;
        let acceptor = crate::listener::Acceptor::new(listener, settings.limits, "relay");
        info!(addr = %acceptor.local_addr()?, trust_domain = %settings.trust_domain, "relay listening");
        let refusals = Refusals::new("relay", metrics.relay_refused.clone());
        let incoming = tls::incoming(acceptor, config, refusals.clone());
        let tokens = tokens::Tokens::new();
        let state = Arc::new(service::RelayState {
            hub: hub.clone(),
            registrar: registration::Registrar {
                hub: hub.clone(),
                registry: registry.clone(),
                tokens: tokens.clone(),
                ca: ca.clone(),
                trust_domain: settings.trust_domain.clone(),
                cert_ttl: settings.agent_cert_ttl,
            },
            metrics,
            refusals: refusals.clone(),
            registrations: Mutex::new(AddressLimiter::new(
                settings.registrations,
                settings.limits.max_connections,
            )),
        });
        let max_message = settings.grpc.max_message_bytes;
        let server = settings
            .grpc
            .server()
            .http2_keepalive_interval(Some(Duration::from_secs(15)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(
                RegistrationServer::new(service::RegistrationService(state.clone()))
                    .max_decoding_message_size(MAX_REGISTRATION_BYTES),
            )
            .add_service(
                RelayServer::new(service::RelayService(state))
                    .max_decoding_message_size(max_message),
            )
            .serve_with_incoming_shutdown(incoming, shutdown.clone().wait());

        let client = registry.client().clone();
        let tasks = RelayTasks {
            server: Box::pin(async move { Ok(server.await?) }),
            tokens: Box::pin(tokens::watch(
                registry.clone(),
                tokens,
                readiness.component("tokens"),
                shutdown.clone(),
            )),
            refusals: Box::pin(refusals.summarize(shutdown.clone())),
            revocations: Box::pin(revocations::watch(
                registry,
                hub.clone(),
                readiness.component("revocations"),
                shutdown.clone(),
            )),
            catalog: Box::pin(hub.clone().publish(
                events,
                readiness.component("discovery"),
                shutdown.clone(),
            )),
            share: Box::pin(replicas::write_records(
                hub.clone(),
                client.clone(),
                replica.layout.clone(),
                replica.id,
                replica.session,
                readiness.component("discovery-share"),
                shutdown.clone(),
            )),
            read: Box::pin(replicas::read_records(
                hub.clone(),
                client,
                replica.layout,
                readiness.component("discovery-read"),
                shutdown.clone(),
            )),
        };
        Ok(Relay { hub, tasks })
    }
}

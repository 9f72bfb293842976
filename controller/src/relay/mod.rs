//! The relay: where `vmesh-agent`s register (a bootstrap token and a CSR for a short-lived
//! client certificate), renew, and stream the services of their VM.
//!
//! - `tls`: the listener's certificate (from the mesh CA, renewed at half-life) and handshakes.
//! - `service`: the `Registration` and `Relay` gRPC services.
//! - `hub`: every agent's discovery, the deny list, and the catalog published to the index.
//! - `shared`: discovery shared with the other replicas through Consul KV.
//!
//! Bootstrap tokens, registered agents and revocations live in Consul KV (`vmesh-registry`), so
//! `vmeshctl token` and `vmeshctl agent` work against any replica.

mod hub;
mod service;
mod shared;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn, Instrument as _};
use vmesh_proto::v1::registration_server::RegistrationServer;
use vmesh_proto::v1::relay_server::RelayServer;
use vmesh_registry::Registry;
use vmesh_tls::{BuiltinCa, CertificateAuthority, SpiffeId};

use vmesh_registry::unix_secs;

use crate::metrics::Metrics;
use crate::source::SourceEvent;

pub use hub::Hub;

/// How the relay is set up (from the command line).
#[derive(Clone, Debug)]
pub struct RelaySettings {
    pub addr: SocketAddr,
    pub data_dir: Option<PathBuf>,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub trust_domain: String,
    pub agent_cert_ttl: Duration,
    pub grace: Duration,
    pub warmup: Duration,
}

impl RelaySettings {
    fn load_ca(&self) -> anyhow::Result<BuiltinCa> {
        match (&self.ca_cert, &self.ca_key, &self.data_dir) {
            (Some(cert), Some(key), _) => {
                let cert_pem = std::fs::read_to_string(cert)
                    .with_context(|| format!("--ca-cert {}", cert.display()))?;
                let key_pem = std::fs::read_to_string(key)
                    .with_context(|| format!("--ca-key {}", key.display()))?;
                BuiltinCa::from_pem(&cert_pem, &key_pem, &self.trust_domain)
                    .context("--ca-cert/--ca-key")
            }
            (_, _, Some(dir)) => {
                let dir = dir.join("ca");
                let ca = BuiltinCa::load_or_create(&dir, &self.trust_domain)
                    .with_context(|| format!("built-in CA in {}", dir.display()))?;
                info!(dir = %dir.display(), "using the built-in CA");
                Ok(ca)
            }
            _ => anyhow::bail!(
                "--relay-addr needs a CA: --data-dir (the built-in CA keeps its key there) or --ca-cert and --ca-key"
            ),
        }
    }
}

/// This replica, for sharing discovery: its `--id`, its Consul KV prefix and its session.
pub struct Replica {
    pub id: String,
    pub prefix: String,
    pub session: watch::Receiver<Option<String>>,
}

/// Starts the relay listener and its background tasks. Returns once the listener is bound; the
/// server runs until `shutdown`.
pub async fn start(
    settings: RelaySettings,
    registry: Registry,
    replica: Replica,
    metrics: Arc<Metrics>,
    events: mpsc::Sender<SourceEvent>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(Arc<Hub>, tokio::task::JoinHandle<()>)> {
    let ca: Arc<dyn CertificateAuthority> = Arc::new(settings.load_ca()?);
    let server_cert = Arc::new(
        tls::ServerCert::issue(ca.as_ref(), &[], settings.agent_cert_ttl)
            .context("cannot issue the relay's server certificate")?,
    );
    let config = tls::server_config(server_cert.clone(), &ca.trust_bundle_pem())?;
    tokio::spawn(
        server_cert
            .keep_renewed(ca.clone())
            .instrument(tracing::info_span!("relay_cert")),
    );

    let hub = Arc::new(Hub::new(settings.grace, &replica.id, metrics.clone()));
    // Revocations first, so a revoked agent is never served even right after a start.
    match tokio::time::timeout(
        Duration::from_secs(5),
        registry.watch_revoked(None, Duration::ZERO),
    )
    .await
    {
        Ok(Ok(deny)) => hub.set_deny(deny.value),
        Ok(Err(e)) => warn!(error = %e, "cannot read revoked agents yet; will keep trying"),
        Err(_) => warn!("cannot read revoked agents yet (Consul is slow); will keep trying"),
    }
    tokio::spawn(
        watch_revocations(registry.clone(), hub.clone(), shutdown.clone())
            .instrument(tracing::info_span!("revocations")),
    );
    // The first catalog waits for the agents registered before this start.
    match tokio::time::timeout(Duration::from_secs(5), registry.list_agents()).await {
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
        Ok(Err(e)) => warn!(error = %e, "cannot list registered agents; waiting the whole warm-up"),
        Err(_) => warn!("cannot list registered agents in time; waiting the whole warm-up"),
    }
    tokio::spawn(
        hub::publish(hub.clone(), events, settings.warmup, shutdown.clone())
            .instrument(tracing::info_span!("discovery")),
    );
    tokio::spawn(
        shared::write_records(
            hub.clone(),
            registry.client().clone(),
            replica.prefix.clone(),
            replica.id.clone(),
            replica.session,
            shutdown.clone(),
        )
        .instrument(tracing::info_span!("discovery_share")),
    );
    tokio::spawn(
        shared::read_records(
            hub.clone(),
            registry.client().clone(),
            replica.prefix,
            shutdown.clone(),
        )
        .instrument(tracing::info_span!("discovery_read")),
    );

    let state = Arc::new(service::RelayState {
        hub: hub.clone(),
        registry,
        ca,
        trust_domain: settings.trust_domain.clone(),
        cert_ttl: settings.agent_cert_ttl,
        metrics: metrics.clone(),
    });
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .with_context(|| format!("cannot listen for the relay on {}", settings.addr))?;
    info!(addr = %listener.local_addr()?, trust_domain = %settings.trust_domain, "relay listening");
    let incoming = tls::incoming(listener, config, metrics);
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(15)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(RegistrationServer::new(service::RegistrationService(
            state.clone(),
        )))
        .add_service(RelayServer::new(service::RelayService(state)))
        .serve_with_incoming_shutdown(incoming, crate::stopped(shutdown));
    let task = tokio::spawn(
        async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "relay server failed");
            }
        }
        .instrument(tracing::info_span!("relay")),
    );
    Ok((hub, task))
}

async fn watch_revocations(registry: Registry, hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
    let mut index = None;
    let mut failures = 0u32;
    loop {
        let read = tokio::select! {
            read = registry.watch_revoked(index, Duration::from_secs(300)) => read,
            _ = shutdown.changed() => return,
        };
        match read {
            Ok(deny) => {
                if failures > 0 {
                    info!("reading revoked agents again");
                }
                failures = 0;
                if index != Some(deny.index) {
                    hub.set_deny(deny.value);
                }
                // An index that goes backwards means Consul's state was reset: read afresh.
                index = match index {
                    Some(i) if deny.index < i => None,
                    _ => Some(deny.index),
                };
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    warn!(error = %e, "cannot read revoked agents; the last list stays in force");
                }
                let wait = Duration::from_millis(250 * 2u64.pow(failures.min(7)));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

//! vmesh-controller: watches config sources, translates them into Envoy
//! resources and serves them over ADS, and reports what happened to every
//! config object.
//!
//! [`run`] builds every component and spawns each in its own span, so the
//! wiring of the whole program reads in one place.

mod admin;
pub mod args;
pub mod discovery;
mod index;
mod leader;
mod metrics;
mod relay;
mod source;
mod status;
mod status_kv;

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tracing::{info, Instrument};
use vmesh_xds::server::{AdsServer, Connections};

use crate::args::{Args, SourceChoice};

pub fn run(args: Args) -> anyhow::Result<()> {
    args.logging.init()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vmesh")
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(metrics::Metrics::register(&mut registry));
    let (shutdown_tx, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("stopping");
        let _ = shutdown_tx.send(true);
    });

    // Source → index → (snapshots, translation).
    let (events_tx, events_rx) = mpsc::channel(64);
    let (index, snapshots, published) = index::Index::new(metrics.clone());
    let index = if args.relay_addr.is_some() {
        index.await_catalog()
    } else {
        index
    };
    let health = Arc::new(source::SourceHealth::new(
        metrics.source_up.clone(),
        metrics.source_errors.clone(),
    ));
    let connections = Arc::new(Connections::default());
    let nacks = Arc::new(status::NackLog::default());
    let mut background = Vec::new();
    let mut agents = None;
    match args.source() {
        SourceChoice::Dir(dir) => {
            if args.relay_addr.is_some() {
                anyhow::bail!(
                    "--relay-addr needs the Consul source (--consul): bootstrap tokens and revoked agents are kept in Consul KV"
                );
            }
            info!(dir = %dir.display(), "reading config from a directory");
            let source = source::dir::DirSource::new(dir, args.debounce);
            tokio::spawn(
                async move {
                    if let Err(e) = source.run(events_tx).await {
                        tracing::error!(error = %e, "config directory source stopped");
                    }
                }
                .instrument(tracing::info_span!("source", kind = "dir")),
            );
        }
        SourceChoice::Consul => {
            let config = args.consul_config().context("Consul")?;
            let client = vmesh_consul::Client::new(&config).context("Consul")?;
            let prefix = args.consul_prefix.trim_end_matches('/').to_string();
            let relay_events = events_tx.clone();
            let source = source::consul::ConsulSource {
                client: client.clone(),
                prefix: prefix.clone(),
                watch: vmesh_consul::WatchConfig::default(),
                health: health.clone(),
            };
            info!(consul = %client.address(), prefix = %source.config_prefix(), "reading config from Consul KV");
            tokio::spawn(
                source
                    .run(events_tx)
                    .instrument(tracing::info_span!("source", kind = "consul")),
            );

            // Replicas elect a leader; only it writes status.
            let (leader_tx, leader) = watch::channel(false);
            let (session_tx, session) = watch::channel(None);
            if let Some(addr) = args.relay_addr {
                let settings = relay::RelaySettings {
                    addr,
                    data_dir: args.data_dir.clone(),
                    ca_cert: args.ca_cert.clone(),
                    ca_key: args.ca_key.clone(),
                    trust_domain: args.trust_domain.clone(),
                    agent_cert_ttl: args.agent_cert_ttl,
                    grace: args.discovery_grace,
                    warmup: args.discovery_warmup,
                };
                let registry = vmesh_registry::Registry::new(client.clone(), &prefix);
                let replica = relay::Replica {
                    id: args.id.clone(),
                    prefix: prefix.clone(),
                    session: session.clone(),
                };
                let (hub, task) = relay::start(
                    settings,
                    registry,
                    replica,
                    metrics.clone(),
                    relay_events,
                    shutdown.clone(),
                )
                .await?;
                background.push(task);
                agents = Some(hub);
            }
            let election = leader::Election {
                client: client.clone(),
                key: format!("{prefix}/leader"),
                id: args.id.clone(),
                ttl: args.leader_ttl,
                lock_delay: args.leader_lock_delay,
            };
            background.push(tokio::spawn(
                election
                    .run(leader_tx, session_tx, shutdown.clone())
                    .instrument(tracing::info_span!("election")),
            ));
            let writer = status_kv::StatusWriter {
                client,
                prefix: prefix.clone(),
                id: args.id.clone(),
                session,
                leader,
                published: published.clone(),
                connections: connections.clone(),
                nacks: nacks.clone(),
            };
            background.push(tokio::spawn(
                writer
                    .run(shutdown.clone())
                    .instrument(tracing::info_span!("status")),
            ));
        }
    }
    tokio::spawn(
        index
            .run(events_rx)
            .instrument(tracing::info_span!("index")),
    );

    // xDS server.
    let observer = Arc::new(status::ControllerObserver {
        metrics: metrics.clone(),
        nacks: nacks.clone(),
        published: published.clone(),
    });
    let ads = AdsServer::new(snapshots, connections.clone(), observer);
    let xds_listener = tokio::net::TcpListener::bind(args.xds_addr)
        .await
        .with_context(|| format!("cannot listen for xDS on {}", args.xds_addr))?;
    info!(addr = %xds_listener.local_addr()?, "xDS server listening");
    let xds = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(ads.service())
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY a large push (a route configuration with hundreds of
            // virtual hosts) waits about 40 ms for the proxy's delayed ACK.
            tonic::transport::server::TcpIncoming::from(xds_listener).with_nodelay(Some(true)),
            stopped(shutdown.clone()),
        );

    // Admin endpoint.
    let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("cannot listen for admin on {}", args.admin_addr))?;
    info!(addr = %admin_listener.local_addr()?, "admin endpoint listening");
    let app = admin::router(admin::AdminState {
        published,
        connections,
        nacks,
        health,
        registry: Arc::new(registry),
        agents,
    });
    let admin = axum::serve(admin_listener, app).with_graceful_shutdown(stopped(shutdown.clone()));

    let (xds, admin) = tokio::join!(
        xds.instrument(tracing::info_span!("xds")),
        std::future::IntoFuture::into_future(admin).instrument(tracing::info_span!("admin"))
    );
    // Let the election hand leadership over before the process ends.
    for task in background {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), task).await;
    }
    xds.context("xDS server failed")?;
    admin.context("admin endpoint failed")?;
    info!("stopped");
    Ok(())
}

pub(crate) async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

//! vmesh-controller: watches config sources, translates them into Envoy resources and serves
//! them over ADS, and reports what happened to every config object.
//!
//! [`run`] builds every component and spawns each as a critical task of one
//! [`Supervisor`], inside a span named after it, so the wiring of the whole program reads in one
//! place: a task that ends or panics ends the process with a clear log line and a non-zero exit.

mod admin;
pub mod args;
mod index;
mod leader;
mod listener;
mod metrics;
mod object_log;
mod refusals;
mod relay;
mod secrets;
mod source;
mod status;
mod status_kv;
mod tls;
mod vault_ca;
mod xds_access;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tracing::info;
use vmesh_layout::Layout;
use vmesh_runtime::Supervisor;
use vmesh_tls::CertificateAuthority;
use vmesh_xds::server::{AdsServer, Connections};

use crate::args::{Args, SourceChoice};

/// How long the tasks get to finish after a stop (the leader hands over, servers drain).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Runs the controller until SIGTERM or SIGINT (then `Ok`), or until a component fails (then
/// the error says which).
pub fn run(args: Args) -> anyhow::Result<()> {
    args.logging.init()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vmesh")
        .build()?;
    runtime.block_on(async {
        let supervisor = build(args).await?;
        supervisor
            .run(vmesh_runtime::shutdown_signal(), STOP_GRACE)
            .await?;
        Ok(())
    })
}

/// Builds every component and spawns its tasks.
async fn build(args: Args) -> anyhow::Result<Supervisor> {
    listener::raise_open_file_limit(args.open_files);
    let mut tasks = Supervisor::new();
    let readiness = tasks.readiness();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(metrics::Metrics::register(&mut registry));

    // Sources → index → (snapshots, translation).
    let (events_tx, events_rx) = mpsc::channel(64);
    let (index, snapshots, published) = index::Index::new(
        index::IndexState::new(args.relay_addr.is_some())
            .with_secrets(true, args.secrets_refused()),
        metrics.clone(),
        readiness.component("index"),
    );
    // Vault, when configured: its token is kept renewed by a task of its own.
    let vault = match args.vault.settings().map_err(anyhow::Error::msg)? {
        Some(settings) => {
            let vault = Arc::new(vmesh_vault::Vault::new(settings).context("Vault")?);
            let maintained = vault.clone();
            tasks.spawn("vault-token", async move {
                maintained.maintain().await;
                Ok(())
            });
            Some(vault)
        }
        None => None,
    };
    // Secrets: from Vault when it is configured, from the secrets directory otherwise.
    let backend = match &vault {
        Some(vault) => {
            info!(vault = %vault.address(), mount = %args.vault_kv_mount, "reading secrets from Vault");
            secrets::Backend::Vault(secrets::vault::VaultBackend::new(
                vault.clone(),
                args.vault_kv_mount.clone(),
                args.vault_poll_interval,
            ))
        }
        None => secrets::Backend::Dir(secrets::dir::DirBackend::new(args.secrets_dir.clone())?),
    };
    let secret_watcher = secrets::SecretWatcher {
        backend,
        names: index.secret_names(),
        events: events_tx.clone(),
        component: readiness.component("secrets"),
        metrics: metrics.clone(),
    };
    tasks.spawn("secrets", secret_watcher.run(tasks.shutdown()));
    let health = Arc::new(source::SourceHealth::new(
        metrics.source_up.clone(),
        metrics.source_errors.clone(),
    ));
    let connections = Arc::new(Connections::default());
    let nacks = Arc::new(status::NackLog::default());
    let mut agents = None;
    // The mesh CA and the controller's server certificate (for the relay and the xDS port),
    // when the relay is on.
    let mut mesh: Option<(Arc<dyn CertificateAuthority>, Arc<tls::ServerCert>)> = None;
    match args.source() {
        SourceChoice::Dir(dir) => {
            if args.relay_addr.is_some() {
                anyhow::bail!(
                    "--relay-addr needs the Consul source (--consul): bootstrap tokens and revoked agents are kept in Consul KV"
                );
            }
            info!(dir = %dir.display(), "reading config from a directory");
            let source = source::dir::DirSource::new(dir, args.debounce, health.clone());
            tasks.spawn("source", source.run(events_tx));
        }
        SourceChoice::Consul => {
            let config = args.consul_config().context("Consul")?;
            let client = vmesh_consul::Client::new(&config).context("Consul")?;
            let layout = Layout::new(&args.consul_prefix);
            let source = source::consul::ConsulSource {
                client: client.clone(),
                layout: layout.clone(),
                watch: vmesh_consul::WatchConfig::default(),
                health: health.clone(),
            };
            info!(consul = %client.address(), prefix = %layout.config_prefix(), "reading config from Consul KV");

            // Replicas elect a leader; only it writes status.
            let (leader_tx, leader) = watch::channel(false);
            let (session_tx, session) = watch::channel(None);
            if let Some(addr) = args.relay_addr {
                let ca: Arc<dyn CertificateAuthority> = match (&args.vault_pki_mount, &vault) {
                    (Some(mount), Some(vault)) => {
                        let ca = Arc::new(
                            vault_ca::VaultCa::start(
                                vault.clone(),
                                mount.clone(),
                                args.vault_pki_role.clone(),
                                args.trust_domain.clone(),
                                args.vault_pki_poll_interval,
                                Duration::from_secs(30),
                            )
                            .await?,
                        );
                        tasks.spawn("vault-ca", ca.clone().watch_rotation(tasks.shutdown()));
                        ca
                    }
                    (Some(_), None) => anyhow::bail!(
                        "--vault-pki-mount needs Vault: set --vault-addr (VAULT_ADDR) and a way to log in"
                    ),
                    (None, _) => Arc::new(tls::load_ca(
                        args.ca_cert.as_deref(),
                        args.ca_key.as_deref(),
                        args.data_dir.as_deref(),
                        &args.trust_domain,
                    )?),
                };
                let server_cert = Arc::new(
                    tls::ServerCert::issue(ca.as_ref(), &[], args.agent_cert_ttl)
                        .context("cannot issue the controller's server certificate")?,
                );
                tasks.spawn(
                    "server-certificate",
                    server_cert
                        .clone()
                        .keep_renewed(ca.clone(), tasks.shutdown()),
                );
                mesh = Some((ca.clone(), server_cert.clone()));
                let settings = relay::RelaySettings {
                    addr,
                    trust_domain: args.trust_domain.clone(),
                    agent_cert_ttl: args.agent_cert_ttl,
                    grace: args.discovery_grace,
                    warmup: args.discovery_warmup,
                    limits: args.port_limits(args.relay_max_connections),
                    grpc: args.grpc_limits(),
                    registrations: vmesh_relay::Rate {
                        burst: args.registration_burst,
                        per_second: args.registration_rate,
                    },
                };
                let replica = relay::Replica {
                    id: args.id.clone(),
                    layout: layout.clone(),
                    session: session.clone(),
                };
                let relay = relay::Relay::start(
                    settings,
                    ca,
                    server_cert,
                    vmesh_registry::Registry::new(client.clone(), layout.prefix()),
                    replica,
                    metrics.clone(),
                    events_tx.clone(),
                    &readiness,
                    &tasks.shutdown(),
                )
                .await?;
                let t = relay.tasks;
                tasks.spawn("relay", t.server);
                tasks.spawn("revocations", t.revocations);
                tasks.spawn("tokens", t.tokens);
                tasks.spawn("relay-refusals", t.refusals);
                tasks.spawn("discovery", t.catalog);
                tasks.spawn("discovery-share", t.share);
                tasks.spawn("discovery-read", t.read);
                agents = Some(relay.hub);
            }
            tasks.spawn("source", source.run(events_tx));
            let election = leader::Election {
                client: client.clone(),
                key: layout.leader_key(),
                id: args.id.clone(),
                ttl: args.leader_ttl,
                lock_delay: args.leader_lock_delay,
                component: readiness.component("election"),
            };
            tasks.spawn(
                "election",
                election.run(leader_tx, session_tx, tasks.shutdown()),
            );
            let writer = status_kv::StatusWriter {
                client,
                layout,
                id: args.id.clone(),
                session,
                leader,
                published: published.clone(),
                connections: connections.clone(),
                nacks: nacks.clone(),
                component: readiness.component("status"),
            };
            tasks.spawn("status", writer.run(tasks.shutdown()));
        }
    }
    tasks.spawn("index", index.run(events_rx, tasks.shutdown()));

    // xDS server.
    let observer = Arc::new(status::ControllerObserver {
        metrics: metrics.clone(),
        nacks: nacks.clone(),
        published: published.clone(),
    });
    let security = xds_access::choose(args.xds_addr, mesh.is_some(), args.xds_insecure)?;
    let xds_listener = tokio::net::TcpListener::bind(args.xds_addr)
        .await
        .with_context(|| format!("cannot listen for xDS on {}", args.xds_addr))?;
    let xds_acceptor = listener::Acceptor::new(
        xds_listener,
        args.port_limits(args.xds_max_connections),
        "xds",
    );
    info!(addr = %xds_acceptor.local_addr()?, "xDS server listening");
    // Every connection is accepted with TCP_NODELAY: without it a large push (a route
    // configuration with hundreds of virtual hosts) waits about 40 ms for the proxy's delayed
    // ACK.
    let mut xds_server = args
        .grpc_limits()
        .server()
        .http2_keepalive_interval(Some(Duration::from_secs(30)));
    let shutdown = tasks.shutdown();
    match (security, &mesh) {
        (xds_access::XdsSecurity::MutualTls, Some((ca, server_cert))) => {
            let refusals = refusals::Refusals::new("xds", metrics.xds_refused.clone());
            tasks.spawn("xds-refusals", refusals.clone().summarize(tasks.shutdown()));
            let authorizer = Arc::new(xds_access::GatewayAuthorizer {
                trust_domain: args.trust_domain.clone(),
                refusals: refusals.clone(),
            });
            let ads =
                AdsServer::with_authorizer(snapshots, connections.clone(), observer, authorizer);
            let config =
                tls::server_config(server_cert.clone(), ca.clone(), tls::ClientCert::Required)?;
            let incoming = tls::incoming(xds_acceptor, config, refusals);
            let xds = xds_server
                .add_service(
                    ads.service()
                        .max_decoding_message_size(args.max_message_bytes),
                )
                .serve_with_incoming_shutdown(incoming, shutdown.wait());
            tasks.spawn("xds", async move { Ok(xds.await?) });
        }
        _ => {
            let ads = AdsServer::new(snapshots, connections.clone(), observer);
            let xds = xds_server
                .add_service(
                    ads.service()
                        .max_decoding_message_size(args.max_message_bytes),
                )
                .serve_with_incoming_shutdown(listener::incoming(xds_acceptor), shutdown.wait());
            tasks.spawn("xds", async move { Ok(xds.await?) });
        }
    }

    // Admin endpoint.
    let admin_listener = listener::Acceptor::new(
        tokio::net::TcpListener::bind(args.admin_addr)
            .await
            .with_context(|| format!("cannot listen for admin on {}", args.admin_addr))?,
        args.port_limits(args.admin_max_connections),
        "admin",
    );
    info!(addr = %admin_listener.local_addr()?, "admin endpoint listening");
    let app = admin::router(admin::AdminState {
        published,
        connections,
        nacks,
        health,
        registry: Arc::new(registry),
        agents,
        readiness,
    });
    let admin = listener::serve_http1(
        admin_listener,
        app,
        listener::HttpLimits {
            request_timeout: args.admin_request_timeout,
        },
        tasks.shutdown(),
    );
    tasks.spawn("admin", admin);
    Ok(tasks)
}

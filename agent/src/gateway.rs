//! `vmesh-agent --gateway <proxy>`: the client certificate of an edge gateway's Envoy.
//!
//! The controller's xDS port (when its relay is on) serves a proxy only over mutual TLS, with a
//! certificate from the mesh CA that names it: `spiffe://<trust-domain>/dc/<dc>/gateway/<proxy>`.
//! This mode gets that certificate the way agents get theirs: it registers once with a
//! bootstrap token created for the gateway (`vmeshctl token create --gateway <proxy>`), for a key
//! it makes itself, keeps key, certificate and trust bundle in the data dir, renews over mutual
//! TLS at half-life, and registers again if the certificate expired meanwhile. After each, it
//! writes the two SDS files Envoy reads them through ([`vmesh_tls::envoy`]), so that
//! `vmeshctl bootstrap --xds-cert-dir <data-dir>` works and Envoy picks up each renewal.

use std::future::Future;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tracing::{info, warn};
use vmesh_relay::session::{RETRY_BASE, RETRY_CAP};
use vmesh_retry::Backoff;
use vmesh_tls::envoy::{ca_sds, client_sds, CA_SDS_FILE, CLIENT_SDS_FILE};
use vmesh_tls::SpiffeId;

use crate::client::{NodeInfo, Relay};
use crate::datadir::Credentials;

/// How long the local Consul agent may take to say which datacenter this is.
const CONSUL_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps the gateway's certificate until `shutdown` (or, with `--once`, until it is valid).
pub async fn run(
    relay: Relay,
    proxy: String,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let node = tokio::select! {
        node = this_gateway(&relay) => node?,
        () = &mut shutdown => return Ok(()),
    };
    // The proxy id and datacenter must make an identity (whatever the trust domain).
    SpiffeId::gateway("vmesh", &node.datacenter, &proxy)
        .with_context(|| format!("--gateway {proxy:?} --datacenter {:?}", node.datacenter))?;
    let bind = relay.args.bind_addr;
    let mut creds = tokio::select! {
        creds = current(&relay, &node, &proxy, bind) => creds?,
        () = &mut shutdown => return Ok(()),
    };
    write_sds_files(&relay, &creds)?;
    info!(
        spiffe_id = %creds.identity.spiffe_id,
        not_after = %humantime::format_rfc3339_seconds(creds.not_after()),
        dir = %relay.data.path().display(),
        "the gateway's certificate is in place"
    );
    if relay.args.once {
        return Ok(());
    }
    loop {
        let wait = creds
            .renew_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = &mut shutdown => return Ok(()),
        }
        creds = tokio::select! {
            renewed = renewed(&relay, &node, &proxy, &creds, bind) => renewed?,
            () = &mut shutdown => return Ok(()),
        };
        write_sds_files(&relay, &creds)?;
    }
}

/// The machine's name (for the controller's log) and the datacenter of the gateway's identity.
async fn this_gateway(relay: &Relay) -> anyhow::Result<NodeInfo> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string());
    let datacenter = match &relay.args.datacenter {
        Some(dc) => dc.clone(),
        None => match tokio::time::timeout(CONSUL_TIMEOUT, relay.consul.agent_self()).await {
            Ok(Ok(me)) => me.datacenter,
            Ok(Err(e)) => anyhow::bail!(
                "cannot ask the local Consul agent which datacenter this is ({e}); pass --datacenter"
            ),
            Err(_) => anyhow::bail!(
                "the local Consul agent did not say which datacenter this is in time; pass --datacenter"
            ),
        },
    };
    Ok(NodeInfo {
        node: host,
        datacenter,
        address: String::new(),
    })
}

/// The SDS files Envoy reads the certificate through, each replaced by one rename (the
/// client file holds the key: 0600).
fn write_sds_files(relay: &Relay, creds: &Credentials) -> anyhow::Result<()> {
    relay.data.write_atomic(
        CLIENT_SDS_FILE,
        client_sds(creds.key.expose(), &creds.chain_pem).as_bytes(),
        0o600,
    )?;
    relay
        .data
        .write_atomic(CA_SDS_FILE, ca_sds(&creds.ca_pem).as_bytes(), 0o644)?;
    Ok(())
}

/// Whether `creds` are this gateway's.
fn is_for(creds: &Credentials, node: &NodeInfo, proxy: &str) -> bool {
    SpiffeId::parse(&creds.identity.spiffe_id)
        .is_ok_and(|id| id.gateway_proxy() == Some(proxy) && id.dc() == node.datacenter)
}

/// Credentials valid for at least half their life: the stored ones, renewed if past half-life,
/// or new ones from registering.
async fn current(
    relay: &Relay,
    node: &NodeInfo,
    proxy: &str,
    bind: Option<IpAddr>,
) -> anyhow::Result<Credentials> {
    let stored = match relay.data.load_credentials() {
        Ok(c) => c.filter(|c| is_for(c, node, proxy)),
        Err(e) => {
            warn!("ignoring the stored certificate: {e}");
            None
        }
    };
    let now = SystemTime::now();
    match stored {
        Some(c) if now < c.renew_at() => Ok(c),
        Some(c) if !c.is_expired(now) => renewed(relay, node, proxy, &c, bind).await,
        _ => relay.register(node, Some(proxy), bind).await,
    }
}

/// A renewed certificate: renewal is retried with backoff until the current one expires; then
/// the gateway registers again with its token.
async fn renewed(
    relay: &Relay,
    node: &NodeInfo,
    proxy: &str,
    creds: &Credentials,
    bind: Option<IpAddr>,
) -> anyhow::Result<Credentials> {
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
    loop {
        match relay.renew(None, creds, node, bind).await {
            Ok(renewed) => {
                info!(
                    spiffe_id = %renewed.identity.spiffe_id,
                    not_after = %humantime::format_rfc3339_seconds(renewed.not_after()),
                    "the gateway's certificate was renewed"
                );
                return Ok(renewed);
            }
            Err(e) => {
                let left = creds
                    .not_after()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                if left.is_zero() {
                    warn!("cannot renew the gateway's certificate ({e:#}) and it expired; registering again");
                    return relay.register(node, Some(proxy), bind).await;
                }
                let delay = backoff.next_delay().min(left);
                warn!(
                    "cannot renew the gateway's certificate ({e:#}); retrying in {}",
                    humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

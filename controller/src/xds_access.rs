//! Who may take config from the xDS port.
//!
//! With the mesh CA (the relay is on), the port serves TLS and requires a client certificate
//! from the mesh CA naming an edge gateway, `spiffe://<trust-domain>/dc/<dc>/gateway/<proxy>`
//! ([`GatewayAuthorizer`]): a stream whose node id is not that proxy is refused with a log line
//! and `vmesh_xds_refused_total{reason}`; a connection ends when its certificate expires
//! (`listener::Guarded`), so the gateway reconnects with the renewed one. A proxy therefore gets
//! its own node's config only, and only it can acknowledge or reject that config.
//!
//! Without the mesh CA, or with `--xds-insecure`, the port is plaintext and unauthenticated:
//! only on a loopback address (the embedded demo), or, anywhere else, behind the explicit flag,
//! which warns at start ([`choose`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use tracing::{info, warn};
use vmesh_tls::{certificate_not_after, SpiffeId};
use vmesh_xds::server::Authorize;

use crate::refusals::Refusals;

/// How the xDS port is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdsSecurity {
    /// TLS, with client certificates naming the proxy.
    MutualTls,
    /// Plaintext, unauthenticated.
    Plaintext,
}

/// The rules: mutual TLS whenever the mesh CA exists, unless `--xds-insecure`; plaintext
/// otherwise, which needs a loopback address or `--xds-insecure`.
pub fn choose(addr: SocketAddr, mesh_ca: bool, insecure: bool) -> anyhow::Result<XdsSecurity> {
    let loopback = addr.ip().is_loopback();
    match (mesh_ca, insecure, loopback) {
        (true, false, _) => {
            info!(%addr, "xDS is served over mutual TLS: gateways present a certificate from the mesh CA naming their proxy id");
            Ok(XdsSecurity::MutualTls)
        }
        (_, true, _) => {
            warn!(
                %addr,
                "xDS is plaintext and unauthenticated (--xds-insecure): anyone who reaches this address can read any proxy's config and acknowledge or reject config for it"
            );
            Ok(XdsSecurity::Plaintext)
        }
        (false, false, true) => {
            info!(%addr, "xDS is plaintext on a loopback address (no mesh CA: the relay is off)");
            Ok(XdsSecurity::Plaintext)
        }
        (false, false, false) => anyhow::bail!(
            "--xds-addr {addr} is not a loopback address, and xDS there must be authenticated: turn on the relay \
             (--relay-addr with the Consul source) so that gateways get certificates from the mesh CA, or pass \
             --xds-insecure to serve plaintext xDS anyway"
        ),
    }
}

/// Lets a stream speak for node `<proxy>` only when its peer's certificate (verified at the
/// handshake against the mesh CA) is `spiffe://<trust_domain>/dc/<dc>/gateway/<proxy>`.
pub struct GatewayAuthorizer {
    pub trust_domain: String,
    pub refusals: Arc<Refusals>,
}

impl GatewayAuthorizer {
    fn refuse(
        &self,
        reason: &'static str,
        peer: Option<SocketAddr>,
        node: &str,
        status: Status,
    ) -> Status {
        self.refusals.note(reason, peer, || {
            let peer = peer.map_or_else(|| "unknown".to_string(), |p| p.to_string());
            warn!(%peer, %node, reason, error = status.message(), "xDS stream refused");
        });
        status
    }
}

impl Authorize for GatewayAuthorizer {
    fn authorize(&self, extensions: &tonic::Extensions, node: &str) -> Result<(), Status> {
        let info = extensions.get::<TlsConnectInfo<TcpConnectInfo>>();
        let peer = info.and_then(|i| i.get_ref().remote_addr());
        let leaf = info
            .and_then(|i| i.peer_certs())
            .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
        let Some(leaf) = leaf else {
            return Err(self.refuse(
                "no_client_certificate",
                peer,
                node,
                Status::unauthenticated("xDS needs a client certificate from the mesh CA"),
            ));
        };
        let bad = |message: String| {
            self.refuse(
                "bad_certificate",
                peer,
                node,
                Status::unauthenticated(format!("client certificate: {message}")),
            )
        };
        let id = SpiffeId::from_certificate_der(&leaf).map_err(|e| bad(e.to_string()))?;
        let Some(proxy) = id
            .gateway_proxy()
            .filter(|_| id.trust_domain() == self.trust_domain)
        else {
            return Err(bad(format!(
                "{id} is not a gateway of trust domain {}",
                self.trust_domain
            )));
        };
        if proxy != node {
            return Err(self.refuse(
                "node_mismatch",
                peer,
                node,
                Status::permission_denied(format!(
                    "the client certificate is for proxy {proxy:?} ({id}); it may not speak for node {node:?}"
                )),
            ));
        }
        let not_after = certificate_not_after(&leaf).map_err(|e| bad(e.to_string()))?;
        if SystemTime::now() >= not_after {
            return Err(self.refuse(
                "certificate_expired",
                peer,
                node,
                Status::unauthenticated("the client certificate has expired"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn plaintext_only_on_loopback_or_when_asked() {
        assert_eq!(
            choose(addr("127.0.0.1:18000"), false, false).unwrap(),
            XdsSecurity::Plaintext
        );
        assert_eq!(
            choose(addr("[::1]:18000"), false, false).unwrap(),
            XdsSecurity::Plaintext
        );
        let e = choose(addr("0.0.0.0:18000"), false, false).unwrap_err();
        assert!(e.to_string().contains("--xds-insecure"), "{e}");
        assert_eq!(
            choose(addr("0.0.0.0:18000"), false, true).unwrap(),
            XdsSecurity::Plaintext
        );
        // With the mesh CA, TLS even on loopback, unless asked not to.
        assert_eq!(
            choose(addr("127.0.0.1:18000"), true, false).unwrap(),
            XdsSecurity::MutualTls
        );
        assert_eq!(
            choose(addr("10.0.0.1:18000"), true, false).unwrap(),
            XdsSecurity::MutualTls
        );
        assert_eq!(
            choose(addr("10.0.0.1:18000"), true, true).unwrap(),
            XdsSecurity::Plaintext
        );
    }
}

//! The files a gateway's Envoy reads its xDS client certificate from, as SDS resources on disk:
//! `vmesh-agent --gateway` writes them into its data dir, and `vmeshctl bootstrap
//! --xds-cert-dir` points Envoy's connection to the controller at them.
//!
//! Each file holds its whole secret inline (the client file: the key and the chain, so it is
//! mode 0600) and is replaced by one rename: Envoy watches the path, reloads on the move, and
//! never sees a new key with an old certificate (with the key and the certificate in two files,
//! a reload between the two renames fails with a key mismatch).

use crate::CONTROLLER_SERVER_NAME;

/// The SDS file of the client certificate (key and chain, inline).
pub const CLIENT_SDS_FILE: &str = "envoy-xds-client.yaml";
/// The SDS file of the validation context (the trust bundle, inline, and the controller's name).
pub const CA_SDS_FILE: &str = "envoy-xds-ca.yaml";
/// The secrets' names in those files.
pub const CLIENT_SECRET: &str = "vmesh_xds_client";
pub const CA_SECRET: &str = "vmesh_xds_ca";

/// `pem` as a YAML literal block indented by `indent` spaces.
fn block(pem: &str, indent: usize) -> String {
    let pad = " ".repeat(indent);
    let mut out = String::from("|\n");
    for line in pem.trim_end().lines() {
        out.push_str(&pad);
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The SDS file of the client certificate: `key_pem` and `chain_pem` (leaf first), inline.
pub fn client_sds(key_pem: &str, chain_pem: &str) -> String {
    format!(
        "# Written by vmesh-agent --gateway: the client certificate Envoy presents to the controller.\n\
         resources:\n\
         - \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n  \
           name: {CLIENT_SECRET}\n  \
           tls_certificate:\n    \
             certificate_chain:\n      \
               inline_string: {}    \
             private_key:\n      \
               inline_string: {}",
        block(chain_pem, 8),
        block(key_pem, 8),
    )
}

/// The SDS file of how Envoy verifies the controller: `bundle_pem` (inline) and the name the
/// controller's certificate must carry.
pub fn ca_sds(bundle_pem: &str) -> String {
    format!(
        "# Written by vmesh-agent --gateway: how Envoy verifies the controller.\n\
         resources:\n\
         - \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n  \
           name: {CA_SECRET}\n  \
           validation_context:\n    \
             match_typed_subject_alt_names:\n    \
             - san_type: DNS\n      \
               matcher: {{ exact: {CONTROLLER_SERVER_NAME:?} }}\n    \
             trusted_ca:\n      \
               inline_string: {}",
        block(bundle_pem, 8),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_files_hold_their_secrets_inline() {
        let c = client_sds(
            "-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY-----\n",
            "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n",
        );
        assert!(c.contains("name: vmesh_xds_client"), "{c}");
        assert!(
            c.contains("    certificate_chain:\n      inline_string: |\n        -----BEGIN CERTIFICATE-----\n        BBB\n"),
            "{c}"
        );
        assert!(
            c.contains("    private_key:\n      inline_string: |\n        -----BEGIN PRIVATE KEY-----\n        AAA\n        -----END PRIVATE KEY-----\n"),
            "{c}"
        );
        let a = ca_sds("-----BEGIN CERTIFICATE-----\nCCC\n-----END CERTIFICATE-----\n");
        assert!(a.contains("    trusted_ca:\n      inline_string: |\n        -----BEGIN CERTIFICATE-----\n        CCC\n"), "{a}");
        assert!(a.contains("exact: \"vmesh-controller\""), "{a}");
    }
}

//! Generates the Rust code for `vmesh/relay/v1/relay.proto` into `OUT_DIR`.
//!
//! `protox` parses the .proto in Rust (no system `protoc`, so every machine and CI produce the same
//! descriptors from the same crate versions); `tonic-prost-build` turns the descriptors into prost
//! messages and tonic clients and servers.

const PROTO: &str = "vmesh/relay/v1/relay.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["."])?;
    tonic_prost_build::configure()
        // Maps as BTreeMap: deterministic iteration, so encoding the same message twice gives the
        // same bytes (content hashes of discovery and config stay stable).
        .btree_map(".")
        // The services need tonic; the messages alone (what the relay core uses) do not.
        .client_mod_attribute(".", r#"#[cfg(feature = "grpc")]"#)
        .server_mod_attribute(".", r#"#[cfg(feature = "grpc")]"#)
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

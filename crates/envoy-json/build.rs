//! Compiles the descriptors of the Envoy API messages vmesh sends into `OUT_DIR/envoy.bin`,
//! from the .proto files shipped with the envoy-types crate the code was generated from (so the
//! JSON always matches the messages vmesh encodes). `protox` parses them in Rust.
//!
//! envoy-types' directory is found from the version Cargo.lock pins, in cargo's registry
//! sources (`$CARGO_HOME`, by default `~/.cargo`) or a `vendor/` directory;
//! `VMESH_ENVOY_PROTO_DIR` names it outright.

use std::error::Error;
use std::path::{Path, PathBuf};

use prost::Message;

/// The messages vmesh sends, and those it embeds in an `Any`.
const FILES: [&str; 11] = [
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/endpoint/v3/endpoint.proto",
    "envoy/config/listener/v3/listener.proto",
    "envoy/config/route/v3/route.proto",
    "envoy/extensions/transport_sockets/tls/v3/secret.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/access_loggers/stream/v3/stream.proto",
    "envoy/extensions/access_loggers/file/v3/file.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
];

/// Where the .proto files and their imports live, under envoy-types' `proto/`.
const INCLUDES: [&str; 7] = [
    "data-plane-api",
    "xds",
    "protoc-gen-validate",
    "googleapis",
    "cel-spec/proto",
    "opentelemetry-proto",
    "client_model",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-env-changed=VMESH_ENVOY_PROTO_DIR");
    println!("cargo:rerun-if-changed=build.rs");
    let root = envoy_types_protos()?;
    let includes: Vec<PathBuf> = INCLUDES
        .iter()
        .map(|d| root.join(d))
        .filter(|p| p.is_dir())
        .collect();
    let descriptors = protox::compile(FILES, includes)?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("envoy.bin");
    std::fs::write(out, descriptors.encode_to_vec())?;
    Ok(())
}

fn envoy_types_protos() -> Result<PathBuf, Box<dyn Error>> {
    if let Ok(dir) = std::env::var("VMESH_ENVOY_PROTO_DIR") {
        return Ok(dir.into());
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let lock = manifest
        .ancestors()
        .map(|d| d.join("Cargo.lock"))
        .find(|p| p.is_file())
        .ok_or("no Cargo.lock above this crate")?;
    println!("cargo:rerun-if-changed={}", lock.display());
    let version = locked_version(&std::fs::read_to_string(&lock)?, "envoy-types")
        .ok_or("envoy-types is not in Cargo.lock")?;
    let dir = format!("envoy-types-{version}");
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    let mut candidates = Vec::new();
    if let Ok(indexes) = std::fs::read_dir(cargo_home.join("registry").join("src")) {
        candidates.extend(indexes.flatten().map(|e| e.path().join(&dir).join("proto")));
    }
    if let Some(workspace) = lock.parent() {
        candidates.push(workspace.join("vendor").join("envoy-types").join("proto"));
    }
    candidates
        .into_iter()
        .find(|p| p.join("data-plane-api").is_dir())
        .ok_or_else(|| {
            format!(
                "cannot find {dir}/proto in cargo's registry under {} or in vendor/; set VMESH_ENVOY_PROTO_DIR",
                cargo_home.display()
            )
            .into()
        })
}

/// The version of `package` in a Cargo.lock.
fn locked_version(lock: &str, package: &str) -> Option<String> {
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("name = \"{package}\"") {
            let version = lines.next()?.trim().strip_prefix("version = \"")?;
            return Some(version.trim_end_matches('"').to_string());
        }
    }
    None
}

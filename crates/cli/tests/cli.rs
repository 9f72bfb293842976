//! vmeshctl as scripts use it: exit codes and output.

use std::process::Command;

use vmesh_testkit::{require_envoy, workspace_root};

fn vmeshctl(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmeshctl"))
        .args(args)
        // Without a Consul address, status asks the controller's admin endpoint.
        .env_remove("CONSUL_HTTP_ADDR")
        .current_dir(workspace_root())
        .output()
        .expect("run vmeshctl");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn validate_accepts_the_examples() {
    let (code, out) = vmeshctl(&[
        "validate",
        "-f",
        "examples/demo",
        "-f",
        "examples/reference",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("VirtualService/web: ok"), "{out}");
}

#[test]
fn validate_names_the_field_at_fault_and_exits_1() {
    let dir = std::env::temp_dir().join(format!("vmeshctl-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("bad.yaml");
    std::fs::write(
        &file,
        "kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - match: {regex: \"(\"}\n      upstream: nowhere\n",
    )
    .expect("write");
    let (code, out) = vmeshctl(&["validate", "-f", file.to_str().expect("utf-8 path")]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("VirtualService/web: rejected"), "{out}");
    assert!(
        out.contains("error: spec.routes[0].match.regex: invalid regex"),
        "{out}"
    );
    std::fs::remove_dir_all(&dir).expect("clean up");

    let (code, out) = vmeshctl(&["validate", "-f", "/nonexistent/x.yaml"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("does not exist"), "{out}");
}

/// The bootstrap vmeshctl prints is one Envoy accepts, in both protocols.
#[test]
fn bootstrap_is_valid_for_envoy() {
    let envoy = require_envoy();
    for protocol in ["delta", "sotw"] {
        let (code, yaml) = vmeshctl(&["bootstrap", "--proxy", "edge-1", "--protocol", protocol]);
        assert_eq!(code, 0, "{yaml}");
        let path = std::env::temp_dir().join(format!(
            "vmeshctl-bootstrap-{}-{protocol}.yaml",
            std::process::id()
        ));
        std::fs::write(&path, &yaml).expect("write bootstrap");
        let out = Command::new(&envoy)
            .args(["--mode", "validate", "-c"])
            .arg(&path)
            .output()
            .expect("run envoy --mode validate");
        let _ = std::fs::remove_file(&path);
        assert!(
            out.status.success(),
            "Envoy refused the {protocol} bootstrap:\n{}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn status_without_a_controller_says_where_it_looked() {
    let (code, out) = vmeshctl(&["status", "--admin-addr", "127.0.0.1:1"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("cannot reach the controller at http://127.0.0.1:1/status"),
        "{out}"
    );
}

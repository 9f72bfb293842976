//! End to end: the config directory as editors and deploy tools really treat it,
//! and the admin endpoint as operators read it.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

mod common;

use common::*;
use vmesh_testkit::{eventually, free_port, http_get, EchoServer};
use vmeshctl::bootstrap::Protocol;

const PROXY: &str = "gateway-proxy";

fn vs_to(upstream: &str) -> String {
    format!("kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - upstream: {upstream}\n")
}

struct Setup {
    v1: EchoServer,
    v2: EchoServer,
    port: u16,
}

fn files(s: &Setup) -> Vec<(&'static str, String)> {
    vec![
        ("gateway.yaml", gateway_doc(s.port, PROXY)),
        (
            "upstreams.yaml",
            format!(
                "{}---\n{}",
                upstream_doc("v1", s.v1.port()),
                upstream_doc("v2", s.v2.port())
            ),
        ),
        ("web.yaml", vs_to("v1")),
    ]
}

fn setup() -> Setup {
    Setup {
        v1: EchoServer::start("v1"),
        v2: EchoServer::start("v2"),
        port: free_port(),
    }
}

fn start(s: &Setup, extra: &[&str]) -> Controller {
    let f = files(s);
    let refs: Vec<(&str, &str)> = f.iter().map(|(n, t)| (*n, t.as_str())).collect();
    Controller::start_with(&refs, extra)
}

#[test]
fn a_deleted_and_recreated_directory_keeps_traffic_flowing() {
    let s = setup();
    let c = start(&s, &[]);
    let _envoy = c.envoy(PROXY, Protocol::Delta);
    wait_served_by(s.port, "/", &[], "v1");

    // A deploy tool replaces the directory: remove it, then create it with new content.
    std::fs::remove_dir_all(&c.dir).unwrap();
    eventually(
        DEADLINE,
        "the controller to notice the missing directory",
        || {
            c.log()
                .contains("config directory is missing")
                .then_some(())
                .ok_or("not yet".to_string())
        },
    );
    for _ in 0..10 {
        assert_eq!(
            served_by(&get(s.port, "/", &[]).unwrap()),
            "v1",
            "last config keeps serving"
        );
    }
    assert_eq!(http_get(&c.admin("/readyz"), &[]).unwrap().status, 200);

    std::fs::create_dir_all(&c.dir).unwrap();
    for (name, text) in files(&s) {
        let text = if name == "web.yaml" {
            vs_to("v2")
        } else {
            text
        };
        std::fs::write(c.dir.join(name), text).unwrap();
    }
    wait_served_by(s.port, "/", &[], "v2");
}

#[test]
fn a_partial_write_is_rejected_alone_and_the_finished_write_applies() {
    let s = setup();
    let c = start(&s, &[]);
    let _envoy = c.envoy(PROXY, Protocol::Sotw);
    wait_served_by(s.port, "/", &[], "v1");

    // An editor that writes in place, caught half way.
    let full = vs_to("v2");
    std::fs::write(c.dir.join("web.yaml"), &full[..full.len() - 12]).unwrap();
    eventually(DEADLINE, "the half-written file to be rejected", || {
        let o = c.object("VirtualService", "web").ok_or("no status")?;
        (o["state"] == "Rejected")
            .then_some(())
            .ok_or(format!("{o}"))
    });
    assert_eq!(served_by(&get(s.port, "/", &[]).unwrap()), "v1");
    // The log says it once, with the field at fault, and not again on a rescan that changes
    // nothing for it.
    let said = |c: &Controller| {
        c.log()
            .lines()
            .filter(|l| l.contains("object rejected") && l.contains("VirtualService/web"))
            .count()
    };
    assert_eq!(said(&c), 1, "{}", c.log());
    c.write("v3.yaml", &upstream_doc("v3", s.v1.port()));
    eventually(DEADLINE, "the new upstream to be judged", || {
        c.object("Upstream", "v3")
            .map(|_| ())
            .ok_or("not yet".to_string())
    });
    assert_eq!(said(&c), 1, "{}", c.log());
    c.remove("v3.yaml");
    eventually(DEADLINE, "the new upstream to be removed", || {
        c.object("Upstream", "v3")
            .map_or(Ok(()), |o| Err(o.to_string()))
    });
    assert!(
        c.log().contains("object removed object=Upstream/v3"),
        "{}",
        c.log()
    );
    let gw = c.object("Gateway", "edge").unwrap();
    assert_eq!(
        gw["state"], "Accepted",
        "other objects are unaffected: {gw}"
    );

    std::fs::write(c.dir.join("web.yaml"), &full).unwrap();
    wait_served_by(s.port, "/", &[], "v2");
    assert_eq!(
        c.object("VirtualService", "web").unwrap()["state"],
        "Accepted"
    );

    // An editor that truncates before it writes, caught in between: the file is empty, which
    // removes nothing (the same rule and words as an empty Consul value).
    std::fs::write(c.dir.join("web.yaml"), "").unwrap();
    let web = eventually(DEADLINE, "the emptied file to be rejected", || {
        let o = c.object("VirtualService", "web").ok_or("no status")?;
        (o["state"] == "Rejected")
            .then(|| o.clone())
            .ok_or(format!("{o}"))
    });
    assert!(web.to_string().contains("the document is empty"), "{web}");
    assert_eq!(served_by(&get(s.port, "/", &[]).unwrap()), "v2");
    std::fs::write(c.dir.join("web.yaml"), &full).unwrap();

    // Editor droppings are not config.
    std::fs::write(c.dir.join(".web.yaml.swp"), "\0\0binary").unwrap();
    std::fs::write(c.dir.join("web.yaml~"), "kind: nonsense").unwrap();
    std::fs::write(c.dir.join("4913"), "").unwrap();
    c.write("web.yaml", &vs_to("v1"));
    wait_served_by(s.port, "/", &[], "v1");
    let status = c.status();
    assert_eq!(status["sourceErrors"], serde_json::json!({}), "{status}");
    assert_eq!(status["objects"].as_array().unwrap().len(), 4, "{status}");
}

#[test]
fn a_file_that_is_not_yaml_is_reported_and_keeps_its_objects() {
    let s = setup();
    let c = start(&s, &[]);
    let _envoy = c.envoy(PROXY, Protocol::Delta);
    wait_served_by(s.port, "/", &[], "v1");

    c.write(
        "web.yaml",
        "kind: VirtualService\nname: web\nspec: [unclosed\n",
    );
    let o = eventually(DEADLINE, "the syntax error to be reported", || {
        let o = c.object("VirtualService", "web").ok_or("no status")?;
        (o["state"] == "Rejected")
            .then_some(o.clone())
            .ok_or(format!("{o}"))
    });
    assert_eq!(o["servingLastGood"], true, "{o}");
    assert!(
        o["errors"][0]["message"].as_str().unwrap().contains("line"),
        "says where: {o}"
    );
    assert_eq!(served_by(&get(s.port, "/", &[]).unwrap()), "v1");
}

#[test]
fn the_admin_endpoint_reports_health_metrics_status_and_config() {
    let s = setup();
    let c = start(&s, &["--log-format", "json"]);
    let _envoy = c.envoy(PROXY, Protocol::Delta);
    wait_served_by(s.port, "/", &[], "v1");

    assert_eq!(http_get(&c.admin("/healthz"), &[]).unwrap().status, 200);
    assert_eq!(http_get(&c.admin("/readyz"), &[]).unwrap().status, 200);

    let metrics = eventually(DEADLINE, "ACK metrics", || {
        let m = http_get(&c.admin("/metrics"), &[])?.body;
        m.contains("vmesh_xds_acks_total{type=\"route\"} 1")
            .then_some(m.clone())
            .ok_or(m)
    });
    for line in [
        "vmesh_xds_streams{mode=\"delta\"} 1",
        "vmesh_xds_pushes_total{type=\"cluster\"}",
        "vmesh_config_objects{kind=\"VirtualService\",state=\"Accepted\"} 1",
        "vmesh_translation_duration_seconds_count",
        "vmesh_proxies 1",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }

    let one = http_get(&c.admin("/status/VirtualService/web"), &[])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(one["state"], "Accepted");
    assert_eq!(
        http_get(&c.admin("/status/VirtualService/nope"), &[])
            .unwrap()
            .status,
        404
    );

    let dump = http_get(&c.admin(&format!("/config_dump?proxy={PROXY}")), &[])
        .unwrap()
        .json()
        .unwrap();
    let resources = dump["resources"].as_array().unwrap();
    let types: Vec<&str> = resources
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    for t in ["cluster", "endpoint", "listener", "route"] {
        assert!(types.contains(&t), "{t} in {types:?}");
    }
    assert!(
        resources.iter().all(|r| r["ackedBy"] == 1),
        "the proxy holds every resource: {dump}"
    );
    assert!(
        !resources.iter().any(|r| r["name"] == "v2"),
        "a proxy gets only the clusters its routes use"
    );
    // Each body in Envoy's JSON form, as Envoy's own config dump prints it.
    let body = |t: &str| {
        resources
            .iter()
            .find(|r| r["type"] == t)
            .map(|r| r["body"].clone())
            .unwrap()
    };
    assert_eq!(body("cluster")["connect_timeout"], "5s", "{dump}");
    let hcm = &body("listener")["filter_chains"][0]["filters"][0]["typed_config"];
    assert_eq!(
        hcm["@type"],
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "{dump}"
    );
    assert_eq!(hcm["rds"]["route_config_name"], "gw-edge-routes", "{dump}");
    assert_eq!(body("route")["virtual_hosts"][0]["name"], "web", "{dump}");

    // --log-format json: every line is a JSON object.
    let log = c.log();
    assert!(log.lines().count() > 3);
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string(), "{line}");
    }
}

#[test]
fn an_idle_controller_uses_no_cpu() {
    let s = setup();
    let c = start(&s, &[]);
    let _envoy = c.envoy(PROXY, Protocol::Delta);
    wait_served_by(s.port, "/", &[], "v1");
    let before = c.cpu_ticks();
    std::thread::sleep(std::time::Duration::from_secs(2)); // measuring idleness: nothing to wait for
    let used = c.cpu_ticks() - before;
    // A clock tick is 10 ms; a watch that wakes itself up (its own reads of the files are
    // inotify events too) would burn tens of ticks here.
    assert!(used <= 3, "an idle controller used {used} ticks in 2 s");
}

/// Started with no source flag, the controller reads `/etc/vmesh/config` (not a directory of
/// this repository), and says honestly that it serves nothing while the directory is missing;
/// a directory created later is read at once.
#[test]
fn a_missing_directory_at_start_serves_nothing_until_it_appears() {
    let c = Controller::launch(options());
    eventually(
        DEADLINE,
        "the controller to name its default directory",
        || {
            let log = c.log();
            (log.contains("/etc/vmesh/config") && log.contains("serving no config until it does"))
                .then_some(())
                .ok_or(log)
        },
    );
    assert!(
        !c.log().contains("serving the last config read"),
        "{}",
        c.log()
    );

    let s = setup();
    let later = c.base().join("later");
    let c = Controller::launch(options().args(["--config-dir", &later.display().to_string()]));
    eventually(DEADLINE, "the missing directory to be reported", || {
        let log = c.log();
        log.contains("config directory does not exist; serving no config until it does")
            .then_some(())
            .ok_or(log)
    });
    let _envoy = c.envoy(PROXY, Protocol::Delta);
    std::fs::create_dir_all(&later).unwrap();
    for (name, text) in files(&s) {
        std::fs::write(later.join(name), text).unwrap();
    }
    wait_served_by(s.port, "/", &[], "v1");
}

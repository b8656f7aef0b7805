//! The fleet deploy kit (issue 12): `deploy/compose/docker-compose.yml` and
//! `deploy/k8s/fleet/` parsed (python3-yaml, as deploy_kit.rs does) and
//! cross-checked: at least two edges, one Redis with AOF, every edge on the
//! same `[state] url` naming that Redis, each edge with its own data volume,
//! and (Kubernetes) a PodDisruptionBudget that selects the edges and lets
//! all but one stay up. The configs are checked by the edge's own parser
//! (`tollgate serve` with the Redis replaced by a loopback one of our own).
//! No docker or cluster needed.
//!
//! cargo test -p tollgate --test deploy_fleet
mod common;
mod prom_support;

use common::*;
use prom_support::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs;

fn state_url(toml_text: &str, what: &str) -> String {
    let cfg: toml::Value = toml::from_str(toml_text).unwrap_or_else(|e| panic!("{what}: {e}"));
    cfg["state"]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no [state] url"))
        .to_string()
}

/// The host of a `redis://host:port/db` URL.
fn url_host(url: &str) -> &str {
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
        .unwrap_or_else(|| panic!("{url} is no redis:// URL"));
    let hostport = rest.split('/').next().unwrap_or("");
    let hostport = hostport.rsplit('@').next().unwrap_or(hostport);
    hostport.split(':').next().unwrap_or("")
}

/// `tollgate keys list --config` on `toml_text` with its `[state] url`
/// moved to a closed loopback port: the edge's own validation of the file
/// passes (an unknown field or a bad value would be an error naming it,
/// exit 2) and only the connection fails (exit 1, naming `[state] url`).
fn assert_config_validates(toml_text: &str, what: &str) {
    let url = state_url(toml_text, what);
    let dir = TestDir::new("fleet-kit");
    let p = dir.join("tollgate.toml");
    fs::write(&p, toml_text.replace(&url, "redis://127.0.0.1:1/0")).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["keys", "--config", p.to_str().unwrap(), "list"])
        .output()
        .expect("run tollgate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: the file must validate (only the connection may fail): {err}"
    );
    assert!(err.contains("[state] url"), "{what}: {err}");
}

/// Redis holds the fleet's keys: its arguments turn AOF on.
fn assert_aof(args: &Value, what: &str) {
    let args: Vec<&str> = args
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no argument list"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--appendonly", "yes"]),
        "{what}: AOF on ({args:?})"
    );
}

#[test]
fn compose_runs_two_edges_on_one_redis_with_the_same_state_url() {
    let docs = yaml_docs(&deploy("compose/docker-compose.yml"));
    let services = docs[0]["services"]
        .as_object()
        .expect("docker-compose.yml: services");
    let redis: Vec<(&String, &Value)> = services
        .iter()
        .filter(|(_, s)| s["image"].as_str().is_some_and(|i| i.starts_with("redis")))
        .collect();
    assert_eq!(redis.len(), 1, "one Redis service: {services:?}");
    let (redis_name, redis_svc) = redis[0];
    assert_aof(&redis_svc["command"], "compose redis");
    let edges: Vec<(&String, &Value)> = services
        .iter()
        .filter(|(_, s)| {
            s["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("tollgate"))
        })
        .collect();
    assert!(edges.len() >= 2, "at least two edges: {services:?}");
    let mut urls = BTreeSet::new();
    let mut data_volumes = BTreeSet::new();
    let mut hostnames = BTreeSet::new();
    for (name, e) in &edges {
        let args: Vec<String> = e["command"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: command"))
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .unwrap_or_else(|| panic!("{name}: no {flag} in {args:?}"))
                .clone()
        };
        let (config, data) = (after("--config"), after("--data-dir"));
        let mounts: Vec<&str> = e["volumes"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: volumes"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let source_of = |target: &str| {
            mounts
                .iter()
                .find_map(|m| {
                    let mut p = m.split(':');
                    let (src, dst) = (p.next()?, p.next()?);
                    (dst == target).then_some(src)
                })
                .unwrap_or_else(|| panic!("{name}: nothing mounted at {target}: {mounts:?}"))
        };
        let cfg_file = deploy("compose").join(source_of(&config));
        let text = fs::read_to_string(&cfg_file)
            .unwrap_or_else(|e| panic!("{name}: {}: {e}", cfg_file.display()));
        let url = state_url(&text, name);
        assert_eq!(
            url_host(&url),
            redis_name.as_str(),
            "{name}: [state] url {url}"
        );
        assert_config_validates(&text, name);
        urls.insert(url);
        let vol = source_of(&data);
        assert!(
            docs[0]["volumes"].get(vol).is_some(),
            "{name}: the data dir is on the named volume {vol}"
        );
        data_volumes.insert(vol.to_string());
        hostnames.insert(
            e["hostname"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: hostname (its node name)"))
                .to_string(),
        );
        let deps = &e["depends_on"];
        assert!(
            deps.get(redis_name).is_some(),
            "{name} waits for {redis_name}"
        );
    }
    assert_eq!(
        urls.len(),
        1,
        "every edge names the same [state] url: {urls:?}"
    );
    assert_eq!(data_volumes.len(), edges.len(), "one data volume per edge");
    assert_eq!(hostnames.len(), edges.len(), "one node name per edge");
}

fn fleet_objects() -> Vec<Value> {
    let kust = yaml_docs(&deploy("k8s/fleet/kustomization.yaml"));
    let mut listed = BTreeSet::new();
    let mut objs = vec![];
    for r in kust[0]["resources"].as_array().expect("resources") {
        let name = r.as_str().expect("a path");
        listed.insert(name.to_string());
        objs.extend(yaml_docs(&deploy("k8s/fleet").join(name)));
    }
    for e in fs::read_dir(deploy("k8s/fleet")).expect("deploy/k8s/fleet") {
        let n = e.expect("entry").file_name().to_string_lossy().into_owned();
        if n.ends_with(".yaml") && n != "kustomization.yaml" {
            assert!(
                listed.contains(&n),
                "k8s/fleet/{n} is not in kustomization.yaml"
            );
        }
    }
    objs
}

fn named<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/k8s/fleet"))
}

fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| &labels[k] == v))
}

#[test]
fn kubernetes_fleet_has_replicas_on_one_state_url_and_a_pdb() {
    let objs = fleet_objects();
    let edges: Vec<&Value> = objs
        .iter()
        .filter(|o| {
            o["kind"] == "StatefulSet"
                && o["spec"]["template"]["spec"]["containers"][0]["image"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("tollgate"))
        })
        .collect();
    assert_eq!(edges.len(), 1, "one StatefulSet of edges");
    let sts = edges[0];
    let replicas = sts["spec"]["replicas"].as_u64().expect("replicas");
    assert!(replicas >= 2, "a fleet: {replicas} replicas");
    let pod = &sts["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert!(selects(&sts["spec"]["selector"]["matchLabels"], labels));
    // Each edge its own data volume (its durable CDR file).
    let container = &pod["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let after = |flag: &str| {
        args.iter()
            .position(|a| *a == flag)
            .and_then(|i| args.get(i + 1))
            .copied()
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"))
    };
    let mount_of = |path: &str| -> String {
        container["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .find(|m| path.starts_with(m["mountPath"].as_str().unwrap_or("\u{0}")))
            .and_then(|m| m["name"].as_str())
            .unwrap_or_else(|| panic!("nothing mounted at {path}"))
            .to_string()
    };
    let data = mount_of(after("--data-dir"));
    assert!(
        sts["spec"]["volumeClaimTemplates"]
            .as_array()
            .expect("volumeClaimTemplates")
            .iter()
            .any(|t| t["metadata"]["name"] == data.as_str()),
        "the data dir is a per-pod claim (volumeClaimTemplates)"
    );
    // hostNetwork: one edge per node.
    if pod["spec"]["hostNetwork"] == true {
        let anti = &pod["spec"]["affinity"]["podAntiAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"][0];
        assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
        assert!(selects(&anti["labelSelector"]["matchLabels"], labels));
    }
    // Every pod reads the one ConfigMap: one [state] url, naming the Redis
    // Service of the kit.
    let config = after("--config");
    let cfg_vol = mount_of(config);
    let cm_name = pod["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == cfg_vol.as_str())
        .and_then(|v| v["configMap"]["name"].as_str())
        .expect("the config volume is a ConfigMap");
    let cm = named(&objs, "ConfigMap", cm_name);
    let file = config.rsplit('/').next().unwrap_or(config);
    let text = cm["data"][file]
        .as_str()
        .expect("tollgate.toml in the ConfigMap");
    let url = state_url(text, "ConfigMap");
    let host = url_host(&url);
    let redis_svc = named(&objs, "Service", host);
    let redis_sts = objs
        .iter()
        .find(|o| {
            o["kind"] == "StatefulSet"
                && selects(
                    &redis_svc["spec"]["selector"],
                    &o["spec"]["template"]["metadata"]["labels"],
                )
        })
        .unwrap_or_else(|| panic!("no Redis behind Service {host}"));
    assert_aof(
        &redis_sts["spec"]["template"]["spec"]["containers"][0]["args"],
        "k8s redis",
    );
    assert_config_validates(text, "deploy/k8s/fleet ConfigMap");
    // The PodDisruptionBudget the single-edge kit leaves out.
    let pdb = objs
        .iter()
        .find(|o| o["kind"] == "PodDisruptionBudget")
        .expect("a PodDisruptionBudget in deploy/k8s/fleet");
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert!(
        selects(&pdb["spec"]["selector"]["matchLabels"], labels),
        "the PDB selects the edges"
    );
    let lets_one_go = match (
        pdb["spec"]["maxUnavailable"].as_u64(),
        pdb["spec"]["minAvailable"].as_u64(),
    ) {
        (Some(m), None) => m >= 1 && m < replicas,
        (None, Some(m)) => m >= 1 && m < replicas,
        _ => false,
    };
    assert!(
        lets_one_go,
        "the PDB keeps edges up yet lets a drain proceed: {}",
        pdb["spec"]
    );
}

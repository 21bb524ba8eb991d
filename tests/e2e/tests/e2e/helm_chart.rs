//! The helm chart in `build/helm/cloudcore`, checked without helm (no package registry reachable
//! here has it): its templates use plain Go-template constructs only, so gtmpl (a Go
//! text/template engine) renders them with helm's context (`.Values`, `.Release`, `.Chart`).
//! Every template must render to well-formed Kubernetes objects, every value must be used and
//! change what is rendered, the config it carries must be a valid cloudcore config, its RBAC
//! must equal `build/rbac/cloudcore.yaml`, its CRDs `crds/`, and `kubectl apply` of the result
//! must succeed against the test API server.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use kedge_e2e::apiserver::TestApiServer;
use serde_json::{Value, json};
use serde_yaml::Deserializer;
// `Value::deserialize` for each YAML document (serde, as k8s-openapi re-exports it).
use k8s_openapi::serde::Deserialize;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chart() -> PathBuf {
    repo().join("build/helm/cloudcore")
}

fn to_gtmpl(v: &Value) -> gtmpl_value::Value {
    use gtmpl_value::Value as G;
    match v {
        Value::Null => G::Nil,
        Value::Bool(b) => G::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => G::from(i),
            (None, Some(f)) => G::from(f),
            _ => G::Nil,
        },
        Value::String(s) => G::String(s.clone()),
        Value::Array(a) => G::Array(a.iter().map(to_gtmpl).collect()),
        Value::Object(o) => G::Map(
            o.iter()
                .map(|(k, v)| (k.clone(), to_gtmpl(v)))
                .collect::<HashMap<_, _>>(),
        ),
    }
}

fn values() -> Value {
    let text = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// Deep-merges `over` into `base` (as `helm --set`/`-f` does).
fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// Renders every template with `values`; returns (template file, objects) pairs.
fn render(values: &Value) -> Vec<(String, Vec<Value>)> {
    let chart_meta: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap())
            .unwrap();
    let context = json!({
        "Values": values,
        "Release": {"Name": "cloudcore", "Namespace": values["namespace"], "Service": "Helm"},
        "Chart": {"Name": chart_meta["name"], "Version": chart_meta["version"], "AppVersion": chart_meta["appVersion"]},
    });
    let ctx = gtmpl::Context::from(to_gtmpl(&context));
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&f).unwrap();
        let mut tmpl = gtmpl::Template::default();
        tmpl.parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let rendered = tmpl.render(&ctx).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut objects = Vec::new();
        for doc in Deserializer::from_str(&rendered) {
            let v: Value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name} renders invalid YAML: {e}\n{rendered}"));
            if v.is_null() {
                continue;
            }
            for field in ["/apiVersion", "/kind", "/metadata/name"] {
                assert!(
                    v.pointer(field)
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty()),
                    "{name}: an object without {field}:\n{rendered}"
                );
            }
            objects.push(v);
        }
        out.push((name, objects));
    }
    out
}

fn find<'a>(rendered: &'a [(String, Vec<Value>)], kind: &str, name: &str) -> &'a Value {
    rendered
        .iter()
        .flat_map(|(_, objs)| objs)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Leaf paths of `values.yaml` (`.Values.a.b`).
fn leaf_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(o) if !o.is_empty() => {
            for (k, v) in o {
                leaf_paths(v, &format!("{prefix}.{k}"), out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

#[test]
fn every_template_renders_kubernetes_objects_and_every_value_is_used() {
    let rendered = render(&values());
    let kinds: BTreeSet<String> = rendered
        .iter()
        .flat_map(|(_, o)| o)
        .map(|o| o["kind"].as_str().unwrap().to_owned())
        .collect();
    for k in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.contains(k), "no {k} in {kinds:?}");
    }
    // Defaults: namespace kubeedge, one replica, NodePort, probes on the health endpoints.
    let deploy = find(&rendered, "Deployment", "cloudcore");
    assert_eq!(deploy["metadata"]["namespace"], "kubeedge");
    assert_eq!(deploy["spec"]["replicas"], 1);
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["env"][0]["name"], "POD_IP");
    let service = find(&rendered, "Service", "cloudcore");
    assert_eq!(service["spec"]["type"], "NodePort");
    let ports: Vec<u64> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, [10000, 10002]);

    // The config the chart carries is a config cloudcore accepts.
    let cm = find(&rendered, "ConfigMap", "cloudcore");
    let text = cm["data"]["cloudcore.yaml"].as_str().unwrap();
    let cfg = cloudcore::config::CloudCoreConfig::parse(Path::new("cloudcore.yaml"), text)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(cfg.modules.cloud_hub.namespace, "kubeedge");
    assert!(cfg.modules.cloud_hub.advertise_address.is_empty());
    assert_eq!(cfg.observability.port, 10351);
    assert_eq!(
        (cfg.kube_api_config.qps, cfg.kube_api_config.burst),
        (100.0, 200)
    );

    // Every value is referenced by a template, and changing it changes the output.
    let templates: String = std::fs::read_dir(chart().join("templates"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    let mut paths = Vec::new();
    leaf_paths(&values(), ".Values", &mut paths);
    for p in &paths {
        assert!(templates.contains(p.as_str()), "{p} is used by no template");
    }
    let mut custom = values();
    merge(
        &mut custom,
        &json!({
            "namespace": "edge-system", "createNamespace": false, "replicas": 1,
            "image": {"repository": "registry.example/cloudcore", "tag": "9.9.9", "pullPolicy": "Always"},
            "resources": {"requests": {"cpu": "250m", "memory": "100Mi"}, "limits": {"memory": "300Mi"}},
            "logLevel": "debug",
            "service": {"type": "LoadBalancer", "websocketNodePort": 30000, "httpsNodePort": 30002},
            "cloudHub": {"advertiseAddress": ["203.0.113.7", "cloud.example.com"], "nodeLimit": 500},
            "cloudStream": {"enable": false, "authorization": "AlwaysAllow", "addressType": "ExternalIP"},
        }),
    );
    let rendered = render(&custom);
    assert!(
        !rendered
            .iter()
            .flat_map(|(_, o)| o)
            .any(|o| o["kind"] == "Namespace"),
        "createNamespace: false"
    );
    let deploy = find(&rendered, "Deployment", "cloudcore");
    assert_eq!(deploy["metadata"]["namespace"], "edge-system");
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.example/cloudcore:9.9.9");
    assert_eq!(container["imagePullPolicy"], "Always");
    assert_eq!(container["resources"]["requests"]["cpu"], "250m");
    assert_eq!(container["resources"]["limits"]["memory"], "300Mi");
    let env = container["env"].as_array().unwrap();
    let rust_log = env.iter().find(|e| e["name"] == "RUST_LOG").unwrap();
    assert_eq!(rust_log["value"], "debug");
    let pod_name = env.iter().find(|e| e["name"] == "POD_NAME").unwrap();
    assert_eq!(
        pod_name["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    let service = find(&rendered, "Service", "cloudcore");
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    assert_eq!(service["spec"]["ports"][0]["nodePort"], 30000);
    assert_eq!(service["spec"]["ports"][1]["nodePort"], 30002);
    let binding = find(&rendered, "ClusterRoleBinding", "kedge-cloudcore");
    assert_eq!(binding["subjects"][0]["namespace"], "edge-system");
    assert!(
        !rendered
            .iter()
            .flat_map(|(_, o)| o)
            .any(|o| o["metadata"]["namespace"] == "kube-system"),
        "no client-CA RoleBinding without cloudStream"
    );
    let cm = find(&rendered, "ConfigMap", "cloudcore");
    let text = cm["data"]["cloudcore.yaml"].as_str().unwrap();
    let cfg = cloudcore::config::CloudCoreConfig::parse(Path::new("cloudcore.yaml"), text)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(cfg.modules.cloud_hub.namespace, "edge-system");
    assert_eq!(cfg.modules.cloud_hub.node_limit, 500);
    assert_eq!(
        cfg.modules.cloud_hub.advertise_address,
        ["203.0.113.7", "cloud.example.com"]
    );
    assert!(!cfg.modules.cloud_stream.enable);
    assert_eq!(cfg.modules.cloud_stream.authorization, "AlwaysAllow");
    assert_eq!(cfg.modules.cloud_stream.address_type, "ExternalIP");
}

#[test]
fn the_charts_rbac_and_crds_are_the_repositorys() {
    let rendered = render(&values());
    let rbac_text = std::fs::read_to_string(repo().join("build/rbac/cloudcore.yaml")).unwrap();
    let rbac: Vec<Value> = Deserializer::from_str(&rbac_text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect();
    for want in &rbac {
        let got = find(
            &rendered,
            want["kind"].as_str().unwrap(),
            want["metadata"]["name"].as_str().unwrap(),
        );
        for field in ["rules", "roleRef", "subjects"] {
            assert_eq!(
                got[field], want[field],
                "{} {}: {field}",
                want["kind"], want["metadata"]["name"]
            );
        }
        assert_eq!(got["metadata"]["namespace"], want["metadata"]["namespace"]);
    }
    let names = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let (ours, charts) = (repo().join("crds"), chart().join("crds"));
    assert_eq!(names(&ours), names(&charts));
    for n in names(&ours) {
        assert_eq!(
            std::fs::read_to_string(ours.join(&n)).unwrap(),
            std::fs::read_to_string(charts.join(&n)).unwrap(),
            "build/helm/cloudcore/crds/{n} differs from crds/{n} (copy it again)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_the_rendered_chart() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = String::new();
    // The chart's crds/ first, as helm installs them.
    for e in std::fs::read_dir(chart().join("crds")).unwrap() {
        manifest.push_str("---\n");
        manifest.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap());
    }
    // In helm's install order (by kind), as `helm install` sends them.
    const ORDER: [&str; 9] = [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Service",
        "Deployment",
    ];
    let mut objects: Vec<Value> = render(&values()).into_iter().flat_map(|(_, o)| o).collect();
    objects.sort_by_key(|o| {
        ORDER
            .iter()
            .position(|k| o["kind"] == *k)
            .unwrap_or(ORDER.len())
    });
    for o in objects {
        manifest.push_str("---\n");
        manifest.push_str(&serde_yaml::to_string(&o).unwrap());
    }
    let path = dir.path().join("chart.yaml");
    std::fs::write(&path, manifest).unwrap();
    let kc = server.kubeconfig_path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("kubectl")
            .args(["apply", "--validate=false", "-f", path.to_str().unwrap()])
            .env("KUBECONFIG", &kc)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "namespace/kubeedge created",
        "deployment.apps/cloudcore created",
        "service/cloudcore created",
        "clusterrole.rbac.authorization.k8s.io/kedge-cloudcore created",
        "configmap/cloudcore created",
        "customresourcedefinition.apiextensions.k8s.io/devices.devices.kubeedge.io created",
    ] {
        assert!(stdout.contains(line), "{line} missing in:\n{stdout}");
    }
}

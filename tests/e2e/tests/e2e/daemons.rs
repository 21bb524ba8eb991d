//! The shipped binaries wired as a user runs them: `cloudcore` (against the test API server, by
//! kubeconfig), `cloudcore token`, `edgecore join`, `edgecore`; a pod applied to the cluster is
//! readable from the edge's MetaServer, and the Node and its Lease appear in the cluster.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kedge_e2e::apiserver::TestApiServer;
use kedge_e2e::daemons::{Setup, http_text};
use kube::api::{Api, PostParams};
use serde_json::json;

async fn http_get(port: u16, path: &str) -> Option<serde_json::Value> {
    let (_, body) = http_text(port, path).await?;
    serde_json::from_str(&body).ok()
}

async fn eventually<F, Fut>(what: &str, logs: &Path, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond().await {
        if Instant::now() > deadline {
            let mut dump = String::new();
            for f in ["cloudcore.log", "edgecore.log"] {
                dump.push_str(&format!(
                    "--- {f}\n{}\n",
                    std::fs::read_to_string(logs.join(f)).unwrap_or_default()
                ));
            }
            panic!("timed out waiting for: {what}\n{dump}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudcore_and_edgecore_binaries_deliver_a_pod_to_the_edge_api() {
    let server = TestApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    server.create_namespace("kubeedge").await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let setup = Setup::write(d, server.kubeconfig_path(), "edge-bin").unwrap();
    let meta = setup.metaserver_port;
    let _cloud = setup.cloudcore().unwrap();
    eventually("cloudcore listening", d, || async {
        std::fs::read_to_string(d.join("cloudcore.log"))
            .unwrap_or_default()
            .contains("cloudhub listening")
    })
    .await;
    let token = setup.token().unwrap();
    setup.join(&token).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.join("edge/edge.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let _edge = setup.edgecore().unwrap();

    let nodes: Api<Node> = Api::all(client.clone());
    eventually("edge Node registered", d, || async {
        nodes.get_opt("edge-bin").await.unwrap().is_some()
    })
    .await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "greeting"}, "data": {"hello": "edge"}}),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "hello"}, "spec": {"nodeName": "edge-bin",
            "containers": [{"name": "c", "image": "busybox", "envFrom": [{"configMapRef": {"name": "greeting"}}]}]}}))
        .unwrap(),
    )
    .await
    .unwrap();
    eventually("pod and ConfigMap on the edge's MetaServer", d, || async {
        let pod = http_get(meta, "/api/v1/namespaces/default/pods/hello").await;
        let cm = http_get(meta, "/api/v1/namespaces/default/configmaps/greeting").await;
        pod.is_some_and(|p| p["spec"]["nodeName"] == "edge-bin")
            && cm.is_some_and(|c| c["data"]["hello"] == "edge")
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    eventually("Lease renewed", d, || async {
        leases.get_opt("edge-bin").await.unwrap().is_some()
    })
    .await;

    // cloudcore's probes and metrics.
    let port = setup.observability_port;
    assert_eq!(http_text(port, "/healthz").await.unwrap().0, 200);
    eventually("cloudcore ready", d, || async {
        http_text(port, "/readyz")
            .await
            .is_some_and(|(s, _)| s == 200)
    })
    .await;
    let (status, metrics) = http_text(port, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for line in [
        "kedge_cloudcore_connected_nodes 1",
        "kedge_cloudcore_ready 1",
        "kedge_cloudcore_sessions_total 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing in:\n{metrics}"
        );
    }
    assert!(
        metrics.lines().any(
            |l| l.starts_with("kedge_cloudcore_messages_total{result=\"acked\"} ")
                && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
    // The Kubernetes client's requests, counted through the rate-limited stack: the
    // controllers' watches and the Lease it created.
    for prefix in [
        "kedge_cloudcore_api_requests_total{method=\"WATCH\",code=\"200\"} ",
        "kedge_cloudcore_api_requests_total{method=\"POST\",code=\"201\"} ",
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(prefix) && !l.ends_with(" 0")),
            "{prefix} missing in:\n{metrics}"
        );
    }
}

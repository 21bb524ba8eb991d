//! edged end to end with the shipped binaries: cloudcore against the test API server, edgecore
//! with a private containerd. A pod created in the API runs on the edge and shows `Running` with
//! its pod IP in the API; deleting it stops the container, removes the sandbox, and the pod object
//! goes away only after that.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use edgecore::edged::runtime::{CriRuntime, Runtime};
use k8s_openapi::api::core::v1::{Node, Pod};
use kedge_e2e::apiserver::TestApiServer;
use kedge_e2e::containerd::TestContainerd;
use kedge_e2e::daemons::Setup;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

async fn eventually<F, Fut>(what: &str, setup: &Setup, ctr: &TestContainerd, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\n{}\n--- containerd\n{}",
            setup.log_tails(60),
            ctr.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_created_in_the_api_runs_on_the_edge_and_is_deleted_cleanly() {
    kedge_common::tls::install_crypto_provider();
    let ctr = TestContainerd::start().unwrap();
    let server = TestApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    server.create_namespace("kubeedge").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::write(dir.path(), server.kubeconfig_path(), "edge-run").unwrap();
    setup
        .use_container_runtime(&ctr.socket, &ctr.cgroup_parent)
        .unwrap();
    let _cloud = setup.cloudcore().unwrap();
    let log = dir.path().join("cloudcore.log");
    eventually("cloudcore listening", &setup, &ctr, || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("cloudhub listening")
    })
    .await;
    setup.join(&setup.token().unwrap()).unwrap();
    let _edge = setup.edgecore().unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    eventually("edge Node registered", &setup, &ctr, || async {
        nodes.get_opt("edge-run").await.unwrap().is_some()
    })
    .await;

    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let created = Instant::now();
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "hello"},
            "spec": {"nodeName": "edge-run", "terminationGracePeriodSeconds": 5,
                "containers": [{"name": "main", "image": ctr.busybox_image,
                    "command": ["sh", "-c", "exec sleep 3600"]}]}
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    eventually(
        "pod Running with a pod IP in the API",
        &setup,
        &ctr,
        || async {
            let p = pods.get("hello").await.unwrap();
            p.status.is_some_and(|s| {
                s.phase.as_deref() == Some("Running")
                    && s.pod_ip
                        .as_deref()
                        .is_some_and(|ip| ip.starts_with("10.233."))
                    && s.container_statuses
                        .as_ref()
                        .is_some_and(|c| c[0].ready && c[0].container_id.is_some())
            })
        },
    )
    .await;
    println!(
        "pod Running in the API {:?} after creation",
        created.elapsed()
    );

    let rt = CriRuntime::connect(&ctr.socket).await.unwrap();
    assert_eq!(rt.list_pod_sandboxes(None).await.unwrap().len(), 1);
    pods.delete("hello", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "pod object gone after its containers stopped",
        &setup,
        &ctr,
        || async { pods.get_opt("hello").await.unwrap().is_none() },
    )
    .await;
    assert!(
        rt.list_pod_sandboxes(None).await.unwrap().is_empty(),
        "the sandbox is removed before the object is deleted"
    );
}

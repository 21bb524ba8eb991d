//! Autonomy against taint-based eviction: cloudcore (the shipped binary) sets the NoExecute
//! tolerations of pods on edge nodes to the node's autonomy duration, and an edge node that was
//! away longer than the default 300 s comes back with the same pods and containers.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use edgecore::edged::runtime::{CriRuntime, Runtime};
use k8s_openapi::api::core::v1::{Node, Pod, Toleration};
use kedge_e2e::apiserver::TestApiServer;
use kedge_e2e::daemons::Setup;
use kedge_e2e::edgerig::{Rig, eventually};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
const NOT_READY: &str = "node.kubernetes.io/not-ready";

fn no_execute_seconds(pod: &Pod, key: &str) -> Vec<Option<i64>> {
    pod.spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|t: &Toleration| {
            t.key.as_deref() == Some(key) && t.effect.as_deref() == Some("NoExecute")
        })
        .map(|t| t.toleration_seconds)
        .collect()
}

async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pods bound to edge nodes get unlimited (or the annotated) NoExecute tolerations with one
/// patch each; `autonomy-duration: 0` and non-edge nodes are left alone; an annotation change
/// re-patches; a second pass (cloudcore restarted) writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tolerations_follow_each_edge_node_autonomy() {
    let server = TestApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    server.create_namespace("kubeedge").await.unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    for (name, labels, annotations) in [
        (
            "edge-a",
            json!({"node-role.kubernetes.io/edge": ""}),
            json!({}),
        ),
        (
            "edge-off",
            json!({"node-role.kubernetes.io/edge": ""}),
            json!({"kedge.io/autonomy-duration": "0"}),
        ),
        ("cloud-1", json!({}), json!({})),
    ] {
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name, "labels": labels, "annotations": annotations}})).unwrap(),
            )
            .await
            .unwrap();
    }
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    for (name, node) in [
        ("on-edge", Some("edge-a")),
        ("on-off", Some("edge-off")),
        ("on-cloud", Some("cloud-1")),
        ("later", None),
    ] {
        let mut spec = json!({"containers": [{"name": "c", "image": "busybox"}]});
        if let Some(n) = node {
            spec["nodeName"] = json!(n);
        }
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap(),
        )
        .await
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::write(dir.path(), server.kubeconfig_path(), "edge-a").unwrap();
    let patches_before = server.requests().snapshot()[5];
    let mut cloud = setup.cloudcore().unwrap();
    setup.wait_cloudcore_listening().await.unwrap();

    wait_for(
        "on-edge tolerates the edge node's absence without limit",
        async || {
            let p = pods.get("on-edge").await.unwrap();
            no_execute_seconds(&p, UNREACHABLE) == [None]
                && no_execute_seconds(&p, NOT_READY) == [None]
        },
    )
    .await;
    // The scheduler binds a pod later: it is patched too.
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "later"}, "target": {"kind": "Node", "name": "edge-a"}});
    let req = http::Request::post("/api/v1/namespaces/default/pods/later/binding")
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&binding).unwrap())
        .unwrap();
    client.request_text(req).await.unwrap();
    wait_for("a pod bound later is patched", async || {
        no_execute_seconds(&pods.get("later").await.unwrap(), UNREACHABLE) == [None]
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for untouched in ["on-off", "on-cloud"] {
        let p = pods.get(untouched).await.unwrap();
        assert_eq!(
            no_execute_seconds(&p, UNREACHABLE),
            [Some(300)],
            "{untouched} keeps the admission default"
        );
    }
    assert_eq!(
        server.requests().snapshot()[5] - patches_before,
        2,
        "one patch per pod"
    );

    // The annotation changes: the pods of that node are patched again.
    nodes
        .patch(
            "edge-a",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"kedge.io/autonomy-duration": "24h"}}}),
            ),
        )
        .await
        .unwrap();
    wait_for("24 h after the annotation", async || {
        let p = pods.get("on-edge").await.unwrap();
        no_execute_seconds(&p, UNREACHABLE) == [Some(86400)]
            && no_execute_seconds(&p, NOT_READY) == [Some(86400)]
    })
    .await;
    wait_for("both pods re-patched", async || {
        no_execute_seconds(&pods.get("later").await.unwrap(), UNREACHABLE) == [Some(86400)]
    })
    .await;

    // A second pass writes nothing.
    cloud.kill();
    let before = server.requests().snapshot()[5];
    let _cloud = setup.cloudcore().unwrap();
    setup.wait_cloudcore_listening().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        server.requests().snapshot()[5],
        before,
        "nothing to patch after a restart"
    );
}

/// An edge node away for longer than the default toleration (the cluster's eviction applied as
/// a real cluster would after 400 s) comes back with the same pod objects and containers, none
/// restarted; the node is Ready in the API right after the link returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_absence_evicts_nothing_and_the_node_returns_ready() {
    let rig = Rig::start("edge-away").await;
    let (ctr, setup) = (&rig.ctr, &rig.setup);
    let pods: Api<Pod> = Api::default_namespaced(rig.client.clone());
    for name in ["web", "worker"] {
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name},
                "spec": {"nodeName": "edge-away", "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "main", "image": ctr.busybox_image, "command": ["sh", "-c", "exec sleep 3600"]}]}}))
            .unwrap(),
        )
        .await
        .unwrap();
    }
    eventually(
        "pods Running with autonomy tolerations",
        setup,
        ctr,
        || async {
            let mut ok = true;
            for n in ["web", "worker"] {
                let p = pods.get(n).await.unwrap();
                ok &= p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    && no_execute_seconds(&p, UNREACHABLE) == [None];
            }
            ok
        },
    )
    .await;
    let uids: Vec<_> = futures_util::future::join_all(["web", "worker"].map(|n| pods.get(n)))
        .await
        .into_iter()
        .map(|p| p.unwrap().metadata.uid.unwrap())
        .collect();
    let rt = CriRuntime::connect(&ctr.socket).await.unwrap();
    let containers = || async {
        let mut ids: Vec<String> = rt
            .list_containers(None)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        ids.sort();
        ids
    };
    let before = containers().await;

    // The cloud goes away; the cluster treats the node as unreachable for 400 s.
    let mut cloud = rig.cloud;
    cloud.kill();
    let evicted = rig
        ._server
        .evict_unreachable("edge-away", Duration::from_secs(400))
        .unwrap();
    assert!(evicted.is_empty(), "evicted: {evicted:?}");
    let nodes: Api<Node> = Api::all(rig.client.clone());
    let ready = |n: Node| {
        n.status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    };
    assert!(!ready(nodes.get("edge-away").await.unwrap()));

    // The link returns.
    cloud.start().unwrap();
    let t = Instant::now();
    eventually("the node Ready again", setup, ctr, || async {
        ready(nodes.get("edge-away").await.unwrap())
    })
    .await;
    let node_ready = t.elapsed();
    eventually("pods Running and Ready", setup, ctr, || async {
        let mut ok = true;
        for n in ["web", "worker"] {
            let p = pods.get(n).await.unwrap();
            ok &= p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        }
        ok
    })
    .await;
    println!("node Ready {node_ready:?} after cloudcore restarted (includes its start-up)");
    assert!(
        node_ready < Duration::from_secs(10),
        "node Ready after {node_ready:?}"
    );
    for (n, uid) in ["web", "worker"].iter().zip(uids) {
        let p = pods.get(n).await.unwrap();
        assert_eq!(p.metadata.uid.unwrap(), uid, "{n} is the same pod object");
        assert!(p.metadata.deletion_timestamp.is_none());
        assert_eq!(
            p.status.unwrap().container_statuses.unwrap()[0].restart_count,
            0
        );
    }
    assert_eq!(containers().await, before, "the same containers");
}

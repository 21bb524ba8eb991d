//! Two cloudcore replicas behind one load balancer, against the test API server: 20 edge nodes
//! split between them (a fifth of them without inventories, as KubeEdge edges, so their acks
//! are recorded in the cluster). One replica is killed while 1,000 ConfigMap updates flow; its
//! nodes reconnect to the survivor and end with exactly the cluster's state, nothing acked is
//! sent again, Leases keep being renewed, and exactly one replica runs the cluster-wide
//! controllers — the survivor, once the dead leader's Lease has run out.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cloudcore::cloudhub::certs::{self, CloudPki};
use cloudcore::edgecontroller::EdgeControllerSettings;
use cloudcore::leader::ElectionTiming;
use cloudcore::server::{LeaderElectionOptions, RunningCloudCore};
use edgecore::edgehub::LinkState;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kedge_e2e::apiserver::TestApiServer;
use kedge_e2e::edge::{RecordingStore, TestEdge, fast_settings};
use kedge_e2e::proxy::LoadBalancer;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

const NODES: usize = 20;
const UPDATES: usize = 1_000;
const LEASE: &str = "kedge-cloudcore";

fn node_name(i: usize) -> String {
    format!("edge-{i:02}")
}

async fn replica(client: &kube::Client, pki: &Arc<CloudPki>, identity: &str) -> RunningCloudCore {
    let mut opts = kedge_e2e::cloud::cloudcore_options(
        "127.0.0.1:0".parse().unwrap(),
        EdgeControllerSettings {
            node_update_frequency: Duration::from_millis(300),
            lease_duration_seconds: 40,
            devices: false,
            kubelet_endpoint: None,
        },
        None,
    );
    opts.leader_election = Some(LeaderElectionOptions {
        lease_name: LEASE.into(),
        identity: identity.into(),
        timing: ElectionTiming {
            lease_duration: Duration::from_secs(2),
            renew_deadline: Duration::from_millis(1500),
            retry_period: Duration::from_millis(250),
        },
    });
    cloudcore::server::start(client.clone(), pki.clone(), opts)
        .await
        .unwrap()
}

async fn eventually<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn leads(r: &RunningCloudCore) -> bool {
    *r.leader.borrow()
}

/// The live objects an edge holds.
fn held(store: &RecordingStore) -> BTreeSet<String> {
    store.inner.snapshot().into_keys().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_s_nodes_converge_on_the_survivor_which_takes_over_the_leader_s_work() {
    kedge_common::tls::install_crypto_provider();
    let api = TestApiServer::start().await.unwrap();
    let client = api.client().unwrap();
    api.create_namespace("kubeedge").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki =
        Arc::new(certs::load_or_create_in_dir(dir.path(), &["127.0.0.1".to_owned()]).unwrap());

    let mut replicas = [
        Some(replica(&client, &pki, "replica-a").await),
        Some(replica(&client, &pki, "replica-b").await),
    ];
    let lb = LoadBalancer::start(
        replicas
            .iter()
            .map(|r| r.as_ref().unwrap().websocket_addr)
            .collect(),
    )
    .await
    .unwrap();

    let mut edges = Vec::new();
    for i in 0..NODES {
        let node = node_name(i);
        let creds = kedge_e2e::cloud::cluster_node_credentials(&client, &pki.ca, &node)
            .await
            .unwrap();
        let mut settings = fast_settings(lb.addr(), &node);
        settings.inventory = i % 5 != 4;
        edges.push(TestEdge::start(
            settings,
            creds,
            Arc::new(RecordingStore::default()),
        ));
    }
    for e in edges.iter_mut() {
        assert!(
            e.wait_for(LinkState::Connected, Duration::from_secs(30))
                .await
        );
    }
    let connected =
        |r: &Option<RunningCloudCore>| r.as_ref().map_or(0, |r| r.hub.connected_count());
    eventually("all nodes connected", Duration::from_secs(30), || {
        let n = connected(&replicas[0]) + connected(&replicas[1]);
        async move { n == NODES }
    })
    .await;
    let split = (connected(&replicas[0]), connected(&replicas[1]));
    assert!(split.0 > 0 && split.1 > 0, "the nodes are split: {split:?}");

    // Exactly one leader.
    eventually("a leader", Duration::from_secs(10), || {
        let n = replicas.iter().flatten().filter(|r| leads(r)).count();
        async move { n == 1 }
    })
    .await;
    let leader = usize::from(!leads(replicas[0].as_ref().unwrap()));
    let follower = 1 - leader;

    // A ConfigMap and a pod that mounts it on every node.
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    for i in 0..NODES {
        let node = node_name(i);
        cms.create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": format!("cm-{node}")}, "data": {"v": "init"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": format!("p-{node}")},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}],
                         "volumes": [{"name": "cfg", "configMap": {"name": format!("cm-{node}")}}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    }
    // Toleration patches for the nodes' autonomy run on the leader alone.
    let patches = |r: &Option<RunningCloudCore>| {
        r.as_ref()
            .map_or(0, |r| r.stats.toleration_patches.load(Ordering::Relaxed))
    };
    eventually(
        "every pod patched by the leader",
        Duration::from_secs(30),
        || {
            let n = patches(&replicas[leader]);
            async move { n as usize >= NODES }
        },
    )
    .await;
    for (i, e) in edges.iter().enumerate() {
        let (store, node) = (e.store.clone(), node_name(i));
        eventually(
            &format!("{node} holds its patched pod"),
            Duration::from_secs(30),
            || {
                let (store, pods, node) = (store.clone(), pods.clone(), node.clone());
                async move {
                    let rv = pods
                        .get(&format!("p-{node}"))
                        .await
                        .unwrap()
                        .metadata
                        .resource_version;
                    store
                        .inner
                        .get(&format!("default/pod/p-{node}"))
                        .map(|o| o.resource_version)
                        == rv
                }
            },
        )
        .await;
    }
    assert_eq!(patches(&replicas[follower]), 0, "the follower patched pods");
    // The synccontroller writes recorded acks once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // 1,000 updates; the leader dies a third of the way through.
    let mut last = vec![String::new(); NODES];
    let mut killed_at = None;
    for u in 0..UPDATES {
        let i = u % NODES;
        let value = format!("u{u}");
        cms.patch(
            &format!("cm-{}", node_name(i)),
            &PatchParams::default(),
            &Patch::Merge(&json!({"data": {"v": value}})),
        )
        .await
        .unwrap();
        last[i] = value;
        if u == UPDATES / 3 {
            replicas[leader].take().unwrap().kill().await;
            killed_at = Some(Instant::now());
        }
    }
    let survivor = replicas[follower].take().unwrap();

    eventually(
        "every node on the survivor",
        Duration::from_secs(30),
        || {
            let n = survivor.hub.connected_count();
            async move { n == NODES }
        },
    )
    .await;
    for (i, e) in edges.iter().enumerate() {
        let (store, node, want) = (e.store.clone(), node_name(i), last[i].clone());
        eventually(
            &format!("{node} holds the latest ConfigMap"),
            Duration::from_secs(30),
            || {
                let (store, node, want) = (store.clone(), node.clone(), want.clone());
                async move {
                    store
                        .inner
                        .get(&format!("default/configmap/cm-{node}"))
                        .is_some_and(|o| o.content["data"]["v"] == want.as_str())
                }
            },
        )
        .await;
    }
    let moved = killed_at.unwrap().elapsed();
    for (i, e) in edges.iter().enumerate() {
        let node = node_name(i);
        let expected: BTreeSet<String> = [
            format!("null/node/{node}"),
            format!("default/pod/p-{node}"),
            format!("default/configmap/cm-{node}"),
            // Every pod's service-account token volume projects it (admission, as in a cluster).
            "default/configmap/kube-root-ca.crt".to_owned(),
        ]
        .into();
        assert_eq!(held(&e.store), expected, "{node} holds exactly its objects");
        // The pod did not change after it was acked: it is never sent again.
        let pod_rv = pods
            .get(&format!("p-{node}"))
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        let sends = e
            .store
            .arrivals()
            .iter()
            .filter(|a| {
                a.resource == format!("default/pod/p-{node}") && a.resource_version == pod_rv
            })
            .count();
        assert_eq!(sends, 1, "{node}: its acked pod was sent again");
        assert!(
            !e.store
                .arrivals()
                .iter()
                .any(|a| a.operation == kedge_common::Operation::Delete),
            "{node}: nothing was deleted in the cluster, nothing may be deleted on the node"
        );
    }

    // The survivor leads once the dead leader's Lease has run out, and says so in the Lease.
    eventually("the survivor leads", Duration::from_secs(10), || {
        let l = leads(&survivor);
        async move { l }
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kubeedge");
    let lease = leases.get(LEASE).await.unwrap();
    let holder = lease.spec.unwrap().holder_identity.unwrap();
    assert_eq!(holder, ["replica-a", "replica-b"][follower]);

    // Node Leases keep being renewed, all by the survivor now.
    let node_leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let renewals = |_: ()| {
        let node_leases = node_leases.clone();
        async move {
            let mut out = Vec::new();
            for i in 0..NODES {
                let l = node_leases.get(&node_name(i)).await.unwrap();
                out.push(serde_json::to_value(l.spec.unwrap().renew_time).unwrap());
            }
            out
        }
    };
    let before = renewals(()).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after = renewals(()).await;
    for i in 0..NODES {
        assert_ne!(
            before[i],
            after[i],
            "the Lease of {} was not renewed",
            node_name(i)
        );
    }

    // A cluster-wide controller now runs on the survivor: deleting an edge Node deletes its pods.
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .delete(&node_name(0), &DeleteParams::default())
        .await
        .unwrap();
    let gone = format!("p-{}", node_name(0));
    eventually(
        "the deleted node's pod is deleted",
        Duration::from_secs(10),
        || {
            let (pods, gone) = (pods.clone(), gone.clone());
            async move { pods.get_opt(&gone).await.unwrap().is_none() }
        },
    )
    .await;
    println!(
        "split {split:?}; all nodes on the survivor and converged within {moved:?} of the kill \
        (1,000 updates meanwhile); leader now {}",
        ["replica-a", "replica-b"][follower]
    );
    drop(lb);
    survivor.stop().await;
}

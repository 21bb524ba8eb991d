//! cloudcore replicas behind one load balancer, against the test API server, with 20 edge
//! nodes (a fifth of them without inventories, as KubeEdge edges, so their acks are recorded in
//! the cluster):
//! - one replica is killed while 1,000 ConfigMap updates flow: its nodes reconnect to the
//!   survivor and end with exactly the cluster's state, nothing acked is sent again, Leases keep
//!   being renewed, and exactly one replica runs the cluster-wide controllers — the survivor,
//!   once the dead leader's Lease has run out;
//! - a rolling update (a new replica up, an old one stopped, twice) while updates flow loses
//!   nothing, and the leader's Lease passes on at once because a stopping leader releases it.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
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
const LEASE: &str = "kedge-cloudcore";
const T: Duration = Duration::from_secs(30);

fn node_name(i: usize) -> String {
    format!("edge-{i:02}")
}

fn fast_election(lease_seconds: u64) -> ElectionTiming {
    ElectionTiming {
        lease_duration: Duration::from_secs(lease_seconds),
        renew_deadline: Duration::from_millis(lease_seconds * 1000 * 3 / 4),
        retry_period: Duration::from_millis(250),
    }
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

/// The test API server, the shared PKI, a load balancer and 20 edge nodes behind it.
struct Fleet {
    _api: TestApiServer,
    client: kube::Client,
    pki: Arc<CloudPki>,
    timing: ElectionTiming,
    lb: LoadBalancer,
    edges: Vec<TestEdge<RecordingStore>>,
    cms: Api<ConfigMap>,
    pods: Api<Pod>,
    _dir: tempfile::TempDir,
}

impl Fleet {
    /// Starts the replicas named, the load balancer in front of them, and the edges.
    async fn start(names: &[&str], timing: ElectionTiming) -> (Fleet, Vec<RunningCloudCore>) {
        kedge_common::tls::install_crypto_provider();
        let api = TestApiServer::start().await.unwrap();
        let client = api.client().unwrap();
        api.create_namespace("kubeedge").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pki =
            Arc::new(certs::load_or_create_in_dir(dir.path(), &["127.0.0.1".to_owned()]).unwrap());
        let lb = LoadBalancer::start(Vec::new()).await.unwrap();
        let mut fleet = Fleet {
            cms: Api::default_namespaced(client.clone()),
            pods: Api::default_namespaced(client.clone()),
            _api: api,
            client,
            pki,
            timing,
            lb,
            edges: Vec::new(),
            _dir: dir,
        };
        let mut replicas = Vec::new();
        for name in names {
            replicas.push(fleet.replica(name).await);
        }
        fleet.route_to(&replicas.iter().collect::<Vec<_>>());
        for i in 0..NODES {
            let node = node_name(i);
            let creds =
                kedge_e2e::cloud::cluster_node_credentials(&fleet.client, &fleet.pki.ca, &node)
                    .await
                    .unwrap();
            let mut settings = fast_settings(fleet.lb.addr(), &node);
            settings.inventory = i % 5 != 4;
            fleet.edges.push(TestEdge::start(
                settings,
                creds,
                Arc::new(RecordingStore::default()),
            ));
        }
        for e in fleet.edges.iter_mut() {
            assert!(e.wait_for(LinkState::Connected, T).await);
        }
        (fleet, replicas)
    }

    async fn replica(&self, identity: &str) -> RunningCloudCore {
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
            timing: self.timing,
        });
        cloudcore::server::start(self.client.clone(), self.pki.clone(), opts)
            .await
            .unwrap()
    }

    /// New connections go to these replicas (the Service's endpoints).
    fn route_to(&self, replicas: &[&RunningCloudCore]) {
        self.lb.set_backends(
            replicas
                .iter()
                .map(|r| r.websocket_addr)
                .collect::<Vec<SocketAddr>>(),
        );
    }

    /// A ConfigMap and a pod that mounts it on every node; returns once every node holds its
    /// pod at its current version (the leader patched the tolerations meanwhile).
    async fn create_workload(&self, leader: &RunningCloudCore) {
        for i in 0..NODES {
            let node = node_name(i);
            self.cms
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(
                        json!({"metadata": {"name": format!("cm-{node}")}, "data": {"v": "init"}}),
                    )
                    .unwrap(),
                )
                .await
                .unwrap();
            self.pods
                .create(
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
        let stats = leader.stats.clone();
        eventually("every pod patched by the leader", T, || {
            let n = stats.toleration_patches.load(Ordering::Relaxed);
            async move { n as usize >= NODES }
        })
        .await;
        for (i, e) in self.edges.iter().enumerate() {
            let (store, node) = (e.store.clone(), node_name(i));
            eventually(&format!("{node} holds its patched pod"), T, || {
                let (store, pods, node) = (store.clone(), self.pods.clone(), node.clone());
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
            })
            .await;
        }
        // The synccontroller writes recorded acks once a second.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }

    async fn update(&self, u: usize) -> (usize, String) {
        let i = u % NODES;
        let value = format!("u{u}");
        self.cms
            .patch(
                &format!("cm-{}", node_name(i)),
                &PatchParams::default(),
                &Patch::Merge(&json!({"data": {"v": value}})),
            )
            .await
            .unwrap();
        (i, value)
    }

    /// Every node holds exactly its objects, its ConfigMap at `last`, and was never sent its
    /// (unchanged, acknowledged) pod again nor told to delete anything.
    async fn assert_converged(&self, last: &[String]) {
        for (i, e) in self.edges.iter().enumerate() {
            let (store, node, want) = (e.store.clone(), node_name(i), last[i].clone());
            eventually(&format!("{node} holds the latest ConfigMap"), T, || {
                let (store, node, want) = (store.clone(), node.clone(), want.clone());
                async move {
                    store
                        .inner
                        .get(&format!("default/configmap/cm-{node}"))
                        .is_some_and(|o| o.content["data"]["v"] == want.as_str())
                }
            })
            .await;
        }
        for (i, e) in self.edges.iter().enumerate() {
            let node = node_name(i);
            let expected: BTreeSet<String> = [
                format!("null/node/{node}"),
                format!("default/pod/p-{node}"),
                format!("default/configmap/cm-{node}"),
                // Every pod's service-account token volume projects it (admission, as in a
                // cluster).
                "default/configmap/kube-root-ca.crt".to_owned(),
            ]
            .into();
            let held: BTreeSet<String> = e.store.inner.snapshot().into_keys().collect();
            assert_eq!(held, expected, "{node} holds exactly its objects");
            let pod_rv = self
                .pods
                .get(&format!("p-{node}"))
                .await
                .unwrap()
                .metadata
                .resource_version
                .unwrap();
            let pod_path = format!("default/pod/p-{node}");
            let arrivals = e.store.arrivals();
            let sends = arrivals
                .iter()
                .filter(|a| a.resource == pod_path && a.resource_version == pod_rv)
                .count();
            assert_eq!(sends, 1, "{node}: its acknowledged pod was sent again");
            assert!(
                !arrivals
                    .iter()
                    .any(|a| a.operation == kedge_common::Operation::Delete),
                "{node}: nothing was deleted in the cluster, nothing may be deleted on the node"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_s_nodes_converge_on_the_survivor_which_takes_over_the_leader_s_work() {
    let (fleet, replicas) = Fleet::start(&["replica-a", "replica-b"], fast_election(2)).await;
    let mut replicas: Vec<Option<RunningCloudCore>> = replicas.into_iter().map(Some).collect();
    let connected =
        |r: &Option<RunningCloudCore>| r.as_ref().map_or(0, |r| r.hub.connected_count());
    eventually("all nodes connected", T, || {
        let n = connected(&replicas[0]) + connected(&replicas[1]);
        async move { n == NODES }
    })
    .await;
    let split = (connected(&replicas[0]), connected(&replicas[1]));
    assert!(split.0 > 0 && split.1 > 0, "the nodes are split: {split:?}");

    // Exactly one leader; it alone patches tolerations.
    eventually("a leader", Duration::from_secs(10), || {
        let n = replicas.iter().flatten().filter(|r| leads(r)).count();
        async move { n == 1 }
    })
    .await;
    let leader = usize::from(!leads(replicas[0].as_ref().unwrap()));
    let follower = 1 - leader;
    fleet
        .create_workload(replicas[leader].as_ref().unwrap())
        .await;
    let follower_patches = replicas[follower]
        .as_ref()
        .unwrap()
        .stats
        .toleration_patches
        .load(Ordering::Relaxed);
    assert_eq!(follower_patches, 0, "the follower patched pods");

    // 1,000 updates; the leader dies a third of the way through.
    const UPDATES: usize = 1_000;
    let mut last = vec![String::new(); NODES];
    let mut killed_at = None;
    for u in 0..UPDATES {
        let (i, value) = fleet.update(u).await;
        last[i] = value;
        if u == UPDATES / 3 {
            replicas[leader].take().unwrap().kill().await;
            killed_at = Some(Instant::now());
        }
    }
    let survivor = replicas[follower].take().unwrap();
    eventually("every node on the survivor", T, || {
        let n = survivor.hub.connected_count();
        async move { n == NODES }
    })
    .await;
    fleet.assert_converged(&last).await;
    let moved = killed_at.unwrap().elapsed();

    // The survivor leads once the dead leader's Lease has run out, and says so in the Lease.
    eventually("the survivor leads", Duration::from_secs(10), || {
        let l = leads(&survivor);
        async move { l }
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(fleet.client.clone(), "kubeedge");
    let holder = leases
        .get(LEASE)
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity
        .unwrap();
    assert_eq!(holder, ["replica-a", "replica-b"][follower]);

    // Node Leases keep being renewed, all by the survivor now.
    let node_leases: Api<Lease> = Api::namespaced(fleet.client.clone(), "kube-node-lease");
    let renewals = || {
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
    let before = renewals().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after = renewals().await;
    for i in 0..NODES {
        assert_ne!(
            before[i],
            after[i],
            "the Lease of {} was not renewed",
            node_name(i)
        );
    }

    // A cluster-wide controller now runs on the survivor: deleting an edge Node deletes its pods.
    let nodes: Api<Node> = Api::all(fleet.client.clone());
    nodes
        .delete(&node_name(0), &DeleteParams::default())
        .await
        .unwrap();
    let gone = format!("p-{}", node_name(0));
    eventually(
        "the deleted node's pod is deleted",
        Duration::from_secs(10),
        || {
            let (pods, gone) = (fleet.pods.clone(), gone.clone());
            async move { pods.get_opt(&gone).await.unwrap().is_none() }
        },
    )
    .await;
    println!(
        "split {split:?}; all nodes on the survivor and converged within {moved:?} of the kill \
        (1,000 updates meanwhile); leader now {}",
        ["replica-a", "replica-b"][follower]
    );
    survivor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_moves_every_node_without_losing_an_update() {
    // A long lease: a leader that stops must hand over by releasing it, not by letting it expire.
    let (fleet, replicas) = Fleet::start(&["old-a", "old-b"], fast_election(10)).await;
    let mut running: Vec<(String, RunningCloudCore)> = ["old-a", "old-b"]
        .iter()
        .map(|n| n.to_string())
        .zip(replicas)
        .collect();
    eventually("a leader", Duration::from_secs(10), || {
        let n = running.iter().filter(|(_, r)| leads(r)).count();
        async move { n == 1 }
    })
    .await;
    let leader = running.iter().find(|(_, r)| leads(r)).unwrap();
    fleet.create_workload(&leader.1).await;

    // Updates flow through the whole rollout.
    let fleet = Arc::new(fleet);
    let stop_updates = tokio_util::sync::CancellationToken::new();
    let updater = {
        let (fleet, stop) = (fleet.clone(), stop_updates.clone());
        tokio::spawn(async move {
            let mut last = vec![String::new(); NODES];
            let mut u = 0;
            while !stop.is_cancelled() {
                let (i, value) = fleet.update(u).await;
                last[i] = value;
                u += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            (u, last)
        })
    };
    let mut handovers = Vec::new();
    for new in ["new-c", "new-d"] {
        // As a Deployment's rolling update: the new pod becomes an endpoint, then an old one
        // leaves the endpoints and is sent SIGTERM.
        running.push((new.to_owned(), fleet.replica(new).await));
        let (old_name, old) = running.remove(0);
        fleet.route_to(&running.iter().map(|(_, r)| r).collect::<Vec<_>>());
        let was_leader = leads(&old);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = Instant::now();
        old.stop().await;
        if was_leader {
            eventually(
                "a new leader soon after the old one stopped",
                Duration::from_secs(3),
                || {
                    let n = running.iter().filter(|(_, r)| leads(r)).count();
                    async move { n == 1 }
                },
            )
            .await;
            handovers.push((old_name.clone(), t.elapsed()));
        }
        eventually("every node on the remaining replicas", T, || {
            let n: usize = running.iter().map(|(_, r)| r.hub.connected_count()).sum();
            async move { n == NODES }
        })
        .await;
    }
    stop_updates.cancel();
    let (updates, last) = updater.await.unwrap();
    fleet.assert_converged(&last).await;
    let leaders: Vec<&str> = running
        .iter()
        .filter(|(_, r)| leads(r))
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(leaders.len(), 1, "exactly one leader: {leaders:?}");
    println!(
        "{updates} updates during the rollout; leader handovers {handovers:?} (lease 10 s); \
        leader now {leaders:?}"
    );
    for (_, r) in running {
        r.stop().await;
    }
}

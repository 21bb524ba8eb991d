//! cloudcore against the test API server with real edge nodes over TLS: pods and what they
//! reference reach the right node in the right order, status goes back up, and restarts and
//! forced re-lists converge without orphans.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cloudcore::cloudhub::certs::{self, CloudPki};
use cloudcore::edgecontroller::EdgeControllerSettings;
use cloudcore::server::RunningCloudCore;
use edgecore::edgehub::LinkState;
use edgecore::edgehub::outbox::Outbox;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kedge_common::{Message, Operation};
use kedge_e2e::apiserver::TestApiServer;
use kedge_e2e::edge::{RecordingStore, TestEdge, fast_settings};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

struct Harness {
    api: TestApiServer,
    client: kube::Client,
    pki: Arc<CloudPki>,
    cloud: Option<RunningCloudCore>,
    ws_addr: SocketAddr,
    devices: bool,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(false).await
    }

    /// `devices`: the device CRDs are installed and cloudcore serves devices.
    async fn start_with(devices: bool) -> Harness {
        kedge_common::tls::install_crypto_provider();
        let api = TestApiServer::start().await.unwrap();
        let client = api.client().unwrap();
        api.create_namespace("kubeedge").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pki =
            Arc::new(certs::load_or_create_in_dir(dir.path(), &["127.0.0.1".to_owned()]).unwrap());
        if devices {
            let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
            for crd in kedge_common::crd::all_crds() {
                crds.create(&PostParams::default(), &crd).await.unwrap();
            }
        }
        let mut h = Harness {
            api,
            client,
            pki,
            cloud: None,
            ws_addr: "127.0.0.1:0".parse().unwrap(),
            devices,
            _dir: dir,
        };
        h.start_cloudcore().await;
        h
    }

    async fn start_cloudcore(&mut self) {
        let opts = kedge_e2e::cloud::cloudcore_options(
            self.ws_addr,
            EdgeControllerSettings {
                node_update_frequency: Duration::from_millis(200),
                lease_duration_seconds: 40,
                devices: self.devices,
                kubelet_endpoint: None,
            },
            None,
        );
        let running = cloudcore::server::start(self.client.clone(), self.pki.clone(), opts)
            .await
            .unwrap();
        self.ws_addr = running.websocket_addr;
        self.cloud = Some(running);
    }

    fn cloud(&self) -> &RunningCloudCore {
        self.cloud.as_ref().unwrap()
    }

    async fn edge(&self, node: &str) -> TestEdge<RecordingStore> {
        self.edge_with(node, true, Arc::new(RecordingStore::default()))
            .await
    }

    /// An edge with a given store; `inventory: false` behaves like a KubeEdge edge (no
    /// inventory offered).
    async fn edge_with(
        &self,
        node: &str,
        inventory: bool,
        store: Arc<RecordingStore>,
    ) -> TestEdge<RecordingStore> {
        let creds = kedge_e2e::cloud::cluster_node_credentials(&self.client, &self.pki.ca, node)
            .await
            .unwrap();
        let mut settings = fast_settings(self.ws_addr, node);
        settings.inventory = inventory;
        TestEdge::start(settings, creds, store)
    }

    /// Whether cloudcore keeps a sync ConfigMap for `node`.
    async fn has_sync_state(&self, node: &str) -> bool {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), "kubeedge");
        cms.get_opt(&cloudcore::synccontroller::configmap_name(node))
            .await
            .unwrap()
            .is_some()
    }

    async fn wait_edge_node(&self, node: &str) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        eventually_async(&format!("Node {node} registered"), || async {
            nodes.get_opt(node).await.unwrap().is_some()
        })
        .await;
    }
}

async fn eventually_async<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    kedge_e2e::wait_until(what, T, cond).await
}

fn pod(name: &str, node: &str, extra_spec: serde_json::Value) -> Pod {
    let mut spec = json!({"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra_spec.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec}),
    )
    .unwrap()
}

async fn create_cm(client: &kube::Client, name: &str, value: &str) {
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name}, "data": {"v": value}})).unwrap(),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referenced_configmaps_and_secrets_arrive_before_the_pod_and_only_on_its_node() {
    let h = Harness::start().await;
    let mut e1 = h.edge("edge-1").await;
    let mut e2 = h.edge("edge-2").await;
    assert!(e1.wait_for(LinkState::Connected, T).await);
    assert!(e2.wait_for(LinkState::Connected, T).await);
    h.wait_edge_node("edge-1").await;
    h.wait_edge_node("edge-2").await;

    create_cm(&h.client, "app-config", "1").await;
    let secrets: Api<Secret> = Api::default_namespaced(h.client.clone());
    secrets
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "app-secret"}, "stringData": {"k": "v"}, "data": {"k": "dg=="}})).unwrap())
        .await
        .unwrap();
    let pods: Api<Pod> = Api::default_namespaced(h.client.clone());
    let web = pod(
        "web",
        "edge-1",
        json!({
            "volumes": [{"name": "cfg", "configMap": {"name": "app-config"}}],
            "containers": [{"name": "c", "image": "busybox", "envFrom": [{"secretRef": {"name": "app-secret"}}]}]
        }),
    );
    pods.create(&PostParams::default(), &web).await.unwrap();
    // A pod on edge-2 and one on a cloud node.
    pods.create(&PostParams::default(), &pod("other", "edge-2", json!({})))
        .await
        .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("cloud-pod", "cloud-node", json!({})),
    )
    .await
    .unwrap();

    let store = e1.store.clone();
    eventually_async("pod reaches edge-1", || async {
        store.inner.get("default/pod/web").is_some()
    })
    .await;
    let cm_at = e1
        .store
        .first_arrival("default/configmap/app-config")
        .expect("configmap arrived");
    let secret_at = e1
        .store
        .first_arrival("default/secret/app-secret")
        .expect("secret arrived");
    let pod_at = e1.store.first_arrival("default/pod/web").unwrap();
    assert!(
        cm_at < pod_at && secret_at < pod_at,
        "references must arrive before the pod"
    );

    let store2 = e2.store.clone();
    eventually_async("edge-2 gets its own pod", || async {
        store2.inner.get("default/pod/other").is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (edge, foreign) in [
        (&e1, "default/pod/other"),
        (&e2, "default/pod/web"),
        (&e2, "default/configmap/app-config"),
    ] {
        assert!(
            edge.store.first_arrival(foreign).is_none(),
            "{foreign} reached the wrong node"
        );
    }
    for edge in [&e1, &e2] {
        assert!(edge.store.first_arrival("default/pod/cloud-pod").is_none());
    }
    // Each node also holds its own Node object.
    assert!(e1.store.inner.get("null/node/edge-1").is_some());
    assert!(e1.store.first_arrival("null/node/edge-2").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_updates_reach_only_nodes_whose_pods_use_them_and_unused_ones_are_removed() {
    let h = Harness::start().await;
    let mut e1 = h.edge("edge-1").await;
    let mut e2 = h.edge("edge-2").await;
    assert!(e1.wait_for(LinkState::Connected, T).await);
    assert!(e2.wait_for(LinkState::Connected, T).await);
    h.wait_edge_node("edge-1").await;
    h.wait_edge_node("edge-2").await;
    create_cm(&h.client, "shared", "1").await;
    let pods: Api<Pod> = Api::default_namespaced(h.client.clone());
    pods.create(
        &PostParams::default(),
        &pod(
            "uses",
            "edge-1",
            json!({"volumes": [{"name": "v", "configMap": {"name": "shared"}}]}),
        ),
    )
    .await
    .unwrap();
    pods.create(&PostParams::default(), &pod("plain", "edge-2", json!({})))
        .await
        .unwrap();
    let s1 = e1.store.clone();
    eventually_async("cm v1 on edge-1", || async {
        s1.inner
            .get("default/configmap/shared")
            .is_some_and(|o| o.content["data"]["v"] == "1")
    })
    .await;

    let cms: Api<ConfigMap> = Api::default_namespaced(h.client.clone());
    cms.patch(
        "shared",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await
    .unwrap();
    eventually_async("cm v2 on edge-1", || async {
        s1.inner
            .get("default/configmap/shared")
            .is_some_and(|o| o.content["data"]["v"] == "2")
    })
    .await;
    let s2 = e2.store.clone();
    eventually_async("edge-2 has its pod", || async {
        s2.inner.get("default/pod/plain").is_some()
    })
    .await;
    assert!(
        e2.store.first_arrival("default/configmap/shared").is_none(),
        "edge-2 got a ConfigMap it does not use"
    );

    // No pod on edge-1 uses it any more: it is deleted there.
    pods.delete("uses", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    eventually_async("cm removed from edge-1", || async {
        s1.inner.get("default/configmap/shared").is_none()
            && s1.inner.get("default/pod/uses").is_none()
    })
    .await;
    // Used again: sent again, although its version did not change.
    pods.create(
        &PostParams::default(),
        &pod(
            "uses-again",
            "edge-1",
            json!({"volumes": [{"name": "v", "configMap": {"name": "shared"}}]}),
        ),
    )
    .await
    .unwrap();
    eventually_async("cm back on edge-1", || async {
        s1.inner.get("default/configmap/shared").is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_nodes_get_a_labelled_node_and_a_lease_renewed_only_while_connected() {
    let h = Harness::start().await;
    let mut e = h.edge("edge-l").await;
    assert!(e.wait_for(LinkState::Connected, T).await);
    h.wait_edge_node("edge-l").await;
    let nodes: Api<Node> = Api::all(h.client.clone());
    let n = nodes.get("edge-l").await.unwrap();
    let labels = n.metadata.labels.unwrap();
    assert_eq!(
        labels
            .get("node-role.kubernetes.io/edge")
            .map(String::as_str),
        Some("")
    );
    assert_eq!(
        labels.get("kubernetes.io/hostname").map(String::as_str),
        Some("edge-l")
    );

    let leases: Api<Lease> = Api::namespaced(h.client.clone(), "kube-node-lease");
    let renew_time = || async {
        leases
            .get_opt("edge-l")
            .await
            .unwrap()
            .and_then(|l| l.spec)
            .and_then(|s| s.renew_time)
            .map(|t| t.0.to_string())
    };
    eventually_async("lease created", || async { renew_time().await.is_some() }).await;
    let first = renew_time().await;
    eventually_async("lease renewed", || async { renew_time().await != first }).await;
    let lease = leases.get("edge-l").await.unwrap();
    assert_eq!(
        lease.spec.as_ref().unwrap().holder_identity.as_deref(),
        Some("edge-l")
    );
    assert_eq!(lease.metadata.owner_references.unwrap()[0].name, "edge-l");

    // Node status from the edge patches the Node.
    let report = Message::new(
        "edged",
        "resource",
        Operation::Update,
        "null/nodestatus/edge-l",
        json!({"UID": "x", "Status": {"nodeInfo": {"architecture": "arm64", "operatingSystem": "linux", "kubeletVersion": "v1.33.0-kedge",
            "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "", "kubeProxyVersion": ""},
            "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "EdgeReady"}]}}),
    );
    e.outbox.put("nodestatus", report).await.unwrap();
    eventually_async("node status patched", || async {
        let n = nodes.get("edge-l").await.unwrap();
        n.status
            .and_then(|s| s.capacity)
            .is_some_and(|c| c.get("cpu").is_some_and(|q| q.0 == "4"))
            && n.metadata
                .labels
                .is_some_and(|l| l.get("kubernetes.io/arch").map(String::as_str) == Some("arm64"))
    })
    .await;
    // Our edge's report carries its configured labels: those a node may set on itself are
    // applied, the NodeRestriction ones are not.
    let report = Message::new(
        "edged",
        "resource",
        Operation::Update,
        "null/nodestatus/edge-l",
        json!({"metadata": {"labels": {"example.com/rack": "r7",
                "node-restriction.kubernetes.io/pool": "trusted",
                "node-role.kubernetes.io/control-plane": ""}},
            "status": {"nodeInfo": {"architecture": "arm64", "operatingSystem": "linux", "kubeletVersion": "v1.33.0-kedge",
            "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "", "kubeProxyVersion": ""}}}),
    );
    e.outbox.put("nodestatus", report).await.unwrap();
    eventually_async("configured label applied", || async {
        let labels = nodes.get("edge-l").await.unwrap().metadata.labels.unwrap();
        labels.get("example.com/rack").map(String::as_str) == Some("r7")
    })
    .await;
    let labels = nodes.get("edge-l").await.unwrap().metadata.labels.unwrap();
    assert!(
        !labels.contains_key("node-restriction.kubernetes.io/pool")
            && !labels.contains_key("node-role.kubernetes.io/control-plane"),
        "{labels:?}"
    );

    // Link cut: renewals stop.
    e.stop();
    assert!(e.wait_for(LinkState::Disconnected, T).await);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after_cut = renew_time().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        renew_time().await,
        after_cut,
        "lease renewed although the node is gone"
    );
}

fn status_report(name: &str, uid: &str, status: serde_json::Value) -> Message {
    Message::new(
        "edged",
        "resource",
        Operation::Update,
        format!("default/podstatus/{name}"),
        json!({"uid": uid, "name": name, "status": status}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_status_goes_up_foreign_reports_are_refused_and_graceful_deletion_completes() {
    let h = Harness::start().await;
    let mut e1 = h.edge("edge-1").await;
    let mut e2 = h.edge("edge-2").await;
    assert!(e1.wait_for(LinkState::Connected, T).await);
    assert!(e2.wait_for(LinkState::Connected, T).await);
    h.wait_edge_node("edge-1").await;
    h.wait_edge_node("edge-2").await;
    let pods: Api<Pod> = Api::default_namespaced(h.client.clone());
    let created = pods
        .create(&PostParams::default(), &pod("web", "edge-1", json!({})))
        .await
        .unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    let s1 = e1.store.clone();
    eventually_async("pod on edge-1", || async {
        s1.inner.get("default/pod/web").is_some()
    })
    .await;

    let running = json!({"phase": "Running", "podIP": "10.0.0.7", "spec": "ignored",
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [{"name": "c", "ready": true, "restartCount": 0, "image": "busybox", "imageID": "", "state": {"running": {}}}]});
    e1.outbox
        .put("pod/web", status_report("web", &uid, running))
        .await
        .unwrap();
    eventually_async("status in the API", || async {
        pods.get("web").await.unwrap().status.is_some_and(|s| {
            s.phase.as_deref() == Some("Running") && s.pod_ip.as_deref() == Some("10.0.0.7")
        })
    })
    .await;

    // edge-2 forges a report for edge-1's pod.
    let refused_before = h.cloud().stats.pod_status_refused.load(Ordering::Relaxed);
    e2.outbox
        .put(
            "pod/web",
            status_report("web", &uid, json!({"phase": "Failed"})),
        )
        .await
        .unwrap();
    let stats = h.cloud().stats.clone();
    eventually_async("forged report refused", || async {
        stats.pod_status_refused.load(Ordering::Relaxed) > refused_before
    })
    .await;
    assert_eq!(
        pods.get("web")
            .await
            .unwrap()
            .status
            .unwrap()
            .phase
            .as_deref(),
        Some("Running")
    );

    // Graceful deletion: the edge sees the deletionTimestamp, reports its containers stopped,
    // and cloudcore deletes the pod with grace period 0, which reaches the edge as a delete.
    pods.delete("web", &DeleteParams::default()).await.unwrap();
    eventually_async("edge sees the pod terminating", || async {
        s1.inner
            .get("default/pod/web")
            .is_some_and(|o| o.content["metadata"]["deletionTimestamp"].is_string())
    })
    .await;
    let stopped = json!({"phase": "Running", "containerStatuses": [{"name": "c", "ready": false, "restartCount": 0, "image": "busybox", "imageID": "",
        "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]});
    e1.outbox
        .put("pod/web", status_report("web", &uid, stopped))
        .await
        .unwrap();
    eventually_async("pod gone from the API", || async {
        pods.get_opt("web").await.unwrap().is_none()
    })
    .await;
    eventually_async("pod gone from the edge", || async {
        s1.inner.get("default/pod/web").is_none()
    })
    .await;
}

/// What the edge holds (pods: name → resourceVersion) versus the API's pods on that node.
async fn converged(h: &Harness, store: &RecordingStore, node: &str) -> bool {
    let pods: Api<Pod> = Api::all(h.client.clone());
    let want: BTreeMap<String, String> = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| {
            (
                format!(
                    "{}/pod/{}",
                    p.metadata.namespace.unwrap(),
                    p.metadata.name.unwrap()
                ),
                p.metadata.resource_version.unwrap(),
            )
        })
        .collect();
    let have: BTreeMap<String, String> = store
        .inner
        .snapshot()
        .into_iter()
        .filter(|(k, _)| k.contains("/pod/"))
        .map(|(k, o)| (k, o.resource_version))
        .collect();
    want == have
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_while_objects_change_converges_without_orphans_and_skips_unchanged_objects() {
    restart_converges(true).await;
}

/// A KubeEdge edge sends no inventory: the sync ConfigMap still makes it converge as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_converges_for_an_edge_without_inventory_from_the_sync_state() {
    restart_converges(false).await;
}

async fn restart_converges(inventory: bool) {
    let mut h = Harness::start().await;
    let mut e = h
        .edge_with("edge-r", inventory, Arc::new(RecordingStore::default()))
        .await;
    assert!(e.wait_for(LinkState::Connected, T).await);
    h.wait_edge_node("edge-r").await;
    let pods: Api<Pod> = Api::default_namespaced(h.client.clone());
    for i in 0..150 {
        pods.create(
            &PostParams::default(),
            &pod(&format!("p{i:03}"), "edge-r", json!({})),
        )
        .await
        .unwrap();
    }
    let store = e.store.clone();
    eventually_async("150 pods on the edge", || async {
        converged(&h, &store, "edge-r").await
    })
    .await;
    let cloud = h.cloud();
    let hub = cloud.hub.clone();
    eventually_async("all acked", || async { hub.outstanding("edge-r") == 0 }).await;
    // Let the sync state reach the API (written once a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;

    h.cloud.take().unwrap().kill().await;
    assert!(e.wait_for(LinkState::Disconnected, T).await);
    let before = e.store.arrivals().len();
    // While cloudcore is down: 100 pods change, 20 are deleted, 30 stay as they are.
    for i in 0..100 {
        pods.patch(
            &format!("p{i:03}"),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"changed": "yes"}}})),
        )
        .await
        .unwrap();
    }
    for i in 100..120 {
        pods.delete(
            &format!("p{i:03}"),
            &DeleteParams::default().grace_period(0),
        )
        .await
        .unwrap();
    }
    h.start_cloudcore().await;
    assert!(e.wait_for(LinkState::Connected, T).await);
    let store = e.store.clone();
    eventually_async("edge converged after restart", || async {
        converged(&h, &store, "edge-r").await
    })
    .await;
    let hub = h.cloud().hub.clone();
    eventually_async("all acked after restart", || async {
        hub.outstanding("edge-r") == 0
    })
    .await;

    let after: Vec<_> = e.store.arrivals()[before..].to_vec();
    let pod_msgs: Vec<_> = after
        .iter()
        .filter(|a| a.resource.contains("/pod/"))
        .collect();
    let updates = pod_msgs
        .iter()
        .filter(|a| a.operation != Operation::Delete)
        .count();
    let deletes = pod_msgs
        .iter()
        .filter(|a| a.operation == Operation::Delete)
        .count();
    assert_eq!(updates, 100, "only changed pods are re-sent");
    assert_eq!(
        deletes, 20,
        "pods deleted while cloudcore was down are deleted on the edge"
    );
    for i in 120..150 {
        let r = format!("default/pod/p{i:03}");
        assert!(
            !pod_msgs.iter().any(|a| a.resource == r),
            "unchanged {r} was re-sent"
        );
    }
    if !inventory {
        // Without an inventory, skipping unchanged objects relies on the recorded acks (read
        // when the node connects, compared with what it must hold).
        let unchanged = h.cloud().stats.unchanged.load(Ordering::Relaxed);
        assert!(unchanged >= 30, "unchanged objects counted: {unchanged}");
    }
    assert_eq!(
        h.has_sync_state("edge-r").await,
        !inventory,
        "sync state is kept only for edges without inventory"
    );
}

/// The window the inventory closes: objects acked by the edge but not recorded by cloudcore when
/// it dies (for a kedge edge nothing is recorded at all), then deleted in the cluster while
/// cloudcore is down, are deleted on the edge after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_acked_but_unrecorded_when_cloudcore_dies_are_deleted_after_restart() {
    let mut h = Harness::start().await;
    let mut e = h.edge("edge-w").await;
    assert!(e.wait_for(LinkState::Connected, T).await);
    h.wait_edge_node("edge-w").await;
    create_cm(&h.client, "wcm", "1").await;
    let pods: Api<Pod> = Api::default_namespaced(h.client.clone());
    let spec = json!({"volumes": [{"name": "v", "configMap": {"name": "wcm"}}]});
    pods.create(&PostParams::default(), &pod("wpod", "edge-w", spec.clone()))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("wkeep", "edge-w", json!({})))
        .await
        .unwrap();
    let store = e.store.clone();
    eventually_async("pod and ConfigMap on the edge", || async {
        store.inner.get("default/pod/wpod").is_some()
            && store.inner.get("default/configmap/wcm").is_some()
            && store.inner.get("default/pod/wkeep").is_some()
    })
    .await;
    let hub = h.cloud().hub.clone();
    // Settled: the edge holds both pods at their latest versions (cloudcore patches their
    // tolerations after they are created; a patch not yet delivered when cloudcore dies is
    // rightly sent after the restart, which is not what this test is about).
    eventually_async("acked at the pods' latest versions", || async {
        let mut latest = true;
        for name in ["wpod", "wkeep"] {
            let want = pods.get(name).await.unwrap().metadata.resource_version;
            let held = store
                .inner
                .get(&format!("default/pod/{name}"))
                .map(|o| o.resource_version.clone());
            latest &= want.is_some() && held == want;
        }
        hub.outstanding("edge-w") == 0 && latest
    })
    .await;
    // Killed right after the acks: nothing was written down.
    h.cloud.take().unwrap().kill().await;
    assert!(!h.has_sync_state("edge-w").await);
    assert!(e.wait_for(LinkState::Disconnected, T).await);
    pods.delete("wpod", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(h.client.clone());
    cms.delete("wcm", &DeleteParams::default()).await.unwrap();
    let before = e.store.arrivals().len();

    h.start_cloudcore().await;
    assert!(e.wait_for(LinkState::Connected, T).await);
    let store = e.store.clone();
    eventually_async("pod and ConfigMap deleted on the edge", || async {
        store.inner.get("default/pod/wpod").is_none()
            && store.inner.get("default/configmap/wcm").is_none()
    })
    .await;
    let hub = h.cloud().hub.clone();
    eventually_async("acked after restart", || async {
        hub.outstanding("edge-w") == 0
    })
    .await;
    let after: Vec<String> = e.store.arrivals()[before..]
        .iter()
        .map(|a| format!("{} {}", a.operation, a.resource))
        .collect();
    assert!(store.inner.get("default/pod/wkeep").is_some());
    assert_eq!(
        after,
        ["delete default/pod/wpod", "delete default/configmap/wcm"],
        "exactly the two deletes; the unchanged pod and Node are not sent again"
    );
}

/// The other direction: the edge lost what cloudcore believes it holds (its database was
/// replaced). The inventory says so, and everything the node needs is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_lost_its_objects_gets_them_again_and_objects_nobody_knows_are_deleted() {
    let h = Harness::start().await;
    let mut e = h.edge("edge-l").await;
    assert!(e.wait_for(LinkState::Connected, T).await);
    h.wait_edge_node("edge-l").await;
    create_cm(&h.client, "lcm", "1").await;
    let pods: Api<Pod> = Api::default_namespaced(h.client.clone());
    let spec = json!({"volumes": [{"name": "v", "configMap": {"name": "lcm"}}]});
    pods.create(&PostParams::default(), &pod("lpod", "edge-l", spec))
        .await
        .unwrap();
    let store = e.store.clone();
    eventually_async("pod on the edge", || async {
        store.inner.get("default/pod/lpod").is_some()
    })
    .await;
    let hub = h.cloud().hub.clone();
    // Settled: the edge holds the pod's latest version (cloudcore patches its tolerations after
    // it is created) and nothing is outstanding. A version still pending when the node comes
    // back empty can overtake the ConfigMap the reconcile sends (see the closing note of the
    // streams issue); this test is about what the reconcile sends.
    eventually_async("acked at the pod's latest version", || async {
        let latest = pods.get("lpod").await.unwrap().metadata.resource_version;
        let held = store
            .inner
            .get("default/pod/lpod")
            .map(|o| o.resource_version.clone());
        hub.outstanding("edge-l") == 0 && latest.is_some() && held == latest
    })
    .await;
    e.stop();
    assert!(e.wait_for(LinkState::Disconnected, T).await);
    drop(e);

    // A fresh store that holds only an object the cluster never had.
    let fresh = Arc::new(RecordingStore::default());
    fresh
        .inner
        .apply_now(
            &Message::new(
                "test",
                "resource",
                Operation::Insert,
                "default/pod/ghost",
                json!({"metadata": {"name": "ghost", "namespace": "default", "uid": "ghost-uid"}}),
            )
            .with_resource_version("3"),
        )
        .unwrap();
    let mut e2 = h.edge_with("edge-l", true, fresh.clone()).await;
    assert!(e2.wait_for(LinkState::Connected, T).await);
    eventually_async("everything back, the ghost gone", || async {
        fresh.inner.get("default/pod/lpod").is_some()
            && fresh.inner.get("default/configmap/lcm").is_some()
            && fresh.inner.get("null/node/edge-l").is_some()
            && fresh.inner.get("default/pod/ghost").is_none()
    })
    .await;
    // The ConfigMap arrived before the pod that uses it.
    let cm_at = fresh.first_arrival("default/configmap/lcm").unwrap();
    let pod_at = fresh.first_arrival("default/pod/lpod").unwrap();
    assert!(cm_at < pod_at, "{:#?}", fresh.arrivals());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_410s_make_cloudcore_relist_and_still_converge() {
    let h = Harness::start().await;
    let mut e = h.edge("edge-g").await;
    assert!(e.wait_for(LinkState::Connected, T).await);
    h.wait_edge_node("edge-g").await;
    let pods: Api<Pod> = Api::default_namespaced(h.client.clone());
    for round in 0..5 {
        for i in 0..10 {
            let name = format!("g{i}");
            if (i + round) % 3 == 0 {
                let _ = pods
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await;
            } else if pods.get_opt(&name).await.unwrap().is_none() {
                pods.create(&PostParams::default(), &pod(&name, "edge-g", json!({})))
                    .await
                    .unwrap();
            } else {
                pods.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"round": round.to_string()}}})),
                )
                .await
                .unwrap();
            }
            if i == 5 {
                // Watches end; events until the re-list are only visible through it.
                h.api.expire_watches();
            }
        }
        h.api.expire_watches();
    }
    let store = e.store.clone();
    eventually_async("edge converged after forced re-lists", || async {
        converged(&h, &store, "edge-g").await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_a_deleted_edge_node_are_not_left_behind() {
    let h = Harness::start().await;
    let mut e = h.edge("edge-x").await;
    assert!(e.wait_for(LinkState::Connected, T).await);
    h.wait_edge_node("edge-x").await;
    let pods: Api<Pod> = Api::default_namespaced(h.client.clone());
    for i in 0..3 {
        pods.create(
            &PostParams::default(),
            &pod(&format!("x{i}"), "edge-x", json!({})),
        )
        .await
        .unwrap();
    }
    pods.create(
        &PostParams::default(),
        &pod("elsewhere", "cloud-node", json!({})),
    )
    .await
    .unwrap();
    let store = e.store.clone();
    eventually_async("pods on the edge", || async {
        (0..3).all(|i| store.inner.get(&format!("default/pod/x{i}")).is_some())
    })
    .await;
    let nodes: Api<Node> = Api::all(h.client.clone());
    nodes
        .delete("edge-x", &DeleteParams::default())
        .await
        .unwrap();
    eventually_async("the deleted node's pods are gone", || async {
        pods.list(&ListParams::default().fields("spec.nodeName=edge-x"))
            .await
            .unwrap()
            .items
            .is_empty()
    })
    .await;
    assert!(
        pods.get_opt("elsewhere").await.unwrap().is_some(),
        "other pods stay"
    );
}

/// Reports of one node are applied in the order it sent them: a burst of status reports for one
/// pod leaves the last one in the API (applied concurrently, an older one could land last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_reports_are_applied_in_the_order_it_sent_them() {
    use futures_util::{SinkExt, StreamExt};
    let h = Harness::start().await;
    let creds = kedge_e2e::cloud::cluster_node_credentials(&h.client, &h.pki.ca, "edge-o")
        .await
        .unwrap();
    let mut ws = kedge_e2e::cloud::raw_connect(h.ws_addr, &creds, "edge-o")
        .await
        .unwrap();
    h.wait_edge_node("edge-o").await;
    let pods: Api<Pod> = Api::default_namespaced(h.client.clone());
    let created = pods
        .create(&PostParams::default(), &pod("ordered", "edge-o", json!({})))
        .await
        .unwrap();
    let uid = created.metadata.uid.unwrap();
    // cloudcore knows the pod is bound to edge-o once it sent it.
    loop {
        let frame = tokio::time::timeout(T, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if frame
            .to_text()
            .unwrap_or_default()
            .contains("default/pod/ordered")
        {
            break;
        }
    }
    const REPORTS: i32 = 60;
    for i in 1..=REPORTS {
        let status = json!({"phase": "Running", "containerStatuses": [{"name": "c", "ready": true,
            "restartCount": i, "image": "busybox", "imageID": "", "state": {"running": {}}}]});
        let mut m = status_report("ordered", &uid, status);
        m.header.sync = true;
        ws.feed(tokio_tungstenite::tungstenite::Message::text(m.to_json()))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    // Every report is acked once applied; after the last ack the API holds the last report.
    let mut acks = 0;
    while acks < REPORTS {
        let frame = tokio::time::timeout(T, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(m) = Message::from_str_limited(frame.to_text().unwrap_or_default(), 1 << 20)
            && m.route.operation == Operation::Response
            && m.route.resource.contains("podstatus")
        {
            acks += 1;
        }
    }
    let restarts = pods
        .get("ordered")
        .await
        .unwrap()
        .status
        .unwrap()
        .container_statuses
        .unwrap()[0]
        .restart_count;
    assert_eq!(restarts, REPORTS);
}

fn twin_report(device: &str, temperature: &str) -> Message {
    Message::new(
        "twin",
        "resource",
        Operation::Update,
        format!("device/default/{device}/twin/edge_updated"),
        json!({"event_id": "e", "timestamp": 1, "twin": {"temperature": {
            "actual": {"value": temperature, "metadata": {"timestamp": 1}},
            "metadata": {"type": "double"}}}}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_go_to_their_node_model_first_move_between_nodes_and_only_the_host_reports() {
    use kedge_common::crd::{Device, DeviceModel, DeviceStatus};
    let h = Harness::start_with(true).await;
    let mut e1 = h.edge("edge-1").await;
    let mut e2 = h.edge("edge-2").await;
    assert!(e1.wait_for(LinkState::Connected, T).await);
    assert!(e2.wait_for(LinkState::Connected, T).await);
    h.wait_edge_node("edge-1").await;
    h.wait_edge_node("edge-2").await;
    let models: Api<DeviceModel> = Api::namespaced(h.client.clone(), "default");
    let devices: Api<Device> = Api::namespaced(h.client.clone(), "default");
    let statuses: Api<DeviceStatus> = Api::namespaced(h.client.clone(), "default");
    models
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "m", "namespace": "default"},
                "spec": {"properties": [{"name": "temperature", "type": "DOUBLE", "accessMode": "ReadOnly"}]}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let device = |node: &str| -> Device {
        serde_json::from_value(json!({"metadata": {"name": "d", "namespace": "default"},
            "spec": {"deviceModelRef": {"name": "m"}, "nodeName": node, "properties": [{"name": "temperature"}]}}))
        .unwrap()
    };
    devices
        .create(&PostParams::default(), &device("edge-1"))
        .await
        .unwrap();
    let (s1, s2) = (e1.store.clone(), e2.store.clone());
    eventually_async("device and model on edge-1", || async {
        s1.inner.get("default/device/d").is_some()
            && s1.inner.get("default/devicemodel/m").is_some()
    })
    .await;
    assert!(s2.inner.get("default/device/d").is_none());

    // edge-2 forges a report for edge-1's device: refused; edge-1's report is written.
    let stats = h.cloud().stats.clone();
    e2.outbox
        .put("twin/d", twin_report("d", "99.5"))
        .await
        .unwrap();
    eventually_async("forged device report refused", || async {
        stats.device_reports_refused.load(Ordering::Relaxed) > 0
    })
    .await;
    e1.outbox
        .put("twin/d", twin_report("d", "21.5"))
        .await
        .unwrap();
    eventually_async("reported value in DeviceStatus", || async {
        statuses
            .get_opt("d")
            .await
            .unwrap()
            .and_then(|s| s.status)
            .is_some_and(|s| {
                s.twins
                    .iter()
                    .any(|t| t.reported.as_ref().is_some_and(|r| r.value == "21.5"))
            })
    })
    .await;
    let ds = statuses.get("d").await.unwrap();
    assert_eq!(ds.metadata.owner_references.unwrap()[0].kind, "Device");

    // The device moves: gone from edge-1 (with its model), on edge-2; edge-1 may not report.
    let patch = json!({"spec": {"nodeName": "edge-2"}});
    devices
        .patch("d", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually_async("device moved to edge-2", || async {
        s1.inner.get("default/device/d").is_none()
            && s1.inner.get("default/devicemodel/m").is_none()
            && s2.inner.get("default/device/d").is_some()
            && s2.inner.get("default/devicemodel/m").is_some()
    })
    .await;
    let refused = stats.device_reports_refused.load(Ordering::Relaxed);
    e1.outbox
        .put("twin/d", twin_report("d", "1.5"))
        .await
        .unwrap();
    eventually_async("report of the old host refused", || async {
        stats.device_reports_refused.load(Ordering::Relaxed) > refused
    })
    .await;
}

//! CloudStream and the link's streams, in process: cloudcore with its kubelet API against the
//! test API server, real EdgeHubs as edges whose stream server is a stand-in (it answers like a
//! kubelet but makes its own bytes), so the tests see exactly which node a request reached and
//! can push the link as hard as they like.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudcore::cloudhub::certs;
use cloudcore::cloudstream::authz::SubjectAccessReviewer;
use cloudcore::edgecontroller::EdgeControllerSettings;
use cloudcore::server::{RunningCloudCore, StreamServerOptions};
use k8s_openapi::api::core::v1::Pod;
use kedge_common::stream::{Stream, StreamRequest};
use kedge_e2e::apiserver::TestApiServer;
use kedge_e2e::apiserver::kubelet_proxy::KUBELET_CLIENT_USER;
use kedge_e2e::edge::{RecordingStore, TestEdge, fast_settings};
use kedge_e2e::kubelet::KubeletApiClient;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(60);

struct Cloud {
    server: TestApiServer,
    client: kube::Client,
    pki: Arc<certs::CloudPki>,
    cloud: RunningCloudCore,
    _dir: tempfile::TempDir,
}

async fn start_cloud() -> Cloud {
    kedge_common::tls::install_crypto_provider();
    let server = TestApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    server.create_namespace("kubeedge").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki =
        Arc::new(certs::load_or_create_in_dir(dir.path(), &["127.0.0.1".to_owned()]).unwrap());
    let opts = kedge_e2e::cloud::cloudcore_options(
        "127.0.0.1:0".parse().unwrap(),
        EdgeControllerSettings::default(),
        Some(StreamServerOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            client_ca_pem: server.client_ca_pem().to_owned(),
            authorizer: Arc::new(SubjectAccessReviewer::new(client.clone())),
        }),
    );
    let cloud = cloudcore::server::start(client.clone(), pki.clone(), opts)
        .await
        .unwrap();
    Cloud {
        server,
        client,
        pki,
        cloud,
        _dir: dir,
    }
}

/// Which node served which request.
type Served = Arc<Mutex<Vec<(String, String)>>>;

/// A stand-in for edged's stream server: a `follow=true` request gets an endless log of
/// 1 KiB lines (as fast as the stream's credit allows); anything else one line naming the node.
fn serve_streams(node: &str, mut rx: mpsc::Receiver<(Stream, StreamRequest)>, served: Served) {
    let node = node.to_owned();
    tokio::spawn(async move {
        while let Some((stream, request)) = rx.recv().await {
            served
                .lock()
                .unwrap()
                .push((node.clone(), request.target.clone()));
            let node = node.clone();
            tokio::spawn(async move {
                let (io, mut w) = tokio::io::duplex(64 * 1024);
                let pipe = tokio::spawn(stream.pipe(io));
                if request.target.contains("follow=true") {
                    let _ = w
                        .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                        .await;
                    let line = format!("{node} {}\n", "x".repeat(1023 - node.len() - 2));
                    while w.write_all(line.as_bytes()).await.is_ok() {}
                } else {
                    let body = format!("{node} {}\n", request.target);
                    let _ = w
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                    drop(w);
                }
                let _ = pipe.await;
            });
        }
    });
}

async fn bind_pod(client: &kube::Client, name: &str, node: &str) {
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
}

/// A client of CloudStream with the API server's kubelet client certificate, once `target` is
/// served (cloudcore learns of pods from its watch).
async fn as_the_api_server(c: &Cloud, target: &str) -> KubeletApiClient {
    let apiserver = KubeletApiClient::new(
        c.cloud.stream_addr.unwrap(),
        c.server.cluster_ca(),
        KUBELET_CLIENT_USER,
        Some("kubeadm:cluster-admins"),
    )
    .unwrap();
    kedge_e2e::wait_until(&format!("{target} served"), T, || async {
        apiserver.get(target).await.is_ok_and(|(s, _)| s == 200)
    })
    .await;
    apiserver
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_reach_only_the_pods_node_and_only_authorized_callers_get_them() {
    let c = start_cloud().await;
    let stream_addr = c.cloud.stream_addr.unwrap();
    let served: Served = Arc::default();
    let mut edges = Vec::new();
    for node in ["node-a", "node-b"] {
        let creds = kedge_e2e::cloud::cluster_node_credentials(&c.client, &c.pki.ca, node)
            .await
            .unwrap();
        let (edge, rx) = TestEdge::start_with_streams(
            fast_settings(c.cloud.websocket_addr, node),
            creds,
            Arc::new(RecordingStore::default()),
        );
        serve_streams(node, rx, served.clone());
        edges.push(edge);
    }
    for e in &mut edges {
        assert!(e.wait_for(edgecore::edgehub::LinkState::Connected, T).await);
    }
    bind_pod(&c.client, "pa", "node-a").await;
    bind_pod(&c.client, "pb", "node-b").await;
    let apiserver = as_the_api_server(&c, "/containerLogs/default/pb/c").await;
    let (status, body) = apiserver.get("/containerLogs/default/pa/c").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "node-a /containerLogs/default/pa/c\n")
    );
    let (status, body) = apiserver
        .get("/exec/default/pb/c?command=date&output=1")
        .await
        .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "node-b /exec/default/pb/c?command=date&output=1\n")
    );
    // Each node saw only its own pods' requests.
    for (node, target) in served.lock().unwrap().iter() {
        let pod = if node == "node-a" { "/pa/" } else { "/pb/" };
        assert!(target.contains(pod), "{node} got {target}");
    }

    // A pod on no edge node, and paths that name no pod.
    let (status, body) = apiserver
        .get("/containerLogs/default/nope/c")
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("default/nope"), "{body}");
    let (status, _) = apiserver.get("/logs/").await.unwrap();
    assert_eq!(status, 404);
    let (status, body) = apiserver.get("/healthz").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    // A certificate from the cluster CA whose user may not use the kubelet API: 403, as the
    // kubelet answers after its SubjectAccessReview.
    let intruder =
        KubeletApiClient::new(stream_addr, c.server.cluster_ca(), "intruder", None).unwrap();
    let (status, body) = intruder.get("/containerLogs/default/pa/c").await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("user=intruder"), "{body}");
    // A node's own certificate (signed by cloudcore's CA, not the cluster's): refused in the
    // TLS handshake.
    let other_ca = kedge_common::pki::CertificateAuthority::generate(
        "not the cluster",
        Duration::from_secs(3600),
    )
    .unwrap();
    let stranger =
        KubeletApiClient::new(stream_addr, &other_ca, KUBELET_CLIENT_USER, None).unwrap();
    assert!(stranger.get("/containerLogs/default/pa/c").await.is_err());
    let before = served.lock().unwrap().len();
    assert_eq!(before, 3, "refused callers reached no node");

    // Offline: answered at once, naming the node.
    edges.remove(1).stop();
    kedge_e2e::wait_until("node-b disconnected", T, || async {
        !c.cloud.hub.is_connected("node-b")
    })
    .await;
    let started = Instant::now();
    let (status, body) = apiserver.get("/containerLogs/default/pb/c").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("node node-b is not connected"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// 10 `logs -f` streams read as fast as they come, on one node, while 1,000 pods are bound to
/// it: every pod reaches the edge and is acknowledged, and no stream stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_followed_logs_do_not_starve_object_traffic() {
    let c = start_cloud().await;
    let served: Served = Arc::default();
    let node = "busy";
    let store = Arc::new(RecordingStore::default());
    let creds = kedge_e2e::cloud::cluster_node_credentials(&c.client, &c.pki.ca, node)
        .await
        .unwrap();
    let (mut edge, rx) = TestEdge::start_with_streams(
        fast_settings(c.cloud.websocket_addr, node),
        creds,
        store.clone(),
    );
    serve_streams(node, rx, served.clone());
    assert!(
        edge.wait_for(edgecore::edgehub::LinkState::Connected, T)
            .await
    );
    bind_pod(&c.client, "logger", node).await;
    let apiserver = as_the_api_server(&c, "/containerLogs/default/logger/c").await;

    // Ten followers, each recording bytes read and its longest wait for a read.
    let stop = tokio_util::sync::CancellationToken::new();
    let stats: Arc<Mutex<HashMap<usize, (u64, Duration)>>> = Arc::default();
    let mut followers = Vec::new();
    for i in 0..10 {
        let mut conn = apiserver
            .send("GET", "/containerLogs/default/logger/c?follow=true", &[])
            .await
            .unwrap();
        let (stop, stats) = (stop.clone(), stats.clone());
        followers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut last = Instant::now();
            let (mut total, mut worst) = (0u64, Duration::ZERO);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    r = conn.read(&mut buf) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            total += n as u64;
                            worst = worst.max(last.elapsed());
                            last = Instant::now();
                        }
                    }
                }
            }
            stats.lock().unwrap().insert(i, (total, worst));
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1,000 objects for the node while the streams run.
    let started = Instant::now();
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    for i in 0..1000 {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": format!("p-{i}")},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}}))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    let hub = c.cloud.hub.clone();
    kedge_e2e::wait_until("all 1,000 pods stored on the edge and acked", T, || async {
        let stored = store
            .arrivals()
            .iter()
            .filter(|a| a.resource.starts_with("default/pod/p-"))
            .map(|a| a.resource.clone())
            .collect::<std::collections::HashSet<_>>()
            .len();
        stored == 1000 && hub.outstanding(node) == 0
    })
    .await;
    let objects_took = started.elapsed();
    stop.cancel();
    for f in followers {
        f.await.unwrap();
    }
    let stats = stats.lock().unwrap();
    let total: u64 = stats.values().map(|(b, _)| b).sum();
    eprintln!(
        "1,000 pods acked in {objects_took:?} beside 10 followed logs; streams read {:.1} MB; \
         per stream (bytes, longest gap): {:?}",
        total as f64 / 1e6,
        stats.values().collect::<Vec<_>>()
    );
    assert_eq!(stats.len(), 10);
    for (i, (bytes, worst)) in stats.iter() {
        assert!(*bytes > 1_000_000, "stream {i} read only {bytes} bytes");
        assert!(
            *worst < Duration::from_secs(2),
            "stream {i} stalled for {worst:?}"
        );
    }
}

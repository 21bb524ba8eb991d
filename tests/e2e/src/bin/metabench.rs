//! MetaManager benchmark: objects persisted and acked per second (one at a time, queued, and
//! through the real link), MetaServer list latency for 1,000 pods, database size, and what the
//! inventory's index costs writers.
//!
//! ```sh
//! cargo run --release -p kedge-e2e --bin metabench
//! ```

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use cloudcore::cloudhub::{HubSettings, ObjectKey};
use edgecore::edgehub::EdgeHub;
use edgecore::metamanager::metaserver::{self, MetaServerSettings};
use edgecore::metamanager::sqlite::{SqliteOutbox, SqliteStore};
use edgecore::metamanager::store::ObjectStore;
use kedge_common::{Message, Operation};
use kedge_e2e::cloud::TestCloud;
use kedge_e2e::edge::fast_settings;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A pod as a real API server returns one (about 2 KiB of JSON).
fn pod(name: &str, rv: u64) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": format!("0b1c2d3e-{name}"), "resourceVersion": rv.to_string(),
            "creationTimestamp": "2026-11-23T04:00:00Z", "labels": {"app": "bench", "pod-template-hash": "7d4b9c8f6"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-23T04:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "bench-7d4b9c8f6", "uid": "11111111-2222-3333-4444-555555555555", "controller": true}]},
        "spec": {"nodeName": "edge-1", "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default", "schedulerName": "default-scheduler",
            "containers": [{"name": "app", "image": "registry.local/bench/app:1.2.3", "imagePullPolicy": "IfNotPresent",
                "args": ["--listen=:8080", "--log-level=info"], "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "MODE", "value": "edge"}, {"name": "CONFIG", "valueFrom": {"configMapKeyRef": {"name": "bench-config", "key": "config"}}}],
                "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "200m", "memory": "128Mi"}},
                "volumeMounts": [{"name": "config", "mountPath": "/etc/bench"}, {"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 10}}],
            "volumes": [{"name": "config", "configMap": {"name": "bench-config"}},
                {"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]},
        "status": {"phase": "Running", "podIP": "10.42.0.17", "hostIP": "192.168.1.20", "qosClass": "Burstable", "startTime": "2026-11-23T04:00:01Z",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-23T04:00:05Z"}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "registry.local/bench/app:1.2.3",
                "imageID": "sha256:0123456789abcdef", "containerID": "containerd://abcdef0123456789", "state": {"running": {"startedAt": "2026-11-23T04:00:04Z"}}}]}})
}

fn msg(name: &str, rv: u64) -> Message {
    Message::new(
        "edgecontroller",
        "resource",
        Operation::Update,
        format!("default/pod/{name}"),
        pod(name, rv),
    )
    .with_resource_version(rv.to_string())
}

async fn http_get(addr: &str, path: &str) -> anyhow::Result<usize> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out.len())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kedge_common::tls::install_crypto_provider();
    let dir = tempfile::tempdir()?;

    // 1. One at a time: every message waits for its own commit (one fsync each).
    let store = SqliteStore::open(&dir.path().join("single.db")).await?;
    let n = 500;
    let t = Instant::now();
    for i in 0..n {
        store.apply(&msg(&format!("s{i}"), i + 1)).await?;
    }
    let single = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "one at a time: {n} pods in {:.2} s = {single:.0} objects/s",
        t.elapsed().as_secs_f64()
    );

    // 2. Queued: as EdgeHub does, all submitted, then awaited (group commit).
    let store = SqliteStore::open(&dir.path().join("batched.db")).await?;
    let n = 5000u64;
    let t = Instant::now();
    let futs: Vec<_> = (0..n)
        .map(|i| store.apply(&msg(&format!("b{i}"), i + 1)))
        .collect();
    for f in futs {
        f.await?;
    }
    let batched = n as f64 / t.elapsed().as_secs_f64();
    let tx = store
        .stats()
        .transactions
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "queued: {n} pods in {:.2} s = {batched:.0} objects/s ({tx} transactions)",
        t.elapsed().as_secs_f64()
    );

    // 3. Through the link: cloudhub sends 5,000 pods to an EdgeHub on SQLite; clocked until the
    //    cloud has every ack.
    let cloud = TestCloud::start(HubSettings::default()).await?;
    let store = SqliteStore::open(&dir.path().join("link.db")).await?;
    let outbox = Arc::new(SqliteOutbox::new(&store).await?);
    let stop = CancellationToken::new();
    let hub = EdgeHub::new(
        fast_settings(cloud.websocket_addr, "edge-1"),
        Arc::new(RwLock::new(cloud.node_credentials("edge-1")?)),
        Arc::new(store.clone()),
        outbox,
    );
    let mut link = hub.link_state();
    tokio::spawn(hub.run(stop.clone()));
    link.wait_for(|s| *s == edgecore::edgehub::LinkState::Connected)
        .await?;
    let t = Instant::now();
    for i in 0..n {
        let name = format!("l{i}");
        let mut m = msg(&name, i + 1);
        m.route.resource = format!("node/edge-1/default/pod/{name}");
        let key = ObjectKey {
            kind: "pod".into(),
            namespace: Some("default".into()),
            uid: format!("0b1c2d3e-{name}"),
            name,
        };
        cloud.handle.enqueue(Some(key), m)?;
    }
    while cloud.handle.outstanding("edge-1") > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let link_rate = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "through the link (TLS, ack after commit): {n} pods acked in {:.2} s = {link_rate:.0} objects/s",
        t.elapsed().as_secs_f64()
    );
    stop.cancel();

    // 4. MetaServer list latency and database size for 1,000 pods.
    let path = dir.path().join("list.db");
    let store = SqliteStore::open(&path).await?;
    let futs: Vec<_> = (0..1000u64)
        .map(|i| store.apply(&msg(&format!("p{i:04}"), i + 1)))
        .collect();
    for f in futs {
        f.await?;
    }
    let ms_stop = CancellationToken::new();
    let addr = metaserver::start(
        store.clone(),
        MetaServerSettings {
            addr: "127.0.0.1:0".parse()?,
            serve_secrets: false,
            bookmark_interval: Duration::from_secs(60),
            metrics: None,
        },
        ms_stop.clone(),
    )
    .await?
    .to_string();
    let t = Instant::now();
    for _ in 0..10 {
        store.list_raw("pod", Some("default")).await?;
    }
    println!(
        "  (store.list_raw alone: {:.1} ms)",
        t.elapsed().as_secs_f64() * 100.0
    );
    let mut samples = Vec::new();
    let mut bytes = 0;
    for _ in 0..50 {
        let t = Instant::now();
        bytes = http_get(&addr, "/api/v1/namespaces/default/pods").await?;
        samples.push(t.elapsed());
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut sel = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        http_get(
            &addr,
            "/api/v1/namespaces/default/pods?labelSelector=app%3Dbench",
        )
        .await?;
        sel.push(t.elapsed());
    }
    sel.sort();
    println!(
        "  (with a label selector: median {:.1} ms)",
        sel[10].as_secs_f64() * 1000.0
    );
    println!(
        "MetaServer list of 1000 pods ({} KiB): median {:.1} ms, p95 {:.1} ms, max {:.1} ms (50 requests)",
        bytes / 1024,
        ms(samples[25]),
        ms(samples[47]),
        ms(samples[49])
    );
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(store.pool())
        .await?;
    let size = std::fs::metadata(&path)?.len();
    let wal = std::fs::metadata(path.with_extension("db-wal"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "database for 1000 pods: {} KiB ({} KiB WAL after checkpoint)",
        size / 1024,
        wal / 1024
    );
    ms_stop.cancel();

    // 5. What the inventory's covering index costs writers: queued writes with and without it,
    //    alternating so both see the same machine.
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..3 {
        for indexed in [true, false] {
            let path = dir.path().join(format!("index-{round}-{indexed}.db"));
            let rate = queued_rate(&path, indexed, 5000).await?;
            if indexed {
                with.push(rate)
            } else {
                without.push(rate)
            }
        }
    }
    with.sort_by(f64::total_cmp);
    without.sort_by(f64::total_cmp);
    println!(
        "queued writes with the inventory index: {:.0} objects/s, without: {:.0} objects/s (medians of 3)",
        with[1], without[1]
    );
    Ok(())
}

/// Queued writes per second into a fresh store, optionally without the inventory index.
async fn queued_rate(path: &std::path::Path, indexed: bool, n: u64) -> anyhow::Result<f64> {
    let store = SqliteStore::open(path).await?;
    if !indexed {
        sqlx::query("DROP INDEX objects_inventory")
            .execute(store.pool())
            .await?;
    }
    let t = Instant::now();
    let futs: Vec<_> = (0..n)
        .map(|i| store.apply(&msg(&format!("x{i}"), i + 1)))
        .collect();
    for f in futs {
        f.await?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

//! MetaManager end to end: the SQLite store behind EdgeHub, the MetaServer read by real kubectl,
//! autonomy across restarts without the cloud, and `kill -9` in the middle of a burst.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use cloudcore::cloudhub::{HubSettings, ObjectKey, Upstream};
use edgecore::edgehub::outbox::Outbox;
use edgecore::edgehub::{EdgeHub, LinkState};
use edgecore::metamanager::metaserver::{self, MetaServerSettings};
use edgecore::metamanager::sqlite::{SqliteOutbox, SqliteStore};
use edgecore::metamanager::store::ObjectStore;
use kedge_common::{Message, Operation};
use kedge_e2e::cloud::TestCloud;
use kedge_e2e::edge::fast_settings;
use kedge_e2e::proxy::ChaosProxy;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);

fn object(kind: &str, name: &str, rv: u64, extra: serde_json::Value) -> Message {
    let (api_version, k) = match kind {
        "pod" => ("v1", "Pod"),
        "configmap" => ("v1", "ConfigMap"),
        _ => ("v1", "Secret"),
    };
    let mut content = json!({"apiVersion": api_version, "kind": k,
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "resourceVersion": rv.to_string(),
            "labels": {"app": "demo"}}});
    if let (Some(c), Some(e)) = (content.as_object_mut(), extra.as_object()) {
        for (key, v) in e {
            c.insert(key.clone(), v.clone());
        }
    }
    Message::new(
        "edgecontroller",
        "resource",
        Operation::Update,
        format!("default/{kind}/{name}"),
        content,
    )
    .with_resource_version(rv.to_string())
}

async fn metaserver_on(store: &SqliteStore, stop: &CancellationToken) -> String {
    let addr = metaserver::start(
        store.clone(),
        MetaServerSettings {
            addr: "127.0.0.1:0".parse().unwrap(),
            serve_secrets: false,
            bookmark_interval: Duration::from_secs(1),
            metrics: None,
        },
        stop.clone(),
    )
    .await
    .unwrap();
    format!("http://{addr}")
}

fn kubectl(server: &str, args: &[&str]) -> (bool, String, String) {
    let o = Command::new("kubectl")
        .arg("--server")
        .arg(server)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .expect("kubectl is installed");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// edgecore's `/metrics` on the MetaServer, read with `kubectl get --raw`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metaserver_serves_edgecore_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("edge.db"))
        .await
        .unwrap();
    let outbox = Arc::new(SqliteOutbox::new(&store).await.unwrap());
    for (i, phase) in ["Running", "Running", "Pending"].iter().enumerate() {
        store
            .apply(&object(
                "pod",
                &format!("p-{i}"),
                10 + i as u64,
                json!({"spec": {"nodeName": "edge-1"}, "status": {"phase": phase}}),
            ))
            .await
            .unwrap();
    }
    store
        .apply(&object("configmap", "cfg", 20, json!({"data": {"k": "v"}})))
        .await
        .unwrap();
    outbox
        .put(
            "default/podstatus/p-0",
            object("podstatus", "p-0", 0, json!({})),
        )
        .await
        .unwrap();
    let (_link_tx, link) = tokio::sync::watch::channel(LinkState::Connected);
    let stop = CancellationToken::new();
    let addr = metaserver::start(
        store.clone(),
        MetaServerSettings {
            addr: "127.0.0.1:0".parse().unwrap(),
            serve_secrets: false,
            bookmark_interval: Duration::from_secs(1),
            metrics: Some(Arc::new(edgecore::observability::EdgeMetrics::new(
                store.clone(),
                outbox.clone(),
                link,
            ))),
        },
        stop.clone(),
    )
    .await
    .unwrap();
    let server = format!("http://{addr}");
    let (ok, text, err) =
        tokio::task::spawn_blocking(move || kubectl(&server, &["get", "--raw", "/metrics"]))
            .await
            .unwrap();
    assert!(ok, "{err}");
    for line in [
        "kedge_edgecore_cloud_connected 1",
        "kedge_edgecore_outbox_reports 1",
        "kedge_edgecore_store_objects{kind=\"pod\"} 3",
        "kedge_edgecore_store_objects{kind=\"configmap\"} 1",
        "kedge_edgecore_pods{phase=\"Running\"} 2",
        "kedge_edgecore_pods{phase=\"Pending\"} 1",
        "kedge_edgecore_store_messages_total 5",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing in:\n{text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("kedge_edgecore_store_bytes ") && !l.ends_with(" 0"))
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_kubectl_reads_and_watches_the_metaserver() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("edge.db"))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    for i in 0..3 {
        store
            .apply(&object("pod", &format!("web-{i}"), 10 + i, json!({"spec": {"nodeName": "edge-1", "containers": [{"name": "c", "image": "busybox"}]}})))
            .await
            .unwrap();
    }
    store
        .apply(&object(
            "configmap",
            "cfg",
            20,
            json!({"data": {"k": "v1"}}),
        ))
        .await
        .unwrap();
    store
        .apply(&object(
            "secret",
            "hidden",
            21,
            json!({"data": {"k": "dg=="}}),
        ))
        .await
        .unwrap();
    let server = metaserver_on(&store, &stop).await;

    let s = server.clone();
    let store2 = store.clone();
    tokio::task::spawn_blocking(move || {
        let (ok, out, err) = kubectl(&s, &["get", "pods", "-A"]);
        assert!(ok, "{err}");
        for i in 0..3 {
            assert!(out.contains(&format!("web-{i}")), "{out}");
        }
        let (ok, yaml, err) = kubectl(&s, &["get", "pod", "web-1", "-o", "yaml"]);
        assert!(ok, "{err}");
        assert!(yaml.contains("nodeName: edge-1"), "{yaml}");
        assert!(yaml.contains("uid: uid-web-1"), "{yaml}");
        let (ok, out, _) = kubectl(
            &s,
            &[
                "get",
                "pods",
                "-l",
                "app=demo",
                "--field-selector",
                "metadata.name=web-2",
                "-o",
                "name",
            ],
        );
        assert!(ok);
        assert_eq!(out.trim(), "pod/web-2");
        // Secrets are not served unless enabled.
        let (ok, _, err) = kubectl(&s, &["get", "secrets"]);
        assert!(!ok, "secrets must not be served by default");
        assert!(
            err.contains("the server doesn't have a resource type") || err.contains("NotFound"),
            "{err}"
        );
        // Writes are refused with a Status.
        let (ok, _, err) = kubectl(&s, &["delete", "pod", "web-0"]);
        assert!(!ok);
        assert!(err.contains("MethodNotAllowed"), "{err}");

        // get -w sees a change.
        let mut watch = Command::new("kubectl")
            .args([
                "--server",
                &s,
                "get",
                "cm",
                "cfg",
                "-w",
                "-o",
                "jsonpath={.data.k}{\"\\n\"}",
            ])
            .env_remove("KUBECONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Lines arrive on a channel, so a watch that stays silent fails the test after a
        // timeout instead of blocking it forever.
        let stdout = watch.stdout.take().unwrap();
        let (line_tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line_tx.send(l).is_err() {
                    return;
                }
            }
        });
        let first = lines.recv_timeout(Duration::from_secs(30));
        if first.as_deref() != Ok("v1") {
            let _ = watch.kill();
            panic!("kubectl get -w printed {first:?} first, not v1");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // kubectl prints the object it GETs, then watches from resourceVersion 0 and drops the
        // watch's first event as a repeat of it: a change made before its watch is established
        // arrives as that dropped event (as against a real API server). So keep changing the
        // ConfigMap until kubectl prints one of the values written.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut written = Vec::new();
        let mut saw = None;
        'outer: for version in 2..40 {
            let value = format!("v{version}");
            rt.block_on(store2.apply(&object(
                "configmap",
                "cfg",
                28 + version,
                json!({"data": {"k": value}}),
            )))
            .unwrap();
            written.push(value);
            let wait_until = (Instant::now() + Duration::from_secs(1)).min(deadline);
            while let Some(left) = wait_until.checked_duration_since(Instant::now()) {
                match lines.recv_timeout(left) {
                    Ok(l) if written.contains(&l) => {
                        saw = Some(l);
                        break 'outer;
                    }
                    // The value it started from, printed again (e.g. after a re-list).
                    Ok(l) if l == "v1" => {}
                    Ok(l) => {
                        let _ = watch.kill();
                        panic!("kubectl get -w printed {l}, which was never written");
                    }
                    Err(_) => break,
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        let saw = saw.is_some();
        let _ = watch.kill();
        let _ = watch.wait();
        assert!(saw, "kubectl get -w did not see the update");
    })
    .await
    .unwrap();
}

fn pod_key(name: &str) -> ObjectKey {
    ObjectKey {
        kind: "pod".into(),
        namespace: Some("default".into()),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_the_cloud_keeps_objects_and_reports_which_are_delivered_once_when_it_returns()
 {
    let mut cloud = TestCloud::start(HubSettings::default()).await.unwrap();
    let proxy = ChaosProxy::start(cloud.websocket_addr).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("edge.db");
    let creds = cloud.node_credentials("edge-a").unwrap();

    // First life: online, receives 20 pods.
    let store = SqliteStore::open(&db).await.unwrap();
    let outbox = Arc::new(SqliteOutbox::new(&store).await.unwrap());
    let stop = CancellationToken::new();
    let hub = EdgeHub::new(
        fast_settings(proxy.addr(), "edge-a"),
        Arc::new(RwLock::new(creds.clone())),
        Arc::new(store.clone()),
        outbox.clone(),
    );
    let mut link = hub.link_state();
    tokio::spawn(hub.run(stop.clone()));
    tokio::time::timeout(T, link.wait_for(|s| *s == LinkState::Connected))
        .await
        .unwrap()
        .unwrap();
    for i in 0..20 {
        let name = format!("p{i}");
        let mut m = object(
            "pod",
            &name,
            100 + i,
            json!({"spec": {"nodeName": "edge-a"}}),
        );
        m.route.resource = format!("node/edge-a/default/pod/{name}");
        cloud.handle.enqueue(Some(pod_key(&name)), m).unwrap();
    }
    let handle = cloud.handle.clone();
    let deadline = Instant::now() + T;
    while handle.outstanding("edge-a") > 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The cloud becomes unreachable; reports pile up; edgecore stops.
    proxy.set_refusing(true);
    proxy.cut_all();
    tokio::time::timeout(T, link.wait_for(|s| *s == LinkState::Disconnected))
        .await
        .unwrap()
        .unwrap();
    let report = |name: &str, phase: &str| {
        Message::new(
            "edged",
            "resource",
            Operation::Update,
            format!("default/podstatus/{name}"),
            json!({"name": name, "status": {"phase": phase}}),
        )
    };
    outbox.put("pod/p1", report("p1", "Pending")).await.unwrap();
    outbox.put("pod/p2", report("p2", "Running")).await.unwrap();
    outbox.put("pod/p1", report("p1", "Running")).await.unwrap();
    stop.cancel();
    drop(outbox);
    drop(store);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Second life, still offline: everything is still there and served.
    let store = SqliteStore::open(&db).await.unwrap();
    let outbox = Arc::new(SqliteOutbox::new(&store).await.unwrap());
    let (rows, _) = store.list(Some("pod"), None).await.unwrap();
    assert_eq!(rows.len(), 20);
    assert_eq!(outbox.pending_count().await.unwrap(), 2);
    let ms_stop = CancellationToken::new();
    let server = metaserver_on(&store, &ms_stop).await;
    let s = server.clone();
    let listed = tokio::task::spawn_blocking(move || kubectl(&s, &["get", "pods", "-o", "name"]))
        .await
        .unwrap();
    assert!(listed.0, "{}", listed.2);
    assert_eq!(listed.1.lines().count(), 20);

    let stop = CancellationToken::new();
    let hub = EdgeHub::new(
        fast_settings(proxy.addr(), "edge-a"),
        Arc::new(RwLock::new(creds)),
        Arc::new(store.clone()),
        outbox.clone(),
    );
    let mut link = hub.link_state();
    tokio::spawn(hub.run(stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*link.borrow(), LinkState::Disconnected);

    // The cloud returns: each report's latest state arrives exactly once.
    proxy.set_refusing(false);
    tokio::time::timeout(T, link.wait_for(|s| *s == LinkState::Connected))
        .await
        .unwrap()
        .unwrap();
    let mut got: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), cloud.upstream.recv()).await {
            Ok(Some(Upstream::Message { message, .. })) => {
                got.entry(message.route.resource.clone())
                    .or_default()
                    .push(message.content["status"]["phase"].clone());
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) if got.len() >= 2 && outbox.pending_count().await.unwrap() == 0 => break,
            Err(_) => {}
        }
    }
    assert_eq!(got["node/edge-a/default/podstatus/p1"], [json!("Running")]);
    assert_eq!(got["node/edge-a/default/podstatus/p2"], [json!("Running")]);
    assert_eq!(outbox.pending_count().await.unwrap(), 0);
    stop.cancel();
    ms_stop.cancel();
}

/// The edgecore binary next to this test's binary (cargo builds it for edgecore's own tests).
fn edgecore_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    dir.join("edgecore")
}

fn write_edge_config(dir: &Path, cloud: &TestCloud, node: &str) -> PathBuf {
    let creds = cloud.node_credentials(node).unwrap();
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(
        certs.join("ca.crt"),
        kedge_common::pki::der_to_pem(&creds.ca_der, "CERTIFICATE"),
    )
    .unwrap();
    std::fs::write(certs.join("edge.crt"), &creds.cert_pem).unwrap();
    std::fs::write(certs.join("edge.key"), &creds.key_pem).unwrap();
    let cfg = dir.join("edgecore.yaml");
    std::fs::write(
        &cfg,
        format!(
            "database:\n  dataSource: {db}\nmodules:\n  edgeHub:\n    heartbeat: 1\n    tlsCaFile: {c}/ca.crt\n    tlsCertFile: {c}/edge.crt\n    tlsPrivateKeyFile: {c}/edge.key\n    websocket:\n      server: {ws}\n  edged:\n    hostnameOverride: {node}\n  metaManager:\n    metaServer:\n      server: 127.0.0.1:0\n  eventBus:\n    enable: false\n  deviceTwin:\n    dmiSockPath: \"\"\n",
            db = dir.join("edge.db").display(),
            c = certs.display(),
            ws = cloud.websocket_addr,
        ),
    )
    .unwrap();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_a_burst_loses_no_acked_object_and_the_cloud_resends_the_rest() {
    let bin = edgecore_bin();
    assert!(bin.exists(), "{} not built", bin.display());
    let mut cloud = TestCloud::start(HubSettings::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_edge_config(dir.path(), &cloud, "edge-k");
    let spawn = || {
        Command::new(&bin)
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = spawn();
    cloud
        .expect_upstream(T, |e| matches!(e, Upstream::Connected { .. }))
        .await
        .unwrap();

    // A burst of 5,000 updates: 1,000 pods, 5 versions each.
    let mut final_rv: HashMap<String, u64> = HashMap::new();
    for v in 0..5u64 {
        for i in 0..1000u64 {
            let name = format!("k{i:04}");
            let rv = 1000 + v * 1000 + i;
            let mut m = object("pod", &name, rv, json!({"spec": {"nodeName": "edge-k"}}));
            m.route.resource = format!("node/edge-k/default/pod/{name}");
            cloud.handle.enqueue(Some(pod_key(&name)), m).unwrap();
            final_rv.insert(name, rv);
        }
    }
    // Kill -9 once a good share has been acked.
    let mut acked: HashMap<String, u64> = HashMap::new();
    while acked.len() < 300 {
        if let Upstream::Acked { acked: a, .. } = cloud
            .expect_upstream(T, |e| matches!(e, Upstream::Acked { .. }))
            .await
            .unwrap()
        {
            let rv: u64 = a.resource_version.parse().unwrap();
            let e = acked.entry(a.key.name.clone()).or_insert(0);
            *e = (*e).max(rv);
        }
    }
    child.kill().unwrap();
    let _ = child.wait();
    // Drain acks that were already on their way.
    while let Ok(Some(ev)) =
        tokio::time::timeout(Duration::from_millis(300), cloud.upstream.recv()).await
    {
        if let Upstream::Acked { acked: a, .. } = ev {
            let rv: u64 = a.resource_version.parse().unwrap();
            let e = acked.entry(a.key.name.clone()).or_insert(0);
            *e = (*e).max(rv);
        }
    }
    let outstanding = cloud.handle.outstanding("edge-k");
    assert!(
        outstanding > 0,
        "the burst finished before the kill; nothing was tested"
    );

    // Every acked version is in the database.
    {
        let store = SqliteStore::open(&dir.path().join("edge.db"))
            .await
            .unwrap();
        for (name, rv) in &acked {
            let o = store
                .get("pod", "default", name)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("acked {name} missing"));
            assert!(
                o.resource_version.parse::<u64>().unwrap() >= *rv,
                "{name}: acked {rv}, stored {}",
                o.resource_version
            );
        }
    }

    // Restarted, it gets the rest from the cloud and ends with every final version.
    let mut child = spawn();
    let handle = cloud.handle.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while handle.outstanding("edge-k") > 0 {
        assert!(
            Instant::now() < deadline,
            "cloud still has {} outstanding",
            handle.outstanding("edge-k")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    let _ = child.wait();
    let store = SqliteStore::open(&dir.path().join("edge.db"))
        .await
        .unwrap();
    let (rows, _) = store.list(Some("pod"), None).await.unwrap();
    assert_eq!(rows.len(), 1000);
    for r in rows {
        assert_eq!(
            r.object.resource_version,
            final_rv[&r.name].to_string(),
            "{}",
            r.name
        );
    }
}

//! Conformance with KubeEdge v1.23.1's edgecore, from the golden capture of a real KubeEdge
//! session (`tests/e2e/testdata/kubeedge-v1.23.1`, copied from `../shared/interop`).
//!
//! The KubeEdge edge's side of the capture is replayed against our cloudcore over a connection
//! made as KubeEdge's edge makes it (its upgrade headers, text frames ending in a newline), and
//! every reply is checked against the reply KubeEdge's cloudcore gave in the capture: the same
//! route (source, group, operation, resource), the same content shape (`{"Object", "Err"}`
//! wrapper, bare object of the same kind, `"OK"`) and the same `resourceversion` header
//! presence. Ids, timestamps and UIDs differ and are not compared; the UIDs and
//! resourceVersions the edge sends back are those of this cluster.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudcore::cloudhub::certs;
use cloudcore::edgecontroller::EdgeControllerSettings;
use futures_util::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kedge_common::crd::{Device, DeviceModel, DeviceStatus};
use kedge_e2e::apiserver::TestApiServer;
use kedge_e2e::cloud::RawWs;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as Frame;

const T: Duration = Duration::from_secs(30);
const NODE: &str = "kcap-edge";

/// The capture's payloads; index = line number - 1.
fn capture() -> Vec<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/kubeedge-v1.23.1/session.jsonl"
    );
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["payload"].clone())
        .collect()
}

/// The capture's reply to the request on `line`.
fn captured_reply(cap: &[Value], line: usize) -> &Value {
    let id = &cap[line - 1]["header"]["msg_id"];
    cap.iter()
        .find(|m| &m["header"]["parent_msg_id"] == id && m["route"]["operation"] == "response")
        .unwrap_or_else(|| panic!("no reply to line {line} in the capture"))
}

/// What a content looks like, ids and values aside.
fn shape(c: &Value) -> String {
    match c {
        Value::String(s) if s == "OK" => "\"OK\"".into(),
        Value::String(_) => "string".into(),
        Value::Null => "null".into(),
        Value::Object(m) if m.contains_key("Object") || m.contains_key("Err") => {
            let object = match &m["Object"] {
                Value::Null => "null".to_owned(),
                Value::Object(_) => "object".to_owned(),
                other => format!("{other}"),
            };
            let err = match &m["Err"] {
                Value::Null => "null".to_owned(),
                e => format!(
                    "ErrStatus(reason={}, code={})",
                    e["ErrStatus"]["reason"], e["ErrStatus"]["code"]
                ),
            };
            format!("{{Object: {object}, Err: {err}}}")
        }
        Value::Object(m) => format!("object kind={}", m.get("kind").unwrap_or(&Value::Null)),
        other => format!("{other}"),
    }
}

/// Our reply has KubeEdge's route, content shape and resourceversion header presence.
fn assert_like(ours: &Value, theirs: &Value, what: &str) {
    for k in ["source", "group", "operation", "resource"] {
        assert_eq!(
            ours["route"][k], theirs["route"][k],
            "{what}: route.{k}\nours: {ours}"
        );
    }
    assert_eq!(
        shape(&ours["content"]),
        shape(&theirs["content"]),
        "{what}: content\nours: {}",
        ours["content"]
    );
    assert_eq!(
        ours["header"].get("resourceversion").is_some(),
        theirs["header"].get("resourceversion").is_some(),
        "{what}: resourceversion header\nours: {}",
        ours["header"]
    );
}

/// A KubeEdge edgecore's end of the link: sends requests, acks pushes with "OK" as KubeEdge's
/// edge does, and keeps the pushes for the test to look at.
struct KubeEdgeEdge {
    ws: RawWs,
    pushes: Vec<Value>,
}

impl KubeEdgeEdge {
    async fn send(&mut self, m: &Value) {
        let text = format!("{}\n", serde_json::to_string(m).unwrap());
        self.ws.send(Frame::text(text)).await.unwrap();
    }

    async fn next(&mut self) -> Value {
        loop {
            let f = tokio::time::timeout(T, self.ws.next())
                .await
                .expect("nothing from cloudcore")
                .expect("connection closed")
                .unwrap();
            if let Frame::Text(t) = f {
                return serde_json::from_str(t.as_str()).unwrap();
            }
        }
    }

    /// KubeEdge's ack of a push: `response`, same resource, content "OK".
    async fn ack(&mut self, push: &Value) {
        let (source, group) = match push["route"]["source"].as_str() {
            Some("devicecontroller") if push["route"]["operation"] != "update" => ("meta", "twin"),
            Some("devicecontroller") => ("devicecontroller", "resource"),
            _ => ("edgecontroller", "resource"),
        };
        let ack = json!({
            "header": {"msg_id": kedge_common::message::new_id(), "parent_msg_id": push["header"]["msg_id"], "timestamp": 0},
            "route": {"source": source, "group": group, "operation": "response", "resource": push["route"]["resource"]},
            "content": "OK"
        });
        self.send(&ack).await;
    }

    /// Sends a request and returns cloudcore's reply (pushes meanwhile are acked and kept).
    async fn request(&mut self, req: &Value) -> Value {
        self.send(req).await;
        let id = req["header"]["msg_id"].clone();
        loop {
            let m = self.next().await;
            if m["header"]["parent_msg_id"] == id {
                return m;
            }
            if m["header"].get("parent_msg_id").is_none() {
                self.ack(&m).await;
                self.pushes.push(m);
            }
        }
    }

    /// Waits for a push matching `want` (acking everything that arrives).
    async fn push(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.pushes.iter().position(&want) {
            return self.pushes.remove(i);
        }
        let deadline = Instant::now() + T;
        loop {
            assert!(Instant::now() < deadline, "no push: {what}");
            let m = self.next().await;
            if m["header"].get("parent_msg_id").is_some() {
                continue;
            }
            self.ack(&m).await;
            if want(&m) {
                return m;
            }
            self.pushes.push(m);
        }
    }
}

/// The capture's request on `line` with a fresh id and the given content.
fn request_from(cap: &[Value], line: usize, content: Option<Value>) -> Value {
    let mut r = cap[line - 1].clone();
    r["header"]["msg_id"] = json!(kedge_common::message::new_id());
    if let Some(c) = content {
        r["content"] = c;
    }
    r
}

/// Replaces every occurrence of the capture's values (UIDs) with this cluster's.
fn substitute(v: &Value, pairs: &[(&str, &str)]) -> Value {
    let mut s = serde_json::to_string(v).unwrap();
    for (from, to) in pairs {
        s = s.replace(from, to);
    }
    serde_json::from_str(&s).unwrap()
}

async fn eventually<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    kedge_e2e::wait_until(what, T, cond).await
}

/// The test API server with the device CRDs, and our cloudcore on it.
async fn start_cloud() -> (
    TestApiServer,
    kube::Client,
    Arc<certs::CloudPki>,
    cloudcore::server::RunningCloudCore,
    tempfile::TempDir,
) {
    let api = TestApiServer::start().await.unwrap();
    let client = api.client().unwrap();
    api.create_namespace("kubeedge").await.unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in kedge_common::crd::all_crds() {
        crds.create(&PostParams::default(), &crd).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let pki =
        Arc::new(certs::load_or_create_in_dir(dir.path(), &["127.0.0.1".to_owned()]).unwrap());
    let opts = kedge_e2e::cloud::cloudcore_options(
        "127.0.0.1:0".parse().unwrap(),
        EdgeControllerSettings {
            node_update_frequency: Duration::from_millis(200),
            lease_duration_seconds: 40,
            devices: true,
            kubelet_endpoint: None,
        },
        None,
    );
    let cloud = cloudcore::server::start(client.clone(), pki.clone(), opts)
        .await
        .unwrap();
    (api, client, pki, cloud, dir)
}

#[tokio::test]
async fn a_kubeedge_edgecore_gets_kubeedge_s_replies_from_our_cloudcore() {
    kedge_common::tls::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("TEST_LOG").unwrap_or("warn,cloudcore=info".into()),
        ))
        .with_test_writer()
        .try_init();
    let cap = capture();
    let (_api, client, pki, cloud, _dir) = start_cloud().await;
    let creds = kedge_e2e::cloud::cluster_node_credentials(&client, &pki.ca, NODE)
        .await
        .unwrap();
    let ws = kedge_e2e::cloud::kubeedge_connect(cloud.websocket_addr, &creds, NODE)
        .await
        .unwrap();
    let mut edge = KubeEdgeEdge {
        ws,
        pushes: Vec::new(),
    };
    let nodes: Api<Node> = Api::all(client.clone());

    // S1: keepalive and the (never answered) membership/detail request, then the edge
    // registers its Node: the join made it (with its ownership record), without a status.
    edge.send(&request_from(&cap, 1, None)).await;
    edge.send(&request_from(&cap, 2, None)).await;
    let joined = nodes.get(NODE).await.unwrap();
    assert!(joined.status.and_then(|s| s.capacity).is_none());
    // The captured Node, with a label from the edge's nodeLabels and two a node may not set on
    // itself (NodeRestriction; cloudcore writes with its own credentials, so it enforces that).
    let mut registered = cap[2]["content"].clone();
    for (k, v) in [
        ("example.com/rack", "r7"),
        ("node-restriction.kubernetes.io/pool", "trusted"),
        ("node-role.kubernetes.io/control-plane", ""),
    ] {
        registered["metadata"]["labels"][k] = json!(v);
    }
    let r = edge.request(&request_from(&cap, 3, Some(registered))).await;
    assert_like(&r, captured_reply(&cap, 3), "node insert");
    let node = nodes.get(NODE).await.unwrap();
    let labels = node.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("example.com/rack").map(String::as_str),
        Some("r7")
    );
    assert!(
        !labels.contains_key("node-restriction.kubernetes.io/pool")
            && !labels.contains_key("node-role.kubernetes.io/control-plane"),
        "{labels:?}"
    );
    let status = node.status.clone().unwrap_or_default();
    assert_eq!(
        status.capacity.unwrap_or_default()["pods"].0,
        "110",
        "the Node carries the edge's status"
    );
    assert!(
        node.metadata
            .labels
            .unwrap_or_default()
            .contains_key("node-role.kubernetes.io/edge")
    );
    let node_uid = node.metadata.uid.unwrap();
    let cap_node_uid = "b376b5d0-0dd1-451b-8269-f128133dc406";

    // The cloud pushes the Node (now with the edge's status) as KubeEdge's does.
    let want = cap[4]["route"].clone();
    let pushed = edge.push("node update", |m| m["route"] == want).await;
    assert_eq!(shape(&pushed["content"]), shape(&cap[4]["content"]));

    let r = edge.request(&request_from(&cap, 10, None)).await;
    assert_like(&r, captured_reply(&cap, 10), "nodepatch");
    // Lease: query (not there yet) → insert → update, as KubeEdge's edged does every 10 s.
    let r = edge.request(&request_from(&cap, 18, None)).await;
    assert_like(&r, captured_reply(&cap, 18), "lease query");
    edge.ack(&r).await;
    let insert = substitute(&cap[20], &[(cap_node_uid, &node_uid)]);
    let r = edge
        .request(&request_from(&cap, 21, Some(insert["content"].clone())))
        .await;
    assert_like(&r, captured_reply(&cap, 21), "lease insert");
    edge.ack(&r).await;
    let mut update = cap[24]["content"].clone();
    update["metadata"] = r["content"]["Object"]["metadata"].clone();
    update["spec"]["renewTime"] = json!("2026-12-02T10:00:00.000000Z");
    let r = edge.request(&request_from(&cap, 25, Some(update))).await;
    assert_like(&r, captured_reply(&cap, 25), "lease update");
    assert_eq!(
        r["content"]["Object"]["spec"]["renewTime"],
        "2026-12-02T10:00:00.000000Z"
    );
    // The edge renews its own Lease: cloudcore must not (a renewal of its own would make the
    // edge's next update conflict).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut again = r["content"]["Object"].clone();
    again["spec"]["renewTime"] = json!("2026-12-02T10:00:10.000000Z");
    let r = edge.request(&request_from(&cap, 25, Some(again))).await;
    assert_like(&r, captured_reply(&cap, 25), "second lease update");

    // S2: a ConfigMap, a Secret and a pod using both on the node.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for (name, greeting) in [("kcap-cm", "hello v1"), ("not-for-this-node", "private")] {
        let cm = serde_json::from_value(
            json!({"metadata": {"name": name}, "data": {"greeting": greeting}}),
        )
        .unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let secret = serde_json::from_value(
        json!({"metadata": {"name": "kcap-secret"}, "stringData": {"password": "s3cret"}}),
    )
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "kcap-pod", "labels": {"app": "kcap"}},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "localhost/busybox:test",
            "command": ["sleep", "3600"],
            "env": [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "kcap-secret", "key": "password"}}}],
            "volumeMounts": [{"name": "cm", "mountPath": "/etc/cm"}]}],
            "volumes": [{"name": "cm", "configMap": {"name": "kcap-cm"}}]}
    }))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let pod_uid = pod.metadata.uid.clone().unwrap();
    let cap_pod_uid = "c96dcda3-c44e-448a-a348-e4faaa77b859";
    let insert = edge
        .push("pod insert", |m| {
            m["route"]["resource"] == "default/pod/kcap-pod"
        })
        .await;
    for k in ["source", "group", "operation", "resource"] {
        assert_eq!(
            insert["route"][k], cap[38]["route"][k],
            "pod push route.{k}"
        );
    }
    assert_eq!(shape(&insert["content"]), shape(&cap[38]["content"]));

    // The pod's status as a strategic merge patch.
    let patch = substitute(&cap[40], &[(cap_pod_uid, &pod_uid)]);
    let r = edge
        .request(&request_from(&cap, 41, Some(patch["content"].clone())))
        .await;
    assert_like(&r, captured_reply(&cap, 41), "podpatch");
    let status = pods.get("kcap-pod").await.unwrap().status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    assert!(
        status
            .conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "False")
    );

    // What the pod references, asked for by the edge; anything else is refused.
    let r = edge.request(&request_from(&cap, 45, None)).await;
    assert_like(&r, captured_reply(&cap, 45), "configmap query");
    assert_eq!(r["content"]["data"]["greeting"], "hello v1");
    edge.ack(&r).await;
    let r = edge.request(&request_from(&cap, 57, None)).await;
    assert_like(&r, captured_reply(&cap, 57), "secret query");
    edge.ack(&r).await;
    let mut other = request_from(&cap, 45, None);
    other["route"]["resource"] = json!("default/configmap/not-for-this-node");
    let r = edge.request(&other).await;
    assert_ne!(r["route"]["operation"], "response", "isolation: {r}");
    assert!(r["content"].to_string().find("private").is_none());
    let token = substitute(&cap[47], &[(cap_pod_uid, &pod_uid)]);
    let r = edge
        .request(&request_from(&cap, 48, Some(token["content"].clone())))
        .await;
    assert_like(&r, captured_reply(&cap, 48), "serviceaccounttoken query");
    assert!(
        !r["content"]["status"]["token"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
    );
    edge.ack(&r).await;

    // A pod of another node: neither its status nor its deletion is this node's to change.
    let foreign: Pod = serde_json::from_value(json!({"metadata": {"name": "foreign"},
        "spec": {"nodeName": "other-node", "containers": [{"name": "c", "image": "x"}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &foreign).await.unwrap();
    let mut p = request_from(&cap, 41, Some(json!("{\"status\":{\"phase\":\"Failed\"}}")));
    p["route"]["resource"] = json!("default/podpatch/foreign");
    let r = edge.request(&p).await;
    assert_eq!(r["content"]["Err"]["ErrStatus"]["code"], 403, "{r}");
    assert_ne!(
        pods.get("foreign")
            .await
            .unwrap()
            .status
            .and_then(|s| s.phase)
            .as_deref(),
        Some("Failed")
    );

    // S5: a device on the node; the edge's twin report reaches DeviceStatus and gets "OK".
    let models: Api<DeviceModel> = Api::namespaced(client.clone(), "default");
    let devices: Api<Device> = Api::namespaced(client.clone(), "default");
    models
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "metadata": {"name": "kcap-model"},
            "spec": {"properties": [{"name": "temperature", "type": "INT", "accessMode": "ReadWrite"}]}
        })).unwrap())
        .await
        .unwrap();
    devices
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "kcap-dev"},
                "spec": {"deviceModelRef": {"name": "kcap-model"}, "nodeName": NODE,
                    "properties": [{"name": "temperature", "desired": {"value": "20"}}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    for (line, what) in [
        (124, "membership"),
        (125, "devicemodel insert"),
        (127, "device insert"),
    ] {
        let want = cap[line - 1]["route"].clone();
        let m = edge.push(what, |m| m["route"] == want).await;
        assert_eq!(
            shape(&m["content"]),
            shape(&cap[line - 1]["content"]),
            "{what}"
        );
    }
    let r = edge.request(&request_from(&cap, 160, None)).await;
    assert_like(&r, captured_reply(&cap, 160), "twin edge_updated");
    let statuses: Api<DeviceStatus> = Api::namespaced(client.clone(), "default");
    eventually("reported temperature in DeviceStatus", || async {
        statuses
            .get_opt("kcap-dev")
            .await
            .unwrap()
            .and_then(|s| s.status)
            .is_some_and(|s| {
                s.twins.iter().any(|t| {
                    t.property_name.as_deref() == Some("temperature")
                        && t.reported.as_ref().is_some_and(|r| r.value == "25")
                })
            })
    })
    .await;

    // S6: the user deletes the pod; the edge stops it and finishes the deletion itself.
    pods.delete("kcap-pod", &DeleteParams::default())
        .await
        .unwrap();
    edge.push("pod update with deletionTimestamp", |m| {
        m["route"]["resource"] == "default/pod/kcap-pod"
            && m["content"]["metadata"]["deletionTimestamp"].is_string()
    })
    .await;
    let del = substitute(&cap[175], &[(cap_pod_uid, &pod_uid)]);
    let r = edge
        .request(&request_from(&cap, 176, Some(del["content"].clone())))
        .await;
    assert_like(&r, captured_reply(&cap, 176), "pod delete");
    eventually("pod gone from the API", || async {
        pods.get_opt("kcap-pod").await.unwrap().is_none()
    })
    .await;
    let gone = edge
        .push("pod delete", |m| {
            m["route"]["resource"] == "default/pod/kcap-pod" && m["route"]["operation"] == "delete"
        })
        .await;
    for k in ["source", "group", "operation", "resource"] {
        assert_eq!(
            gone["route"][k], cap[179]["route"][k],
            "pod delete push route.{k}"
        );
    }
    cloud.stop().await;
}

/// Each side learns from the upgrade which conversation to hold: our cloud answers our edge's
/// `kedge-protocol` header, and a KubeEdge edge (which sends none) gets none back.
#[tokio::test]
async fn the_kedge_protocol_header_is_answered_only_for_our_edge() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    kedge_common::tls::install_crypto_provider();
    let (_api, client, pki, cloud, _dir) = start_cloud().await;
    let creds = kedge_e2e::cloud::cluster_node_credentials(&client, &pki.ca, NODE)
        .await
        .unwrap();
    for ours in [true, false] {
        let tls = kedge_e2e::cloud::tls_connect(cloud.websocket_addr, &creds)
            .await
            .unwrap();
        let url = format!(
            "wss://{}/{}/{NODE}/events",
            cloud.websocket_addr,
            kedge_e2e::cloud::PROJECT
        );
        let mut req = url.into_client_request().unwrap();
        if ours {
            req.headers_mut().insert(
                kedge_common::inventory::PROTOCOL_HEADER,
                kedge_common::inventory::PROTOCOL_VERSION.parse().unwrap(),
            );
        }
        let (_ws, resp) = tokio_tungstenite::client_async(req, tls).await.unwrap();
        assert_eq!(
            resp.headers()
                .get(kedge_common::inventory::PROTOCOL_HEADER)
                .is_some(),
            ours
        );
    }
    cloud.stop().await;
}

/// Our edgecore facing a cloud that does not answer `kedge-protocol` (KubeEdge's) registers its
/// Node with its status and keeps its Lease alive itself, through KubeEdge's requests. Our own
/// cloudcore answers them as KubeEdge's does, so it stands in for KubeEdge's here: the edge is
/// told not to announce itself, and the cloud takes it for a KubeEdge edgecore.
#[tokio::test]
async fn our_edge_registers_its_node_and_renews_its_lease_the_kubeedge_way() {
    use edgecore::edged::kubeedge_node::{self, Timing};
    use edgecore::edged::node_status::NodeFacts;
    use edgecore::edgehub::{CloudKind, EdgeHub};
    use k8s_openapi::api::coordination::v1::Lease;
    kedge_common::tls::install_crypto_provider();
    let (_api, client, pki, cloud, _dir) = start_cloud().await;
    let node = "edge-kubeedge-way";
    let creds = kedge_e2e::cloud::cluster_node_credentials(&client, &pki.ca, node)
        .await
        .unwrap();
    let mut settings = kedge_e2e::edge::fast_settings(cloud.websocket_addr, node);
    settings.announce_protocol = false;
    settings.inventory = false;
    let store = Arc::new(kedge_e2e::edge::RecordingStore::default());
    let outbox = Arc::new(edgecore::edgehub::outbox::MemoryOutbox::new());
    let hub = EdgeHub::new(
        settings,
        Arc::new(std::sync::RwLock::new(creds)),
        store.clone(),
        outbox.clone(),
    );
    let (requester, link, kind) = (hub.requester(), hub.link_state(), hub.cloud_kind());
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(hub.run(stop.clone()));
    let facts = NodeFacts::gather(node, "192.0.2.10", "containerd", "1.6.20");
    let timing = Timing {
        status_every: Duration::from_millis(200),
        lease_every: Duration::from_millis(200),
        lease_seconds: 40,
    };
    tokio::spawn(kubeedge_node::run(
        facts,
        requester,
        link,
        kind.clone(),
        timing,
        stop.clone(),
    ));

    let nodes: Api<Node> = Api::all(client.clone());
    eventually("the Node registered with its status, Ready", || async {
        nodes.get_opt(node).await.unwrap().is_some_and(|n| {
            let s = n.status.unwrap_or_default();
            s.capacity
                .unwrap_or_default()
                .get("pods")
                .is_some_and(|q| q.0 == "110")
                && s.conditions
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    })
    .await;
    assert_eq!(*kind.borrow(), CloudKind::KubeEdge);
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let renewed = || async {
        leases
            .get_opt(node)
            .await
            .unwrap()
            .and_then(|l| l.spec)
            .and_then(|s| s.renew_time)
    };
    eventually("a Lease created by the edge", || async {
        renewed().await.is_some()
    })
    .await;
    let first = renewed().await;
    eventually("the Lease renewed by the edge", || async {
        renewed().await != first
    })
    .await;
    let lease = leases.get(node).await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some(node));
    let owner = lease.metadata.owner_references.unwrap_or_default();
    assert_eq!(owner.first().map(|o| o.kind.as_str()), Some("Node"));

    // A pod's status from the durable outbox reaches the API as KubeEdge's podpatch, and the
    // cloud's answer acknowledges it.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]}}))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    eventually("the pod reached the edge", || async {
        store.first_arrival("default/pod/p").is_some()
    })
    .await;
    let status: k8s_openapi::api::core::v1::PodStatus =
        serde_json::from_value(json!({"phase": "Running", "podIP": "10.88.0.7"})).unwrap();
    edgecore::edged::worker::report(&*outbox, &pod, &status).await;
    eventually("pod status in the API", || async {
        pods.get("p")
            .await
            .unwrap()
            .status
            .and_then(|s| s.pod_ip)
            .as_deref()
            == Some("10.88.0.7")
    })
    .await;
    eventually("the report acknowledged", || async { outbox.is_empty() }).await;

    // The user deletes the pod; once its containers are gone the edge finishes the deletion
    // with KubeEdge's `delete pod` (through the outbox).
    pods.delete("p", &DeleteParams::default()).await.unwrap();
    let terminating = pods.get("p").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    edgecore::edged::worker::finish_deletion(&*outbox, &terminating).await;
    eventually("the pod gone from the API", || async {
        pods.get_opt("p").await.unwrap().is_none()
    })
    .await;
    eventually("the deletion acknowledged", || async { outbox.is_empty() }).await;
    stop.cancel();
    cloud.stop().await;
}

/// A store that drops pushed ConfigMaps and Secrets, as if the cloud were KubeEdge's (which
/// pushes none until asked).
#[derive(Clone)]
struct WithoutPushedRefs(edgecore::metamanager::sqlite::SqliteStore);

impl edgecore::metamanager::store::ObjectStore for WithoutPushedRefs {
    fn apply(
        &self,
        msg: &kedge_common::Message,
    ) -> impl std::future::Future<
        Output = Result<
            edgecore::metamanager::store::Applied,
            edgecore::metamanager::store::StoreError,
        >,
    >
    + Send
    + 'static
    + use<> {
        let kind = kedge_common::ResourcePath::parse_edge(&msg.route.resource)
            .ok()
            .and_then(|p| p.resource_type().map(str::to_owned));
        let fut: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
            if matches!(kind.as_deref(), Some("configmap" | "secret")) {
                Box::pin(async { Ok(edgecore::metamanager::store::Applied::Stale) })
            } else {
                Box::pin(self.0.apply(msg))
            };
        fut
    }

    fn inventory(
        &self,
    ) -> impl std::future::Future<
        Output = Result<
            Vec<kedge_common::inventory::InventoryItem>,
            edgecore::metamanager::store::StoreError,
        >,
    >
    + Send
    + 'static
    + use<> {
        self.0.inventory()
    }
}

/// With a cloud that pushes no ConfigMaps (KubeEdge's), our edge asks for the ones its pods use.
#[tokio::test]
async fn our_edge_asks_kubeedge_s_cloud_for_the_configmaps_its_pods_use() {
    use edgecore::edgehub::EdgeHub;
    use edgecore::metamanager::sqlite::SqliteStore;
    kedge_common::tls::install_crypto_provider();
    let (_api, client, pki, cloud, dir) = start_cloud().await;
    let node = "edge-fetches";
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm = serde_json::from_value(json!({"metadata": {"name": "app-cm"}, "data": {"k": "v1"}}))
        .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "app"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}],
            "volumes": [{"name": "cm", "configMap": {"name": "app-cm"}}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();

    let store = SqliteStore::open(&dir.path().join("edge.db"))
        .await
        .unwrap();
    let creds = kedge_e2e::cloud::cluster_node_credentials(&client, &pki.ca, node)
        .await
        .unwrap();
    let mut settings = kedge_e2e::edge::fast_settings(cloud.websocket_addr, node);
    settings.announce_protocol = false;
    settings.inventory = false;
    let hub = EdgeHub::new(
        settings,
        Arc::new(std::sync::RwLock::new(creds)),
        Arc::new(WithoutPushedRefs(store.clone())),
        Arc::new(edgecore::edgehub::outbox::MemoryOutbox::new()),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(edgecore::edged::kubeedge_objects::run(
        store.clone(),
        hub.requester(),
        hub.link_state(),
        hub.cloud_kind(),
        Duration::from_millis(200),
        stop.clone(),
    ));
    // The edge registers its Node (KubeEdge's cloud makes none), so the cloud sends its pods.
    tokio::spawn(edgecore::edged::kubeedge_node::run(
        edgecore::edged::node_status::NodeFacts::gather(node, "192.0.2.10", "containerd", "1.6.20"),
        hub.requester(),
        hub.link_state(),
        hub.cloud_kind(),
        edgecore::edged::kubeedge_node::Timing::default(),
        stop.clone(),
    ));
    tokio::spawn(hub.run(stop.clone()));
    eventually("the pod on the edge", || async {
        store.get("pod", "default", "app").await.unwrap().is_some()
    })
    .await;
    eventually("the ConfigMap fetched into the edge's store", || async {
        store
            .get("configmap", "default", "app-cm")
            .await
            .unwrap()
            .is_some_and(|o| o.content["data"]["k"] == "v1")
    })
    .await;
    stop.cancel();
    cloud.stop().await;
}

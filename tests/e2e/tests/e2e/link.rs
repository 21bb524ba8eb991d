//! The cloud–edge link end to end: real TLS on loopback, cloudhub and edgehub in-process.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudcore::cloudhub::{HubSettings, ObjectKey, Upstream};
use edgecore::edgehub::credentials::{self, CredentialError, NodeCredentials};
use edgecore::edgehub::outbox::Outbox;
use edgecore::edgehub::{EdgeHubSettings, LinkState};
use edgecore::metamanager::store::{MemoryStore, ObjectStore};
use futures_util::{SinkExt, StreamExt};
use kedge_common::pki::JoinToken;
use kedge_common::{Message, Operation};
use kedge_e2e::cloud::{TestCloud, raw_connect};
use kedge_e2e::edge::{RecordingStore, TestEdge, fast_settings};
use kedge_e2e::proxy::ChaosProxy;
use serde_json::json;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message as Frame;

const T: Duration = Duration::from_secs(20);

fn edge_settings(server: std::net::SocketAddr, node: &str) -> EdgeHubSettings {
    fast_settings(server, node)
}

fn start_edge<S: ObjectStore>(
    settings: EdgeHubSettings,
    creds: NodeCredentials,
    store: Arc<S>,
) -> TestEdge<S> {
    TestEdge::start(settings, creds, store)
}

async fn wait_link(link: &mut watch::Receiver<LinkState>, want: LinkState) {
    tokio::time::timeout(T, link.wait_for(|s| *s == want))
        .await
        .expect("link state in time")
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

fn pod_msg(node: &str, name: &str, rv: u64) -> Message {
    Message::new(
        "edgecontroller",
        "resource",
        Operation::Update,
        format!("node/{node}/default/pod/{name}"),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "resourceVersion": rv.to_string()}}),
    )
    .with_resource_version(rv.to_string())
}

async fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn join_with_a_good_token_then_objects_flow_and_are_acked() {
    let mut cloud = TestCloud::start(HubSettings::default()).await.unwrap();
    let creds = credentials::join(&cloud.bootstrap_url(), &cloud.token(), "edge-1", T)
        .await
        .unwrap();
    let der = creds.cert_der().unwrap();
    assert_eq!(
        kedge_common::pki::node_name_from_cert(&der).unwrap(),
        "edge-1"
    );

    let mut edge = start_edge(
        edge_settings(cloud.websocket_addr, "edge-1"),
        creds,
        Arc::new(MemoryStore::new()),
    );
    wait_link(&mut edge.link, LinkState::Connected).await;
    cloud
        .expect_upstream(
            T,
            |e| matches!(e, Upstream::Connected { node, .. } if node == "edge-1"),
        )
        .await
        .unwrap();
    cloud
        .handle
        .enqueue(Some(pod_key("web")), pod_msg("edge-1", "web", 7))
        .unwrap();
    let acked = cloud
        .expect_upstream(T, |e| matches!(e, Upstream::Acked { .. }))
        .await
        .unwrap();
    match acked {
        Upstream::Acked { node, acked } => {
            assert_eq!(node, "edge-1");
            assert_eq!(acked.resource_version, "7");
            assert_eq!(acked.key, pod_key("web"));
        }
        other => panic!("{other:?}"),
    }
    // Acked means stored.
    let stored = edge.store.get("default/pod/web").unwrap();
    assert_eq!(stored.resource_version, "7");
    assert_eq!(cloud.handle.outstanding("edge-1"), 0);
}

#[tokio::test]
async fn bootstrap_refuses_bad_tokens_foreign_csrs_and_oversized_bodies() {
    let cloud = TestCloud::start(HubSettings::default()).await.unwrap();
    let url = cloud.bootstrap_url();
    let ca = cloud.pki.ca.cert_der().to_vec();
    let status = |e: CredentialError| match e {
        CredentialError::Refused { status, body, .. } => (status, body),
        other => panic!("expected a refusal, got {other}"),
    };

    // Expired token (valid for zero seconds).
    let expired = JoinToken::issue(&ca, cloud.pki.token_secret(), Duration::ZERO);
    let (code, body) = status(
        credentials::join(&url, &expired, "n1", T)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 401);
    assert!(body.contains("expired"), "{body}");

    // Forged: right CA hash, wrong signing secret.
    let forged = JoinToken::issue(&ca, b"guessed secret", Duration::from_secs(3600));
    let (code, body) = status(credentials::join(&url, &forged, "n1", T).await.unwrap_err());
    assert_eq!(code, 401);
    assert!(body.contains("signature"), "{body}");

    // A token for another CA: the edge refuses the CA it downloads.
    let other = TestCloud::start(HubSettings::default()).await.unwrap();
    let e = credentials::join(&url, &other.token(), "n1", T)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            CredentialError::Token(kedge_common::pki::TokenError::CaHashMismatch { .. })
        ),
        "{e}"
    );

    // CSR for node-a presented as node-b.
    let token = JoinToken::parse(&cloud.token()).unwrap();
    let trusted = kedge_common::tls::client_config(&ca, None).unwrap();
    let (_key, csr) = kedge_common::pki::node_csr("node-a").unwrap();
    let headers = [
        ("Authorization", format!("Bearer {}", token.jwt)),
        ("NodeName", "node-b".to_owned()),
    ];
    let e = credentials::bootstrap_request(
        &url,
        trusted.clone(),
        "/edge.crt",
        &headers,
        csr.clone().into_bytes(),
        T,
    )
    .await
    .unwrap_err();
    let (code, body) = status(e);
    assert_eq!(code, 403);
    assert!(body.contains("system:node:node-b"), "{body}");

    // Oversized CSR body.
    let e = credentials::bootstrap_request(
        &url,
        trusted.clone(),
        "/edge.crt",
        &headers,
        vec![b'A'; 64 * 1024],
        T,
    )
    .await
    .unwrap_err();
    assert_eq!(status(e).0, 413);

    // Garbage instead of a CSR.
    let headers_a = [
        ("Authorization", format!("Bearer {}", token.jwt)),
        ("NodeName", "node-a".to_owned()),
    ];
    let e = credentials::bootstrap_request(
        &url,
        trusted,
        "/edge.crt",
        &headers_a,
        b"not a csr".to_vec(),
        T,
    )
    .await
    .unwrap_err();
    assert_eq!(status(e).0, 400);
}

#[tokio::test]
async fn rotation_uses_the_current_certificate_and_only_for_its_own_node() {
    let cloud = TestCloud::start(HubSettings::default()).await.unwrap();
    let url = cloud.bootstrap_url();
    let creds = credentials::join(&url, &cloud.token(), "edge-r", T)
        .await
        .unwrap();
    let rotated = credentials::rotate(&url, &creds, "edge-r", T)
        .await
        .unwrap();
    assert_ne!(rotated.cert_pem, creds.cert_pem);
    assert_ne!(rotated.key_pem, creds.key_pem);
    assert_eq!(
        kedge_common::pki::node_name_from_cert(&rotated.cert_der().unwrap()).unwrap(),
        "edge-r"
    );
    // Node edge-r's certificate cannot get one for edge-x.
    let e = credentials::rotate(&url, &creds, "edge-x", T)
        .await
        .unwrap_err();
    assert!(
        matches!(e, CredentialError::Refused { status: 403, .. }),
        "{e}"
    );
}

#[tokio::test]
async fn a_certificate_for_node_a_cannot_connect_as_node_b_nor_speak_for_it() {
    let mut cloud = TestCloud::start(HubSettings::default()).await.unwrap();
    let a = cloud.node_credentials("node-a").unwrap();
    let e = raw_connect(cloud.websocket_addr, &a, "node-b")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("403"), "{e}");

    // Connected as itself, node-a tries to report for node-b; the cloud tags it as node-a's.
    let mut ws = raw_connect(cloud.websocket_addr, &a, "node-a")
        .await
        .unwrap();
    let forged = Message::new(
        "edged",
        "resource",
        Operation::Update,
        "node/node-b/default/podstatus/web",
        json!({"phase": "Running"}),
    );
    ws.send(Frame::text(forged.to_json())).await.unwrap();
    let ev = cloud
        .expect_upstream(T, |e| matches!(e, Upstream::Message { .. }))
        .await
        .unwrap();
    match ev {
        Upstream::Message { node, message, .. } => {
            assert_eq!(node, "node-a");
            assert!(
                message.route.resource.starts_with("node/node-a/"),
                "{}",
                message.route.resource
            );
        }
        other => panic!("{other:?}"),
    }

    // Objects queued for node-b never reach node-a.
    cloud
        .handle
        .enqueue(
            Some(pod_key("secret-pod")),
            pod_msg("node-b", "secret-pod", 3),
        )
        .unwrap();
    cloud
        .handle
        .enqueue(Some(pod_key("mine")), pod_msg("node-a", "mine", 4))
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Ok(Some(Ok(Frame::Text(t)))) => {
                let m = Message::from_str_limited(&t, 1 << 20).unwrap();
                seen.push(m.route.resource);
            }
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(None) | Ok(Some(Err(_))) => break,
        }
    }
    assert_eq!(seen, ["default/pod/mine"]);
}

#[tokio::test]
async fn fifty_link_cuts_during_a_thousand_updates_lose_nothing_and_reorder_nothing() {
    let cloud = TestCloud::start(HubSettings::default()).await.unwrap();
    let proxy = ChaosProxy::start(cloud.websocket_addr).await.unwrap();
    let creds = cloud.node_credentials("edge-chaos").unwrap();
    let mut edge = start_edge(
        edge_settings(proxy.addr(), "edge-chaos"),
        creds,
        Arc::new(RecordingStore::default()),
    );
    wait_link(&mut edge.link, LinkState::Connected).await;

    const OBJECTS: u64 = 200;
    const UPDATES: u64 = 1_000;
    let mut cuts = 0;
    for i in 0..UPDATES {
        let name = format!("pod-{}", i % OBJECTS);
        cloud
            .handle
            .enqueue(Some(pod_key(&name)), pod_msg("edge-chaos", &name, i + 1))
            .unwrap();
        if i % 20 == 19 {
            proxy.cut_all();
            cuts += 1;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(cuts, 50);

    let final_rv = |o: u64| (UPDATES - OBJECTS + o + 1).to_string();
    let handle = cloud.handle.clone();
    eventually("every final version acked", Duration::from_secs(60), || {
        handle.outstanding("edge-chaos") == 0
            && (0..OBJECTS).all(|o| {
                handle.last_acked("edge-chaos", &pod_key(&format!("pod-{o}"))) == Some(final_rv(o))
            })
    })
    .await;

    let snapshot = edge.store.inner.snapshot();
    assert_eq!(snapshot.len() as u64, OBJECTS);
    for o in 0..OBJECTS {
        let got = &snapshot[&format!("default/pod/pod-{o}")];
        assert_eq!(got.resource_version, final_rv(o), "object pod-{o}");
    }
    let applied = edge.store.applied.lock().unwrap();
    for (key, versions) in applied.iter() {
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "{key} applied out of order: {versions:?}"
        );
    }
    assert!(
        proxy.accepted() > 10,
        "the link really was re-established ({} connections)",
        proxy.accepted()
    );
}

#[tokio::test]
async fn malformed_frames_close_only_that_connection() {
    let settings = HubSettings {
        codec: kedge_common::wire::WireCodec::new(64 * 1024),
        ..HubSettings::default()
    };
    let cloud = TestCloud::start(settings).await.unwrap();
    let good = cloud.node_credentials("good").unwrap();
    let mut edge = start_edge(
        edge_settings(cloud.websocket_addr, "good"),
        good,
        Arc::new(MemoryStore::new()),
    );
    wait_link(&mut edge.link, LinkState::Connected).await;

    let bad = cloud.node_credentials("bad").unwrap();
    let payloads = [
        Frame::Binary(vec![0xde, 0xad, 0xbe, 0xef, 0xff, 0x00].into()),
        Frame::text("{\"header\":{\"msg_id\":\"x\",\"timestamp\":1},\"route\":"),
        Frame::text("[1,2,3]"),
        Frame::text("x".repeat(100 * 1024)),
    ];
    for (i, frame) in payloads.into_iter().enumerate() {
        let mut ws = raw_connect(cloud.websocket_addr, &bad, "bad")
            .await
            .unwrap();
        let _ = ws.send(frame).await;
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match ws.next().await {
                    None | Some(Err(_)) | Some(Ok(Frame::Close(_))) => break,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "payload {i}: connection was not closed");
        // The good node still gets its objects.
        let name = format!("after-{i}");
        cloud
            .handle
            .enqueue(Some(pod_key(&name)), pod_msg("good", &name, 10 + i as u64))
            .unwrap();
        let store = edge.store.clone();
        eventually("good node keeps receiving", T, || {
            store.get(&format!("default/pod/{name}")).is_some()
        })
        .await;
    }
    assert_eq!(*edge.link.borrow(), LinkState::Connected);
}

#[tokio::test]
async fn a_new_connection_replaces_the_old_and_receives_the_pending_queue() {
    let cloud = TestCloud::start(HubSettings::default()).await.unwrap();
    let creds = cloud.node_credentials("twin").unwrap();
    let mut first = raw_connect(cloud.websocket_addr, &creds, "twin")
        .await
        .unwrap();
    cloud
        .handle
        .enqueue(Some(pod_key("p")), pod_msg("twin", "p", 5))
        .unwrap();
    // The first session receives it but never acks.
    let got = tokio::time::timeout(T, first.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(got, Frame::Text(_)));

    let mut second = raw_connect(cloud.websocket_addr, &creds, "twin")
        .await
        .unwrap();
    // The old one is closed...
    let closed = tokio::time::timeout(T, async {
        loop {
            match first.next().await {
                None | Some(Err(_)) | Some(Ok(Frame::Close(_))) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "old session was not closed");
    // ...and the new one gets the unacked message again, at once.
    let msg = loop {
        match tokio::time::timeout(Duration::from_secs(3), second.next())
            .await
            .unwrap()
        {
            Some(Ok(Frame::Text(t))) => break Message::from_str_limited(&t, 1 << 20).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(msg.route.resource, "default/pod/p");
    let ack = msg.response("metaManager", json!("OK"));
    second.send(Frame::text(ack.to_json())).await.unwrap();
    let handle = cloud.handle.clone();
    eventually("ack recorded", T, || handle.outstanding("twin") == 0).await;
    assert!(cloud.handle.is_connected("twin"));
}

#[tokio::test]
async fn reports_made_while_disconnected_are_delivered_latest_first_in_order_after_reconnect() {
    let mut cloud = TestCloud::start(HubSettings::default()).await.unwrap();
    let proxy = ChaosProxy::start(cloud.websocket_addr).await.unwrap();
    proxy.set_refusing(true);
    let creds = cloud.node_credentials("offline").unwrap();
    let mut edge = start_edge(
        edge_settings(proxy.addr(), "offline"),
        creds,
        Arc::new(MemoryStore::new()),
    );
    let report = |name: &str, phase: &str| {
        Message::new(
            "edged",
            "resource",
            Operation::Update,
            format!("default/podstatus/{name}"),
            json!({"phase": phase}),
        )
    };
    edge.outbox
        .put("pod/a", report("a", "Pending"))
        .await
        .unwrap();
    edge.outbox
        .put("pod/b", report("b", "Running"))
        .await
        .unwrap();
    edge.outbox
        .put("pod/a", report("a", "Running"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*edge.link.borrow(), LinkState::Disconnected);
    assert_eq!(edge.outbox.len(), 2);

    proxy.set_refusing(false);
    wait_link(&mut edge.link, LinkState::Connected).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Upstream::Message { message, .. } = cloud
            .expect_upstream(T, |e| matches!(e, Upstream::Message { .. }))
            .await
            .unwrap()
        {
            got.push((message.route.resource.clone(), message.content.clone()));
        }
    }
    assert_eq!(
        got,
        [
            (
                "node/offline/default/podstatus/b".to_owned(),
                json!({"phase": "Running"})
            ),
            (
                "node/offline/default/podstatus/a".to_owned(),
                json!({"phase": "Running"})
            ),
        ]
    );
    let outbox = edge.outbox.clone();
    eventually("outbox drained after the cloud's acks", T, || {
        outbox.is_empty()
    })
    .await;
}

#[tokio::test]
async fn silent_sessions_are_closed_and_heartbeating_ones_are_not() {
    let settings = HubSettings {
        keepalive_timeout: Duration::from_secs(1),
        ..HubSettings::default()
    };
    let cloud = TestCloud::start(settings).await.unwrap();
    let quiet = cloud.node_credentials("quiet").unwrap();
    let mut ws = raw_connect(cloud.websocket_addr, &quiet, "quiet")
        .await
        .unwrap();
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Frame::Close(_))) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "silent session still open");
    assert!(started.elapsed() >= Duration::from_millis(900));

    let live = cloud.node_credentials("live").unwrap();
    let mut s = edge_settings(cloud.websocket_addr, "live");
    s.heartbeat = Duration::from_millis(300);
    let mut edge = start_edge(s, live, Arc::new(MemoryStore::new()));
    wait_link(&mut edge.link, LinkState::Connected).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(*edge.link.borrow(), LinkState::Connected);
    assert!(!edge.link.has_changed().unwrap(), "link flapped");
}

#[tokio::test]
async fn a_report_the_cloud_could_not_process_is_sent_again_and_kept_until_processed() {
    let mut cloud = TestCloud::start(HubSettings::default()).await.unwrap();
    let creds = cloud.node_credentials("retry").unwrap();
    let mut edge = start_edge(
        edge_settings(cloud.websocket_addr, "retry"),
        creds,
        Arc::new(MemoryStore::new()),
    );
    wait_link(&mut edge.link, LinkState::Connected).await;
    let report = Message::new(
        "edged",
        "resource",
        Operation::Update,
        "default/podstatus/web",
        json!({"phase": "Running"}),
    );
    edge.outbox.put("pod/web", report).await.unwrap();
    // First delivery: the API server is "down".
    match cloud
        .expect_upstream(T, |e| matches!(e, Upstream::Message { .. }))
        .await
        .unwrap()
    {
        Upstream::Message { ack, .. } => ack.retry_later(),
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(edge.outbox.len(), 1, "an unprocessed report must stay");
    // It comes again, and this time it is processed.
    match cloud
        .expect_upstream(T, |e| matches!(e, Upstream::Message { .. }))
        .await
        .unwrap()
    {
        Upstream::Message { message, ack, .. } => {
            assert_eq!(message.content, json!({"phase": "Running"}));
            ack.processed();
        }
        other => panic!("{other:?}"),
    }
    let outbox = edge.outbox.clone();
    eventually("report removed after processing", T, || outbox.is_empty()).await;
}

#[tokio::test]
async fn a_report_too_large_to_send_stays_queued_without_breaking_the_link() {
    let mut cloud = TestCloud::start(HubSettings::default()).await.unwrap();
    let creds = cloud.node_credentials("big").unwrap();
    let mut settings = edge_settings(cloud.websocket_addr, "big");
    settings.codec = kedge_common::wire::WireCodec::new(2048);
    let mut edge = start_edge(settings, creds, Arc::new(MemoryStore::new()));
    wait_link(&mut edge.link, LinkState::Connected).await;
    let report = |name: &str, payload: String| {
        Message::new(
            "edged",
            "resource",
            Operation::Update,
            format!("default/podstatus/{name}"),
            json!({"message": payload}),
        )
    };
    edge.outbox
        .put("pod/huge", report("huge", "x".repeat(4096)))
        .await
        .unwrap();
    edge.outbox
        .put("pod/small", report("small", "ok".into()))
        .await
        .unwrap();
    let ev = cloud
        .expect_upstream(T, |e| matches!(e, Upstream::Message { .. }))
        .await
        .unwrap();
    match ev {
        Upstream::Message { message, ack, .. } => {
            assert_eq!(message.route.resource, "node/big/default/podstatus/small");
            ack.processed();
        }
        other => panic!("{other:?}"),
    }
    let outbox = edge.outbox.clone();
    eventually("small report acked", T, || outbox.len() == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*edge.link.borrow(), LinkState::Connected);
    assert!(!edge.link.has_changed().unwrap(), "the link must not flap");
    assert_eq!(
        edge.outbox.len(),
        1,
        "the oversized report is kept, not dropped"
    );
}

/// A node that stops reading (its packets dropped somewhere) fills the socket buffers; the
/// cloud ends its session at `writeTimeout` instead of keeping it "connected" (Lease renewed,
/// Node Ready) until TCP gives up. The keepalive is far longer here, so only the write bound
/// can end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_reading_is_disconnected_at_the_write_timeout() {
    let settings = HubSettings {
        keepalive_timeout: Duration::from_secs(120),
        write_timeout: Duration::from_secs(1),
        ..HubSettings::default()
    };
    let cloud = TestCloud::start(settings).await.unwrap();
    let creds = cloud.node_credentials("stalled").unwrap();
    let stalled = raw_connect(cloud.websocket_addr, &creds, "stalled")
        .await
        .unwrap();
    let handle = cloud.handle.clone();
    eventually("connected", T, || handle.is_connected("stalled")).await;
    // 300 × 200 KB: far more than loopback's socket buffers hold.
    let filler = "x".repeat(200 * 1024);
    for i in 0..300u64 {
        let name = format!("p{i:03}");
        let mut msg = pod_msg("stalled", &name, i + 1);
        msg.content["metadata"]["annotations"] = json!({ "filler": filler });
        cloud.handle.enqueue(Some(pod_key(&name)), msg).unwrap();
    }
    let started = Instant::now();
    eventually("the stalled session ended", Duration::from_secs(15), || {
        !handle.is_connected("stalled")
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    drop(stalled);
}

//! The test API server, driven by kube-rs exactly as cloudcore drives a real cluster.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kedge_common::crd::{Device, DeviceSpec, all_crds};
use kedge_e2e::apiserver::TestApiServer;
use kube::api::{
    Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            ),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("k".into(), "v".into())])),
        ..Default::default()
    }
}

fn api_error(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason),
        other => panic!("expected an API error, got {other}"),
    }
}

async fn install_crds(client: &kube::Client) {
    let api: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    for crd in all_crds() {
        api.create(&PostParams::default(), &crd).await.unwrap();
    }
}

#[tokio::test]
async fn crud_conflicts_and_not_found() {
    let server = TestApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::default_namespaced(server.client().unwrap());
    let created = api
        .create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    let rv1 = created.metadata.resource_version.clone().unwrap();
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(
        api_error(
            api.create(&PostParams::default(), &cm("a", &[]))
                .await
                .unwrap_err()
        ),
        (409, "AlreadyExists".into())
    );
    let mut update = created.clone();
    update.data = Some(BTreeMap::from([("k".into(), "v2".into())]));
    let updated = api
        .replace("a", &PostParams::default(), &update)
        .await
        .unwrap();
    assert_ne!(
        updated.metadata.resource_version.as_deref(),
        Some(rv1.as_str())
    );
    // Replacing with the stale resourceVersion is a conflict.
    assert_eq!(
        api_error(
            api.replace("a", &PostParams::default(), &update)
                .await
                .unwrap_err()
        ),
        (409, "Conflict".into())
    );
    let patched = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"x": "y"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap()["x"], "y");
    // generateName
    let mut g = cm("", &[]);
    g.metadata.name = None;
    g.metadata.generate_name = Some("gen-".into());
    let made = api.create(&PostParams::default(), &g).await.unwrap();
    assert!(made.metadata.name.unwrap().starts_with("gen-"));
    api.delete("a", &DeleteParams::default()).await.unwrap();
    assert_eq!(
        api_error(api.get("a").await.unwrap_err()),
        (404, "NotFound".into())
    );
    assert!(api.get_opt("a").await.unwrap().is_none());
    // A namespace that does not exist.
    let other: Api<ConfigMap> = Api::namespaced(server.client().unwrap(), "nope");
    assert_eq!(
        api_error(
            other
                .create(&PostParams::default(), &cm("a", &[]))
                .await
                .unwrap_err()
        )
        .0,
        404
    );
}

#[tokio::test]
async fn label_and_field_selectors_filter() {
    let server = TestApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::default_namespaced(server.client().unwrap());
    for (name, node, app) in [("p1", "n1", "web"), ("p2", "n2", "web"), ("p3", "n1", "db")] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    let names = |l: kube::core::ObjectList<Pod>| -> Vec<String> {
        l.items
            .into_iter()
            .map(|p| p.metadata.name.unwrap())
            .collect()
    };
    let on_n1 = pods
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await
        .unwrap();
    assert_eq!(names(on_n1), ["p1", "p3"]);
    let web = pods
        .list(&ListParams::default().labels("app in (web)"))
        .await
        .unwrap();
    assert_eq!(names(web), ["p1", "p2"]);
    let both = pods
        .list(
            &ListParams::default()
                .labels("app!=db")
                .fields("spec.nodeName=n1"),
        )
        .await
        .unwrap();
    assert_eq!(names(both), ["p1"]);
    assert_eq!(
        names(
            pods.list(&ListParams::default().fields("status.phase=Pending"))
                .await
                .unwrap()
        )
        .len(),
        3
    );
    let bad = pods
        .list(&ListParams::default().fields("spec.bogus=1"))
        .await
        .unwrap_err();
    assert_eq!(api_error(bad).0, 400);
    // Pagination.
    let page = pods.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(page.items.len(), 2);
    let token = page.metadata.continue_.clone().unwrap();
    let rest = pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(names(rest), ["p3"]);
}

#[tokio::test]
async fn watch_streams_events_bookmarks_and_410_for_old_versions() {
    let server = TestApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::default_namespaced(server.client().unwrap());
    let list = api.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    let mut stream = api
        .watch(
            &WatchParams {
                bookmarks: true,
                ..WatchParams::default()
            },
            &rv,
        )
        .await
        .unwrap()
        .boxed();
    api.create(&PostParams::default(), &cm("w", &[]))
        .await
        .unwrap();
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "2"}})),
    )
    .await
    .unwrap();
    api.delete("w", &DeleteParams::default()).await.unwrap();
    let mut kinds = Vec::new();
    let mut bookmark = false;
    let deadline = Instant::now() + T;
    while (kinds.len() < 3 || !bookmark) && Instant::now() < deadline {
        match tokio::time::timeout(T, stream.try_next())
            .await
            .unwrap()
            .unwrap()
        {
            Some(WatchEvent::Added(_)) => kinds.push("ADDED"),
            Some(WatchEvent::Modified(_)) => kinds.push("MODIFIED"),
            Some(WatchEvent::Deleted(_)) => kinds.push("DELETED"),
            Some(WatchEvent::Bookmark(_)) => bookmark = true,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"]);
    assert!(bookmark);

    server.expire_watches();
    let mut old = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(T, old.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Error(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn watcher_and_reflector_converge_after_forced_410s() {
    let server = TestApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    for i in 0..30 {
        api.create(
            &PostParams::default(),
            &cm(&format!("c{i}"), &[("set", "a")]),
        )
        .await
        .unwrap();
    }
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream = reflector(
        writer,
        watcher(api.clone(), watcher::Config::default().labels("set=a")).default_backoff(),
    );
    let task = tokio::spawn(stream.for_each(|_| async {}));
    reader.wait_until_ready().await.unwrap();
    for round in 0..3 {
        for i in 0..30 {
            let name = format!("c{i}");
            match (i + round) % 3 {
                0 => {
                    let _ = api.delete(&name, &DeleteParams::default()).await;
                }
                1 => {
                    let _ = api
                        .patch(
                            &name,
                            &PatchParams::default(),
                            &Patch::Merge(json!({"data": {"round": round.to_string()}})),
                        )
                        .await;
                }
                _ => {
                    let _ = api
                        .create(&PostParams::default(), &cm(&name, &[("set", "a")]))
                        .await;
                }
            }
            if i == 15 {
                // Objects changed while the watch is down are only seen through a re-list.
                server.expire_watches();
            }
        }
        // One object leaves the selector: the reflector must drop it.
        let _ = api
            .patch(
                "c1",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"set": "b"}}})),
            )
            .await;
        server.expire_watches();
    }
    let deadline = Instant::now() + T;
    loop {
        let want: BTreeMap<String, Option<BTreeMap<String, String>>> = api
            .list(&ListParams::default().labels("set=a"))
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|c| (c.metadata.name.unwrap(), c.data))
            .collect();
        let have: BTreeMap<String, Option<BTreeMap<String, String>>> = reader
            .state()
            .iter()
            .map(|c| (c.metadata.name.clone().unwrap(), c.data.clone()))
            .collect();
        if want == have {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reflector did not converge:\nwant {want:?}\nhave {have:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    task.abort();
}

#[tokio::test]
async fn a_controller_reconciles_every_object() {
    let server = TestApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    for i in 0..10 {
        api.create(&PostParams::default(), &cm(&format!("r{i}"), &[]))
            .await
            .unwrap();
    }
    struct Ctx {
        api: Api<ConfigMap>,
    }
    async fn reconcile(obj: Arc<ConfigMap>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        if obj.labels().get("reconciled").is_none() {
            ctx.api
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"reconciled": "yes"}}})),
                )
                .await?;
        }
        Ok(Action::await_change())
    }
    fn error_policy(_: Arc<ConfigMap>, _: &kube::Error, _: Arc<Ctx>) -> Action {
        Action::requeue(Duration::from_millis(100))
    }
    use kube::ResourceExt;
    let ctx = Arc::new(Ctx { api: api.clone() });
    let controller = tokio::spawn(
        Controller::new(api.clone(), watcher::Config::default())
            .run(reconcile, error_policy, ctx)
            .for_each(|_| async {}),
    );
    // Objects created after start are reconciled too.
    api.create(&PostParams::default(), &cm("late", &[]))
        .await
        .unwrap();
    let deadline = Instant::now() + T;
    loop {
        let all = api.list(&ListParams::default()).await.unwrap().items;
        // 11 of ours and the root CA ConfigMap every namespace has.
        if all.len() == 12 && all.iter().all(|c| c.labels().get("reconciled").is_some()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "controller did not reconcile everything"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    controller.abort();
}

#[tokio::test]
async fn status_subresource_separates_spec_and_status() {
    let server = TestApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    install_crds(&client).await;
    let devices: Api<Device> = Api::default_namespaced(client.clone());
    let mut d = Device::new(
        "thermo",
        DeviceSpec {
            node_name: Some("edge-1".into()),
            ..Default::default()
        },
    );
    d.status = Some(kedge_common::crd::DeviceInstanceStatus {
        state: Some("ignored-on-create".into()),
        ..Default::default()
    });
    let created = devices.create(&PostParams::default(), &d).await.unwrap();
    assert!(
        created.status.is_none(),
        "status is dropped on create for CRDs with /status"
    );
    assert_eq!(created.metadata.generation, Some(1));

    // A status patch that also tries to change spec: only status changes.
    let after = devices
        .patch_status(
            "thermo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeName": "hijack"}, "status": {"state": "online"}})),
        )
        .await
        .unwrap();
    assert_eq!(after.spec.node_name.as_deref(), Some("edge-1"));
    assert_eq!(after.status.unwrap().state.as_deref(), Some("online"));
    assert_eq!(after.metadata.generation, Some(1));

    // A main-resource patch that tries to change status: only spec changes, generation bumps.
    let after = devices
        .patch(
            "thermo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeName": "edge-2"}, "status": {"state": "offline"}})),
        )
        .await
        .unwrap();
    assert_eq!(after.spec.node_name.as_deref(), Some("edge-2"));
    assert_eq!(after.status.unwrap().state.as_deref(), Some("online"));
    assert_eq!(after.metadata.generation, Some(2));

    // Strategic merge patches are refused for custom resources, as a real server does.
    let e = devices
        .patch(
            "thermo",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_error(e).0, 415);
}

#[tokio::test]
async fn pod_status_strategic_merge_and_graceful_deletion() {
    let server = TestApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::default_namespaced(server.client().unwrap());
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"nodeName": "edge-1", "containers": [{"name": "a", "image": "busybox"}, {"name": "b", "image": "busybox"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    pods.patch_status(
        "web",
        &PatchParams::default(),
        &Patch::Strategic(json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "False"}, {"type": "Initialized", "status": "True"}],
            "containerStatuses": [{"name": "a", "ready": false, "restartCount": 0, "image": "busybox", "imageID": ""}]}})),
    )
    .await
    .unwrap();
    let p = pods
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "b", "ready": true, "restartCount": 0, "image": "busybox", "imageID": ""}]}})),
        )
        .await
        .unwrap();
    let st = p.status.unwrap();
    let conds: BTreeMap<String, String> = st
        .conditions
        .unwrap()
        .into_iter()
        .map(|c| (c.type_, c.status))
        .collect();
    assert_eq!(conds["Ready"], "True");
    assert_eq!(conds["Initialized"], "True");
    assert_eq!(st.container_statuses.unwrap().len(), 2);

    // A bound pod is deleted gracefully: it stays, terminating, until grace period 0.
    pods.delete("web", &DeleteParams::default()).await.unwrap();
    let terminating = pods.get("web").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(30));
    pods.delete("web", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert!(pods.get_opt("web").await.unwrap().is_none());

    // Finalizers hold an object until they are removed.
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client().unwrap());
    let mut c = cm("held", &[]);
    c.metadata.finalizers = Some(vec!["kedge.io/test".into()]);
    cms.create(&PostParams::default(), &c).await.unwrap();
    cms.delete("held", &DeleteParams::default()).await.unwrap();
    assert!(
        cms.get("held")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );
    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(cms.get_opt("held").await.unwrap().is_none());
}

#[tokio::test]
async fn server_side_apply_creates_and_updates() {
    let server = TestApiServer::start().await.unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client().unwrap());
    let pp = PatchParams::apply("kedge-test").force();
    let applied = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"a": "1"}});
    cms.patch("ssa", &pp, &Patch::Apply(&applied))
        .await
        .unwrap();
    let applied = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"b": "2"}});
    let c = cms
        .patch("ssa", &pp, &Patch::Apply(&applied))
        .await
        .unwrap();
    assert_eq!(c.data.unwrap()["b"], "2");
}

/// One raw HTTP/1.1 request; returns status and JSON body.
async fn raw(
    server: &TestApiServer,
    method: &str,
    path: &str,
    ct: &str,
    body: &str,
) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn bad_requests_get_the_real_status_codes_and_bodies() {
    let server = TestApiServer::start().await.unwrap();
    let (code, body) = raw(
        &server,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        "{\"bad json",
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["reason"], "BadRequest");
    assert_eq!(body["code"], 400);

    let pod = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"x"}}"#;
    let (code, body) = raw(
        &server,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        pod,
    )
    .await;
    assert_eq!((code, body["reason"].as_str()), (400, Some("BadRequest")));
    assert!(body["message"].as_str().unwrap().contains("Pod"), "{body}");

    let wrong_version = r#"{"apiVersion":"apps/v1","kind":"ConfigMap","metadata":{"name":"x"}}"#;
    let (code, _) = raw(
        &server,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        wrong_version,
    )
    .await;
    assert_eq!(code, 400);

    let (code, body) = raw(
        &server,
        "GET",
        "/api/v1/namespaces/default/widgets",
        "application/json",
        "",
    )
    .await;
    assert_eq!((code, body["reason"].as_str()), (404, Some("NotFound")));
    assert_eq!(
        body["message"],
        "the server could not find the requested resource"
    );

    let (code, body) = raw(
        &server,
        "GET",
        "/api/v1/namespaces/default/configmaps/missing",
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 404);
    assert_eq!(body["message"], "configmaps \"missing\" not found");
    assert_eq!(body["details"]["name"], "missing");

    let (code, body) = raw(
        &server,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{}}"#,
    )
    .await;
    assert_eq!((code, body["reason"].as_str()), (422, Some("Invalid")));

    let (code, body) = raw(
        &server,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/vnd.kubernetes.protobuf",
        "\u{0}k8s",
    )
    .await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );

    // A CRD whose schema is not structural is refused as a real server would.
    let crd = r#"{"apiVersion":"apiextensions.k8s.io/v1","kind":"CustomResourceDefinition","metadata":{"name":"things.example.com"},
        "spec":{"group":"example.com","scope":"Namespaced","names":{"plural":"things","kind":"Thing"},
        "versions":[{"name":"v1","served":true,"storage":true,"schema":{"openAPIV3Schema":{"type":"object","properties":{"spec":{"properties":{"a":{"type":"string"}}}}}}}]}}"#;
    let (code, body) = raw(
        &server,
        "POST",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        "application/json",
        crd,
    )
    .await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (422, Some("Invalid")),
        "{body}"
    );
}

#[tokio::test]
async fn our_crds_are_accepted_and_serve_their_resources() {
    let server = TestApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    install_crds(&client).await;
    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    let groups: BTreeSet<String> = discovery.groups().map(|g| g.name().to_owned()).collect();
    assert!(groups.contains("devices.kubeedge.io"));
    assert!(groups.contains("reliablesyncs.kubeedge.io"));
    let syncs: Api<kedge_common::crd::ClusterObjectSync> = Api::all(client.clone());
    let obj = kedge_common::crd::ClusterObjectSync::new("edge-1.abc", Default::default());
    syncs.create(&PostParams::default(), &obj).await.unwrap();
    assert_eq!(
        syncs
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
}

#[tokio::test]
async fn fifty_writers_twenty_watchers_every_event_in_order_exactly_once() {
    let server = Arc::new(TestApiServer::start().await.unwrap());
    let client = server.client().unwrap();
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let start_rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();

    let mut watchers = Vec::new();
    for _ in 0..20 {
        let api = api.clone();
        let rv = start_rv.clone();
        watchers.push(tokio::spawn(async move {
            let mut seen: Vec<u64> = Vec::new();
            let mut from = rv;
            let mut stream = api
                .watch(&WatchParams::default(), &from)
                .await
                .unwrap()
                .boxed();
            loop {
                match stream.try_next().await {
                    Ok(Some(
                        WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o),
                    )) => {
                        let rv: u64 = o
                            .metadata
                            .resource_version
                            .clone()
                            .unwrap()
                            .parse()
                            .unwrap();
                        if o.metadata.name.as_deref() == Some("stop") {
                            return seen;
                        }
                        from = rv.to_string();
                        seen.push(rv);
                    }
                    Ok(Some(_)) => {}
                    // The stream ended (timeout): resume from the last version seen.
                    Ok(None) | Err(_) => {
                        stream = api
                            .watch(&WatchParams::default(), &from)
                            .await
                            .unwrap()
                            .boxed();
                    }
                }
            }
        }));
    }
    let stop_at = Instant::now() + Duration::from_secs(10);
    let mut writers = Vec::new();
    for w in 0..50 {
        let api = api.clone();
        writers.push(tokio::spawn(async move {
            let mut rvs = Vec::new();
            let name = format!("w{w}");
            let c = api
                .create(&PostParams::default(), &cm(&name, &[]))
                .await
                .unwrap();
            rvs.push(c.metadata.resource_version.unwrap().parse::<u64>().unwrap());
            let mut i = 0u64;
            while Instant::now() < stop_at {
                i += 1;
                let c = api
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"data": {"i": i.to_string()}})),
                    )
                    .await
                    .unwrap();
                rvs.push(c.metadata.resource_version.unwrap().parse::<u64>().unwrap());
            }
            rvs
        }));
    }
    let mut all: Vec<u64> = Vec::new();
    for w in writers {
        all.extend(w.await.unwrap());
    }
    all.sort_unstable();
    api.create(&PostParams::default(), &cm("stop", &[]))
        .await
        .unwrap();
    assert!(all.len() > 500, "only {} writes", all.len());
    for w in watchers {
        let seen = tokio::time::timeout(T, w).await.unwrap().unwrap();
        assert_eq!(
            seen.len(),
            all.len(),
            "a watcher missed or duplicated events"
        );
        assert_eq!(seen, all, "a watcher saw events out of order");
    }
}

#[tokio::test]
async fn cloudcore_keeps_its_pki_in_secrets_and_replicas_agree() {
    let server = TestApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    server.create_namespace("kubeedge").await.unwrap();
    let sans = vec!["127.0.0.1".to_owned()];
    use cloudcore::cloudhub::certs::load_or_create_in_secrets;
    // Two "replicas" starting at once agree on one CA.
    let (a, b) = tokio::join!(
        load_or_create_in_secrets(client.clone(), "kubeedge", &sans),
        load_or_create_in_secrets(client.clone(), "kubeedge", &sans)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.ca.cert_hash(), b.ca.cert_hash());
    assert_eq!(a.token_secret(), b.token_secret());
    // A restart reuses it; a token from one verifies with the other.
    let c = load_or_create_in_secrets(client.clone(), "kubeedge", &sans)
        .await
        .unwrap();
    assert_eq!(c.ca.cert_hash(), a.ca.cert_hash());
    assert_eq!(c.server.cert_der, a.server.cert_der);
    let t = kedge_common::pki::JoinToken::parse(&a.issue_token(Duration::from_secs(60))).unwrap();
    kedge_common::pki::verify_jwt(&t.jwt, c.token_secret()).unwrap();
    // New SANs re-issue the server certificate under the same CA.
    let d = load_or_create_in_secrets(client.clone(), "kubeedge", &["10.1.2.3".to_owned()])
        .await
        .unwrap();
    assert_eq!(d.ca.cert_hash(), a.ca.cert_hash());
    assert_ne!(d.server.cert_der, a.server.cert_der);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, "kubeedge");
    assert_eq!(
        secrets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        2
    );
}

/// Service accounts behave as in a cluster: default account and root CA per namespace, the
/// kube-api-access volume and default tolerations on admitted pods, TokenRequest bound to a pod.
#[tokio::test]
async fn service_accounts_tokens_and_pod_admission_match_a_cluster() {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    let server = TestApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    server.create_namespace("apps").await.unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "apps");
    sas.get("default").await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "apps");
    let root = cms.get("kube-root-ca.crt").await.unwrap();
    assert_eq!(root.data.unwrap()["ca.crt"], server.root_ca_pem());

    let pods: Api<Pod> = Api::namespaced(client.clone(), "apps");
    let pod = |name: &str, extra: Value| -> Pod {
        let mut v = json!({"metadata": {"name": name}, "spec": {"nodeName": "edge-1",
            "initContainers": [{"name": "i", "image": "busybox"}],
            "containers": [{"name": "c", "image": "busybox"}]}});
        if let (Some(spec), Some(extra)) = (v["spec"].as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        serde_json::from_value(v).unwrap()
    };
    let web = pods
        .create(&PostParams::default(), &pod("web", json!({})))
        .await
        .unwrap();
    let spec = web.spec.clone().unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("default"));
    let vols = spec.volumes.unwrap();
    assert_eq!(vols.len(), 1);
    let vol = &vols[0];
    assert!(vol.name.starts_with("kube-api-access-") && vol.name.len() == 21);
    let sources = vol.projected.as_ref().unwrap().sources.as_ref().unwrap();
    assert_eq!(
        sources[0]
            .service_account_token
            .as_ref()
            .unwrap()
            .expiration_seconds,
        Some(3607)
    );
    assert_eq!(
        sources[1].config_map.as_ref().unwrap().name,
        "kube-root-ca.crt"
    );
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let m = &c.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(m.name, vol.name);
        assert_eq!(
            m.mount_path,
            "/var/run/secrets/kubernetes.io/serviceaccount"
        );
        assert_eq!(m.read_only, Some(true));
    }
    let tolerations = spec.tolerations.unwrap();
    assert_eq!(tolerations.len(), 2);
    assert!(
        tolerations
            .iter()
            .all(|t| t.toleration_seconds == Some(300) && t.effect.as_deref() == Some("NoExecute"))
    );

    // Opting out, and a service account that does not exist.
    let plain = pods
        .create(
            &PostParams::default(),
            &pod("plain", json!({"automountServiceAccountToken": false})),
        )
        .await
        .unwrap();
    assert!(plain.spec.unwrap().volumes.unwrap_or_default().is_empty());
    let e = pods
        .create(
            &PostParams::default(),
            &pod("ghost", json!({"serviceAccountName": "ghost"})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_error(e), (403, "Forbidden".into()));

    // TokenRequest bound to the pod: signed, with its claims; a stale UID is refused.
    let uid = web.metadata.uid.clone().unwrap();
    let request = |uid: &str, seconds: i64| -> TokenRequest {
        serde_json::from_value(
            json!({"spec": {"audiences": [], "expirationSeconds": seconds,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web", "uid": uid}}}),
        )
        .unwrap()
    };
    let issued = sas
        .create_token_request("default", &PostParams::default(), &request(&uid, 3607))
        .await
        .unwrap();
    let status = issued.status.unwrap();
    let claims = server.verify_token(&status.token).unwrap();
    assert_eq!(claims["sub"], "system:serviceaccount:apps:default");
    assert_eq!(claims["kubernetes.io"]["pod"]["uid"], uid.as_str());
    assert_eq!(claims["kubernetes.io"]["node"]["name"], "edge-1");
    assert_eq!(
        claims["aud"],
        json!(["https://kubernetes.default.svc.cluster.local"])
    );
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        3607
    );
    assert!(
        server
            .verify_token(&status.token.replace('.', "x."))
            .is_err()
    );
    let e = sas
        .create_token_request("default", &PostParams::default(), &request("other", 3607))
        .await
        .unwrap_err();
    assert_eq!(api_error(e).0, 409);
    let e = sas
        .create_token_request("default", &PostParams::default(), &request(&uid, 60))
        .await
        .unwrap_err();
    assert_eq!(api_error(e).0, 422);
}

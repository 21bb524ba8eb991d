//! edged end to end with the shipped binaries: cloudcore against the test API server, edgecore
//! with a private containerd. A pod created in the API runs on the edge and shows `Running` with
//! its pod IP in the API; deleting it stops the container, removes the sandbox, and the pod object
//! goes away only after that.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use edgecore::edged::runtime::{CriRuntime, Runtime};
use k8s_openapi::api::core::v1::Pod;
use kedge_e2e::edgerig::{Rig, eventually};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_created_in_the_api_runs_on_the_edge_and_is_deleted_cleanly() {
    let Rig {
        ctr,
        client,
        setup,
        cloud,
        edge,
        nodes,
        _server,
        _dir,
    } = Rig::start("edge-run").await;
    let _cloud = cloud;
    let _edge = edge;

    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let created = Instant::now();
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "hello"},
            "spec": {"nodeName": "edge-run", "terminationGracePeriodSeconds": 5,
                "hostAliases": [{"ip": "192.168.1.20", "hostnames": ["plc", "plc.local"]}],
                "containers": [{"name": "main", "image": ctr.busybox_image,
                    "command": ["sh", "-c", "exec sleep 3600"]}]}
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    eventually(
        "pod Running with a pod IP in the API",
        &setup,
        &ctr,
        || async {
            let p = pods.get("hello").await.unwrap();
            p.status.is_some_and(|s| {
                s.phase.as_deref() == Some("Running")
                    && s.pod_ip
                        .as_deref()
                        .is_some_and(|ip| ip.starts_with("10.233."))
                    && s.container_statuses
                        .as_ref()
                        .is_some_and(|c| c[0].ready && c[0].container_id.is_some())
            })
        },
    )
    .await;
    println!(
        "pod Running in the API {:?} after creation",
        created.elapsed()
    );
    eventually("the Node Ready with its nodeInfo", &setup, &ctr, || async {
        let status = nodes
            .get("edge-run")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        let ready = status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready && status.node_info.is_some()
    })
    .await;
    // Capacity includes the root directory's filesystem, read for real.
    let capacity = nodes
        .get("edge-run")
        .await
        .unwrap()
        .status
        .unwrap()
        .capacity
        .unwrap_or_default();
    assert!(
        capacity
            .get("ephemeral-storage")
            .is_some_and(|q| q.0.ends_with("Ki") && q.0 != "0Ki"),
        "{capacity:?}"
    );
    let info = nodes
        .get("edge-run")
        .await
        .unwrap()
        .status
        .unwrap()
        .node_info
        .unwrap();
    assert!(
        info.container_runtime_version.starts_with("containerd://"),
        "{info:?}"
    );
    assert!(info.kubelet_version.starts_with("kedge-v"));
    // The node's own labels: its architecture and OS, and what its config asks for.
    let labels = nodes
        .get("edge-run")
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap_or_default();
    assert_eq!(
        labels
            .get(kedge_e2e::edgerig::RIG_LABEL.0)
            .map(String::as_str),
        Some(kedge_e2e::edgerig::RIG_LABEL.1),
        "{labels:?}"
    );
    assert_eq!(
        labels.get("kubernetes.io/os").map(String::as_str),
        Some("linux")
    );

    let rt = CriRuntime::connect(&ctr.socket).await.unwrap();
    assert_eq!(rt.list_pod_sandboxes(None).await.unwrap().len(), 1);
    // The pod's /etc/hosts: itself by its IP, and its hostAliases.
    let status = pods.get("hello").await.unwrap().status.unwrap();
    let pod_ip = status.pod_ip.unwrap();
    let id = status.container_statuses.unwrap()[0]
        .container_id
        .clone()
        .unwrap()
        .trim_start_matches("containerd://")
        .to_owned();
    let hosts = rt
        .exec_sync(&id, vec!["cat".into(), "/etc/hosts".into()], 10)
        .await
        .unwrap();
    let hosts = String::from_utf8_lossy(&hosts.stdout).into_owned();
    assert!(hosts.contains(&format!("{pod_ip}\thello\n")), "{hosts}");
    assert!(hosts.contains("192.168.1.20\tplc\tplc.local\n"), "{hosts}");
    pods.delete("hello", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "pod object gone after its containers stopped",
        &setup,
        &ctr,
        || async { pods.get_opt("hello").await.unwrap().is_none() },
    )
    .await;
    assert!(
        rt.list_pod_sandboxes(None).await.unwrap().is_empty(),
        "the sandbox is removed before the object is deleted"
    );
}

/// Autonomy across edgecore restarts (SIGKILL, five pods): running containers are adopted, never
/// restarted, also with the cloud unreachable; a pod deleted while edgecore was down is cleaned up when it comes
/// back; a container removed behind edged's back is created again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edgecore_restarts_adopt_running_containers_and_clean_up() {
    use edgecore::edged::runtime::api;
    let Rig {
        ctr,
        client,
        setup,
        cloud,
        edge,
        nodes: _,
        _server,
        _dir,
    } = Rig::start("edge-adopt").await;
    let mut cloud = cloud;
    let mut edge = edge;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
    for name in NAMES {
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"nodeName": "edge-adopt", "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "main", "image": ctr.busybox_image,
                        "command": ["sh", "-c", "exec sleep 3600"]}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    }
    eventually("five pods Running", &setup, &ctr, || async {
        let mut running = 0;
        for n in NAMES {
            if pods
                .get(n)
                .await
                .unwrap()
                .status
                .and_then(|s| s.phase)
                .as_deref()
                == Some("Running")
            {
                running += 1;
            }
        }
        running == 5
    })
    .await;
    let rt = CriRuntime::connect(&ctr.socket).await.unwrap();
    let container_of = |pod: &'static str| {
        let rt = rt.clone();
        async move {
            rt.list_containers(None)
                .await
                .unwrap()
                .into_iter()
                .filter(|c| c.labels.get("io.kubernetes.pod.name").map(String::as_str) == Some(pod))
                .map(|c| (c.id, c.state, c.metadata.unwrap().attempt))
                .collect::<Vec<_>>()
        }
    };
    let mut before = Vec::new();
    for n in ["a", "d", "e"] {
        let c = container_of(n).await;
        assert_eq!(c.len(), 1);
        before.push(c);
    }

    // 1. edgecore down while pod c is deleted in the cluster; back with the cloud up.
    edge.kill();
    pods.delete("c", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    edge.start().unwrap();
    eventually(
        "pod c's containers and sandbox removed",
        &setup,
        &ctr,
        || async {
            container_of("c").await.is_empty()
                && rt.list_pod_sandboxes(None).await.unwrap().len() == 4
        },
    )
    .await;

    // 2. Both down; b's container removed behind edged's back; edgecore back without the cloud.
    edge.kill();
    cloud.kill();
    let (b_id, _, _) = container_of("b").await[0].clone();
    rt.stop_container(&b_id, 0).await.unwrap();
    rt.remove_container(&b_id).await.unwrap();
    edge.start().unwrap();
    eventually("b's container created again", &setup, &ctr, || async {
        container_of("b")
            .await
            .iter()
            .any(|(_, state, _)| *state == api::ContainerState::ContainerRunning as i32)
    })
    .await;
    // a, d and e were adopted: the same containers, still running, never restarted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (n, before) in ["a", "d", "e"].into_iter().zip(before) {
        let after = container_of(n).await;
        assert_eq!(
            after, before,
            "{n}'s container is the same one, still attempt 0"
        );
        assert_eq!(after[0].1, api::ContainerState::ContainerRunning as i32);
    }
}

/// A ConfigMap volume, a Secret volume and a Secret env var reach the running container; an
/// update of the ConfigMap in the API is seen inside the container within 2 s, without a restart.
/// An init container runs first, and the service account token the API server's admission
/// projects is fetched through cloudcore and verifies against the API server's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_and_secret_volumes_reach_the_container_and_update_in_place() {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use kube::api::{Patch, PatchParams};
    let Rig {
        ctr,
        client,
        setup,
        cloud,
        edge,
        nodes: _,
        _server: server,
        _dir,
    } = Rig::start("edge-vol").await;
    let _cloud = cloud;
    let _edge = edge;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "app-config"}, "data": {"greeting": "hello"}}),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "app-secret"}, "stringData": {"password": "s3cr3t"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "vols"},
            "spec": {"nodeName": "edge-vol",
                "initContainers": [{"name": "init", "image": ctr.busybox_image,
                    "command": ["sh", "-c", "echo initialized > /scratch/init-done"],
                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
                "containers": [{"name": "main", "image": ctr.busybox_image,
                    "command": ["sh", "-c", "exec sleep 3600"],
                    "env": [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "app-secret", "key": "password"}}}],
                    "volumeMounts": [{"name": "config", "mountPath": "/etc/app"},
                                     {"name": "secret", "mountPath": "/etc/secret"},
                                     {"name": "scratch", "mountPath": "/scratch"}]}],
                "volumes": [{"name": "config", "configMap": {"name": "app-config"}},
                            {"name": "secret", "secret": {"secretName": "app-secret", "defaultMode": 256}},
                            {"name": "scratch", "emptyDir": {}}]}
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    eventually("pod Running", &setup, &ctr, || async {
        pods.get("vols")
            .await
            .unwrap()
            .status
            .and_then(|s| s.phase)
            .as_deref()
            == Some("Running")
    })
    .await;
    let rt = CriRuntime::connect(&ctr.socket).await.unwrap();
    let main_id = || {
        let rt = rt.clone();
        async move {
            rt.list_containers(None)
                .await
                .unwrap()
                .into_iter()
                .find(|c| c.metadata.as_ref().is_some_and(|m| m.name == "main"))
                .unwrap()
                .id
        }
    };
    let id = main_id().await;
    let exec = |cmd: &'static [&'static str]| {
        let (rt, id) = (rt.clone(), id.clone());
        async move {
            let r = rt
                .exec_sync(&id, cmd.iter().map(|s| s.to_string()).collect(), 5)
                .await
                .unwrap();
            String::from_utf8_lossy(&r.stdout).into_owned()
        }
    };
    assert_eq!(exec(&["cat", "/etc/app/greeting"]).await, "hello");
    assert_eq!(exec(&["cat", "/etc/secret/password"]).await, "s3cr3t");
    assert!(exec(&["env"]).await.contains("PASSWORD=s3cr3t\n"));
    assert_eq!(
        exec(&["sh", "-c", "echo ok > /scratch/f && cat /scratch/f"]).await,
        "ok\n"
    );
    // The init container ran first, in the same emptyDir.
    assert_eq!(exec(&["cat", "/scratch/init-done"]).await, "initialized\n");
    // The kube-api-access volume the API server added: a token the API server signed, bound to
    // this pod and node, the cluster's root CA and the namespace.
    let token = exec(&["cat", "/var/run/secrets/kubernetes.io/serviceaccount/token"]).await;
    let claims = server.verify_token(&token).unwrap();
    let pod_uid = pods.get("vols").await.unwrap().metadata.uid.unwrap();
    assert_eq!(claims["kubernetes.io"]["pod"]["uid"], pod_uid.as_str());
    assert_eq!(claims["kubernetes.io"]["node"]["name"], "edge-vol");
    assert_eq!(claims["sub"], "system:serviceaccount:default:default");
    assert_eq!(
        exec(&[
            "cat",
            "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
        ])
        .await,
        server.root_ca_pem()
    );
    assert_eq!(
        exec(&[
            "cat",
            "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        ])
        .await,
        "default"
    );
    // Read-only: the container cannot change its ConfigMap.
    assert_eq!(
        exec(&[
            "sh",
            "-c",
            "echo x > /etc/app/greeting 2>/dev/null || echo ro"
        ])
        .await,
        "ro\n"
    );

    let t = Instant::now();
    cms.patch(
        "app-config",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"greeting": "updated"}})),
    )
    .await
    .unwrap();
    loop {
        if exec(&["cat", "/etc/app/greeting"]).await == "updated" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "ConfigMap update not seen within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "ConfigMap change seen inside the container after {:?}",
        t.elapsed()
    );
    assert_eq!(main_id().await, id, "updated in place, not restarted");
}

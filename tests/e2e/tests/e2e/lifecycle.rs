//! Container lifecycle on the edge with the shipped binaries and real containerd: restart
//! policies and CrashLoopBackOff, probes (exec, HTTP, TCP) and hooks, graceful deletion with a
//! preStop hook and the grace period.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use edgecore::edged::runtime::{CriRuntime, Runtime};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kedge_e2e::edgerig::{Rig, eventually};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

async fn create(pods: &Api<Pod>, v: Value) {
    pods.create(&PostParams::default(), &serde_json::from_value(v).unwrap())
        .await
        .unwrap();
}

async fn container_status(pods: &Api<Pod>, pod: &str, container: &str) -> Option<ContainerStatus> {
    pods.get(pod)
        .await
        .unwrap()
        .status?
        .container_statuses?
        .into_iter()
        .find(|c| c.name == container)
}

async fn phase(pods: &Api<Pod>, pod: &str) -> Option<String> {
    pods.get(pod).await.unwrap().status?.phase
}

fn condition(pod: &Pod, type_: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

/// `Always` restarts an exiting container with back-off (CrashLoopBackOff, restartCount grows);
/// `Never` and `OnFailure` end in Succeeded or Failed as the exit code says, and `OnFailure`
/// restarts a failing one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policies_and_crash_loop_back_off() {
    let rig = Rig::start("edge-restart").await;
    let (ctr, setup) = (&rig.ctr, &rig.setup);
    let pods: Api<Pod> = Api::default_namespaced(rig.client.clone());
    let pod = |name: &str, policy: &str, script: &str| {
        json!({"metadata": {"name": name},
            "spec": {"nodeName": "edge-restart", "restartPolicy": policy, "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "main", "image": ctr.busybox_image, "command": ["sh", "-c", script]}]}})
    };
    create(&pods, pod("crash", "Always", "sleep 1; exit 1")).await;
    create(&pods, pod("never-ok", "Never", "exit 0")).await;
    create(
        &pods,
        pod(
            "never-fail",
            "Never",
            "echo custom > /dev/termination-log; exit 3",
        ),
    )
    .await;
    let mut fallback = pod("fallback", "Never", "echo from-the-log; exit 4");
    fallback["spec"]["containers"][0]["terminationMessagePolicy"] = json!("FallbackToLogsOnError");
    create(&pods, fallback).await;
    create(&pods, pod("onfailure-ok", "OnFailure", "exit 0")).await;
    create(&pods, pod("onfailure-fail", "OnFailure", "sleep 1; exit 2")).await;

    eventually(
        "Never/OnFailure pods end as their exit codes say",
        setup,
        ctr,
        || async {
            phase(&pods, "never-ok").await.as_deref() == Some("Succeeded")
                && phase(&pods, "never-fail").await.as_deref() == Some("Failed")
                && phase(&pods, "onfailure-ok").await.as_deref() == Some("Succeeded")
        },
    )
    .await;
    let failed = container_status(&pods, "never-fail", "main").await.unwrap();
    let terminated = failed.state.unwrap().terminated.unwrap();
    assert_eq!((terminated.exit_code, failed.restart_count), (3, 0));
    assert_eq!(
        terminated.message.as_deref(),
        Some("custom\n"),
        "the termination message file"
    );
    eventually("the log tail as the message", setup, ctr, || async {
        let c = container_status(&pods, "fallback", "main").await;
        c.and_then(|c| c.state?.terminated?.message).as_deref() == Some("from-the-log")
    })
    .await;

    // The first exit restarts at once; the second waits 10 s: CrashLoopBackOff.
    eventually(
        "crash-looping container in CrashLoopBackOff",
        setup,
        ctr,
        || async {
            container_status(&pods, "crash", "main")
                .await
                .is_some_and(|c| {
                    c.restart_count >= 1
                        && c.state
                            .and_then(|s| s.waiting)
                            .and_then(|w| w.reason)
                            .as_deref()
                            == Some("CrashLoopBackOff")
                        && c.last_state
                            .and_then(|s| s.terminated)
                            .is_some_and(|t| t.exit_code == 1)
                })
        },
    )
    .await;
    let t = Instant::now();
    eventually("restarted again after the back-off", setup, ctr, || async {
        container_status(&pods, "crash", "main")
            .await
            .is_some_and(|c| c.restart_count >= 2)
    })
    .await;
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(5),
        "the second restart waited for the back-off ({waited:?})"
    );
    assert_eq!(phase(&pods, "crash").await.as_deref(), Some("Running"));
    eventually(
        "OnFailure restarts a failing container",
        setup,
        ctr,
        || async {
            container_status(&pods, "onfailure-fail", "main")
                .await
                .is_some_and(|c| c.restart_count >= 1)
        },
    )
    .await;
    // Exited containers do not pile up: at most the current and the last attempt are kept.
    let rt = CriRuntime::connect(&ctr.socket).await.unwrap();
    let crash: Vec<_> = rt
        .list_containers(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.labels.get("io.kubernetes.pod.name").map(String::as_str) == Some("crash"))
        .collect();
    assert!(crash.len() <= 2, "{} containers kept", crash.len());
}

/// Readiness (exec and HTTP) drives Ready both ways; a liveness failure restarts the container;
/// a TCP liveness probe keeps a healthy server alive; the postStart hook runs in the container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_drive_ready_and_restarts_and_hooks_run() {
    let rig = Rig::start("edge-probe").await;
    let (ctr, setup) = (&rig.ctr, &rig.setup);
    let pods: Api<Pod> = Api::default_namespaced(rig.client.clone());
    let exec_probe = |file: &str| json!({"exec": {"command": ["cat", file]}, "periodSeconds": 1, "failureThreshold": 2});
    create(
        &pods,
        json!({"metadata": {"name": "probed"},
            "spec": {"nodeName": "edge-probe", "terminationGracePeriodSeconds": 1,
                "containers": [
                    {"name": "app", "image": ctr.busybox_image,
                     "command": ["sh", "-c", "touch /tmp/alive /tmp/ready; exec sleep 3600"],
                     "lifecycle": {"postStart": {"exec": {"command": ["sh", "-c", "echo hooked > /tmp/post-start"]}}},
                     "readinessProbe": exec_probe("/tmp/ready"),
                     "livenessProbe": exec_probe("/tmp/alive")},
                    {"name": "web", "image": ctr.busybox_image,
                     "command": ["sh", "-c", "mkdir -p /www && echo ok > /www/healthz && exec httpd -f -p 8080 -h /www"],
                     "ports": [{"name": "http", "containerPort": 8080}],
                     "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1},
                     "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}
                ]}}),
    )
    .await;
    let ready = || async { condition(&pods.get("probed").await.unwrap(), "Ready") };
    eventually(
        "pod Ready (exec and HTTP readiness)",
        setup,
        ctr,
        || async { ready().await.as_deref() == Some("True") },
    )
    .await;
    let rt = CriRuntime::connect(&ctr.socket).await.unwrap();
    let id_of = |name: &'static str| {
        let rt = rt.clone();
        async move {
            rt.list_containers(None)
                .await
                .unwrap()
                .into_iter()
                .filter(|c| c.metadata.as_ref().is_some_and(|m| m.name == name))
                .max_by_key(|c| c.metadata.as_ref().map_or(0, |m| m.attempt))
                .map(|c| c.id)
                .unwrap()
        }
    };
    let exec = |id: String, script: &'static str| {
        let rt = rt.clone();
        async move {
            let r = rt
                .exec_sync(&id, vec!["sh".into(), "-c".into(), script.into()], 5)
                .await
                .unwrap();
            String::from_utf8_lossy(&r.stdout).into_owned()
        }
    };
    let app = id_of("app").await;
    assert_eq!(exec(app.clone(), "cat /tmp/post-start").await, "hooked\n");

    // Readiness toggles Ready off and on, without a restart.
    exec(app.clone(), "rm /tmp/ready").await;
    eventually("Ready False after readiness fails", setup, ctr, || async {
        ready().await.as_deref() == Some("False")
    })
    .await;
    let status = container_status(&pods, "probed", "app").await.unwrap();
    assert!(!status.ready && status.restart_count == 0);
    exec(app.clone(), "touch /tmp/ready").await;
    eventually("Ready True again", setup, ctr, || async {
        ready().await.as_deref() == Some("True")
    })
    .await;

    // Liveness fails: the container is killed and started again (a new container).
    exec(app.clone(), "rm /tmp/alive").await;
    eventually(
        "restarted after the liveness failure",
        setup,
        ctr,
        || async {
            container_status(&pods, "probed", "app")
                .await
                .is_some_and(|c| c.restart_count == 1 && c.ready)
        },
    )
    .await;
    assert_ne!(id_of("app").await, app, "a new container");
    let web = container_status(&pods, "probed", "web").await.unwrap();
    assert!(
        web.ready && web.restart_count == 0,
        "the HTTP server stayed healthy: {web:?}"
    );
}

/// Deletion honours the grace period: the preStop hook runs, the container that ignores SIGTERM
/// is killed after the grace period, and the pod object goes away only once its containers and
/// sandbox are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_deletion_runs_pre_stop_and_honours_the_grace_period() {
    let rig = Rig::start("edge-grace").await;
    let (ctr, setup) = (&rig.ctr, &rig.setup);
    let pods: Api<Pod> = Api::default_namespaced(rig.client.clone());
    let host_dir = tempfile::tempdir().unwrap();
    create(
        &pods,
        json!({"metadata": {"name": "graceful"},
            "spec": {"nodeName": "edge-grace", "terminationGracePeriodSeconds": 3,
                "volumes": [{"name": "out", "hostPath": {"path": host_dir.path(), "type": "Directory"}}],
                "containers": [{"name": "main", "image": ctr.busybox_image,
                    // PID 1 without a TERM handler: SIGTERM does nothing, SIGKILL ends it.
                    "command": ["sh", "-c", "exec sleep 3600"],
                    "volumeMounts": [{"name": "out", "mountPath": "/out"}],
                    "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "echo stopping > /out/pre-stop"]}}}}]}}),
    )
    .await;
    eventually("pod Running", setup, ctr, || async {
        phase(&pods, "graceful").await.as_deref() == Some("Running")
    })
    .await;
    let rt = CriRuntime::connect(&ctr.socket).await.unwrap();
    let t = Instant::now();
    pods.delete("graceful", &DeleteParams::default())
        .await
        .unwrap();
    eventually("pod object gone", setup, ctr, || async {
        pods.get_opt("graceful").await.unwrap().is_none()
    })
    .await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "the container got its 3 s grace period ({took:?})"
    );
    assert!(
        took < Duration::from_secs(15),
        "and not much more ({took:?})"
    );
    assert!(
        rt.list_pod_sandboxes(None).await.unwrap().is_empty()
            && rt.list_containers(None).await.unwrap().is_empty(),
        "sandbox and containers are gone before the object is deleted"
    );
    assert_eq!(
        std::fs::read_to_string(host_dir.path().join("pre-stop")).unwrap(),
        "stopping\n"
    );
}

/// Pulls through CRI from a real registry with basic auth: the pod's imagePullSecrets
/// credentials work; wrong credentials, no credentials and a missing image end in
/// ErrImagePull/ImagePullBackOff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_pulled_with_image_pull_secrets_from_a_real_registry() {
    use base64::Engine;
    use k8s_openapi::api::core::v1::Secret;
    let rig = Rig::start("edge-pull").await;
    let (ctr, setup) = (&rig.ctr, &rig.setup);
    let registry = kedge_e2e::registry::TestRegistry::start("puller", "s3cret").unwrap();
    let archive = ctr.dir().join("images/busybox.tar");
    let good = registry.push(&archive, "kedge/busybox:good").unwrap();
    let other = registry.push(&archive, "kedge/busybox:other").unwrap();
    let missing = format!("{}/kedge/nothere:1", registry.addr);
    let secrets: Api<Secret> = Api::default_namespaced(rig.client.clone());
    for (name, password) in [("regcred", "s3cret"), ("wrongcred", "guess")] {
        let config =
            json!({"auths": {registry.addr.clone(): {"username": "puller", "password": password}}});
        let data = base64::engine::general_purpose::STANDARD.encode(config.to_string());
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name},
                    "type": "kubernetes.io/dockerconfigjson",
                    "data": {".dockerconfigjson": data}}))
                .unwrap(),
            )
            .await
            .unwrap();
    }
    let pods: Api<Pod> = Api::default_namespaced(rig.client.clone());
    let pod = |name: &str, image: &str, secret: Option<&str>| {
        let secrets: Vec<Value> = secret.map(|s| json!({"name": s})).into_iter().collect();
        json!({"metadata": {"name": name},
            "spec": {"nodeName": "edge-pull", "terminationGracePeriodSeconds": 1, "imagePullSecrets": secrets,
                "containers": [{"name": "main", "image": image, "imagePullPolicy": "Always",
                    "command": ["sh", "-c", "exec sleep 3600"]}]}})
    };
    create(&pods, pod("pull-good", &good, Some("regcred"))).await;
    create(&pods, pod("pull-wrong", &other, Some("wrongcred"))).await;
    create(&pods, pod("pull-anonymous", &other, None)).await;
    create(&pods, pod("pull-missing", &missing, Some("regcred"))).await;
    eventually(
        "pod with the right credentials Running",
        setup,
        ctr,
        || async { phase(&pods, "pull-good").await.as_deref() == Some("Running") },
    )
    .await;
    let status = container_status(&pods, "pull-good", "main").await.unwrap();
    assert_eq!(status.image, good);
    assert!(
        status.image_id.starts_with("sha256:") || status.image_id.contains("@sha256:"),
        "{status:?}"
    );
    for name in ["pull-wrong", "pull-anonymous", "pull-missing"] {
        eventually(&format!("{name} fails to pull"), setup, ctr, || async {
            container_status(&pods, name, "main")
                .await
                .is_some_and(|c| {
                    let reason = c.state.and_then(|s| s.waiting).and_then(|w| w.reason);
                    matches!(reason.as_deref(), Some("ErrImagePull" | "ImagePullBackOff"))
                })
        })
        .await;
    }
    assert_eq!(phase(&pods, "pull-wrong").await.as_deref(), Some("Pending"));
    let log = registry.log();
    assert!(!log.contains("panic"), "{log}");
}

//! edged's runtime boundary against a real containerd (Debian's, with runc and CNI): sandboxes
//! with the host network and with a pod network (an IP from the bridge's subnet), a busybox
//! container with env and a command, exec into it, stop and remove — all through
//! `edgecore::edged::runtime::CriRuntime`.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use edgecore::edged::runtime::{CriRuntime, Runtime, RuntimeError, api};
use kedge_e2e::containerd::TestContainerd;

fn sandbox_config(ctr: &TestContainerd, uid: &str, host_network: bool) -> api::PodSandboxConfig {
    let logs = ctr.dir().join("pods").join(uid);
    std::fs::create_dir_all(&logs).unwrap();
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: format!("pod-{uid}"),
            uid: uid.into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        // runc refuses a hostname without a private UTS namespace (host network).
        hostname: if host_network {
            String::new()
        } else {
            format!("pod-{uid}")
        },
        log_directory: logs.display().to_string(),
        labels: HashMap::from([("io.kubernetes.pod.uid".into(), uid.into())]),
        linux: Some(api::LinuxPodSandboxConfig {
            cgroup_parent: format!("{}/pod{uid}", ctr.cgroup_parent),
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    network: if host_network {
                        api::NamespaceMode::Node as i32
                    } else {
                        api::NamespaceMode::Pod as i32
                    },
                    pid: api::NamespaceMode::Container as i32,
                    ipc: api::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config(ctr: &TestContainerd, script: &str) -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: "main".into(),
            attempt: 0,
        }),
        image: Some(api::ImageSpec {
            image: ctr.busybox_image.clone(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        envs: vec![api::KeyValue {
            key: "GREETING".into(),
            value: "hello from kedge".into(),
        }],
        log_path: "main/0.log".into(),
        labels: HashMap::from([("io.kubernetes.container.name".into(), "main".into())]),
        ..Default::default()
    }
}

async fn exec_until(rt: &CriRuntime, id: &str, cmd: &[&str], want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = rt
            .exec_sync(id, cmd.iter().map(|s| s.to_string()).collect(), 5)
            .await
            .unwrap();
        let out = String::from_utf8_lossy(&r.stdout).into_owned();
        if out.contains(want) || Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run_one(rt: &CriRuntime, ctr: &TestContainerd, uid: &str, host_network: bool) {
    let sb_config = sandbox_config(ctr, uid, host_network);
    let sb = rt
        .run_pod_sandbox(sb_config.clone())
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctr.log()));
    let status = rt.pod_sandbox_status(&sb).await.unwrap();
    assert_eq!(status.state, api::PodSandboxState::SandboxReady as i32);
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    if host_network {
        assert!(
            ip.is_empty() || !ip.starts_with("10.233."),
            "host network got pod IP {ip}"
        );
    } else {
        assert!(
            ip.starts_with("10.233."),
            "pod IP {ip:?} is not from the bridge's subnet"
        );
    }

    let c = rt
        .create_container(
            &sb,
            container_config(ctr, "echo \"$GREETING\" > /tmp/greeting; exec sleep 3600"),
            sb_config,
        )
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", ctr.log()));
    rt.start_container(&c).await.unwrap();
    let st = rt.container_status(&c).await.unwrap();
    assert_eq!(st.state, api::ContainerState::ContainerRunning as i32);
    let out = exec_until(rt, &c, &["cat", "/tmp/greeting"], "hello").await;
    assert_eq!(out, "hello from kedge\n");
    if !host_network {
        let hostname = exec_until(rt, &c, &["hostname"], uid).await;
        assert_eq!(hostname.trim(), format!("pod-{uid}"));
    }
    // Found again by label, as edged finds its own containers after a restart.
    let mine = rt
        .list_containers(Some(api::ContainerFilter {
            pod_sandbox_id: sb.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].labels["io.kubernetes.container.name"], "main");

    let t = Instant::now();
    rt.stop_container(&c, 1).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    let st = rt.container_status(&c).await.unwrap();
    assert_eq!(st.state, api::ContainerState::ContainerExited as i32);
    rt.remove_container(&c).await.unwrap();
    assert!(rt.container_status(&c).await.unwrap_err().is_not_found());
    rt.stop_pod_sandbox(&sb).await.unwrap();
    rt.remove_pod_sandbox(&sb).await.unwrap();
    assert!(
        rt.list_pod_sandboxes(None)
            .await
            .unwrap()
            .iter()
            .all(|s| s.id != sb)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_and_containers_run_on_real_containerd_through_the_runtime_trait() {
    let ctr = TestContainerd::start().unwrap();
    let rt = CriRuntime::connect(&ctr.socket).await.unwrap();
    let v = rt.version().await.unwrap();
    assert_eq!(v.runtime_name, "containerd");
    assert!(rt.image_status(&ctr.busybox_image).await.unwrap().is_some());
    assert!(
        rt.image_status("kedge.local/missing:1")
            .await
            .unwrap()
            .is_none()
    );
    let pull = rt.pull_image("kedge.local/missing:1", None, None).await;
    assert!(
        matches!(
            pull,
            Err(RuntimeError::Call {
                method: "PullImage",
                ..
            })
        ),
        "{pull:?}"
    );

    run_one(&rt, &ctr, "host1", true).await;
    run_one(&rt, &ctr, "pod1", false).await;
}

#[tokio::test]
async fn a_missing_socket_is_a_connect_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nothing.sock");
    match CriRuntime::connect(&sock).await {
        Err(RuntimeError::Connect { endpoint, .. }) => assert!(endpoint.contains("nothing.sock")),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

struct OneConfigMap(k8s_openapi::api::core::v1::ConfigMap);

impl edgecore::edged::env::ObjectSource for OneConfigMap {
    fn config_map(&self, ns: &str, name: &str) -> Option<k8s_openapi::api::core::v1::ConfigMap> {
        (self.0.metadata.namespace.as_deref() == Some(ns)
            && self.0.metadata.name.as_deref() == Some(name))
        .then(|| self.0.clone())
    }
    fn secret(&self, _: &str, _: &str) -> Option<k8s_openapi::api::core::v1::Secret> {
        None
    }
}

/// The configs edged builds from a Pod are accepted by containerd and take effect inside the
/// container: environment (ConfigMap, fieldRef, $(VAR)), DNS, hostname, memory limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_generated_configs_run_on_containerd_as_written() {
    use edgecore::edged::cri_config::{NodeSettings, container_config, sandbox_config};
    use edgecore::edged::env::PodContext;
    use serde_json::json;

    let ctr = TestContainerd::start().unwrap();
    let rt = CriRuntime::connect(&ctr.socket).await.unwrap();
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "shop", "namespace": "default", "uid": "uid-shop"},
        "spec": {"nodeName": "edge-1", "hostname": "shop-1",
            "dnsConfig": {"nameservers": ["192.0.2.1"], "searches": ["edge.example"]},
            "containers": [{"name": "app", "image": ctr.busybox_image,
                "command": ["sh", "-c"], "args": ["echo $(WHO) > /tmp/who; exec sleep 3600"],
                "env": [{"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
                        {"name": "WHO", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "resources": {"limits": {"memory": "64Mi", "cpu": "250m"}}}]}
    }))
    .unwrap();
    let cm = OneConfigMap(
        serde_json::from_value(
            json!({"metadata": {"name": "cfg", "namespace": "default"}, "data": {"mode": "edge"}}),
        )
        .unwrap(),
    );
    let node = NodeSettings {
        node_name: "edge-1".into(),
        resolv_conf: "nameserver 192.0.2.53\n".into(),
        cluster_dns: Vec::new(),
        cluster_domain: "cluster.local".into(),
        cgroup_root: ctr.cgroup_parent.clone(),
        pod_log_root: ctr.dir().join("pods"),
        root_dir: ctr.dir().join("edged"),
        node_memory_bytes: 8 << 30,
    };
    let sb_config = sandbox_config(&pod, &node, 0).unwrap();
    std::fs::create_dir_all(&sb_config.log_directory).unwrap();
    let sb = rt
        .run_pod_sandbox(sb_config.clone())
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctr.log()));
    let ip = rt
        .pod_sandbox_status(&sb)
        .await
        .unwrap()
        .network
        .unwrap()
        .ip;
    let ctx = PodContext {
        node_name: "edge-1".into(),
        pod_ips: vec![ip],
        ..Default::default()
    };
    let spec = pod.spec.as_ref().unwrap();
    let config = container_config(&pod, &spec.containers[0], 0, &node, &ctx, &cm).unwrap();
    let c = rt
        .create_container(&sb, config, sb_config)
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", ctr.log()));
    rt.start_container(&c).await.unwrap();
    assert_eq!(
        exec_until(&rt, &c, &["cat", "/tmp/who"], "shop").await,
        "shop\n"
    );
    let env = exec_until(&rt, &c, &["env"], "MODE").await;
    assert!(
        env.contains("MODE=edge\n") && env.contains("WHO=shop\n"),
        "{env}"
    );
    let resolv = exec_until(&rt, &c, &["cat", "/etc/resolv.conf"], "nameserver").await;
    assert!(
        resolv.contains("nameserver 192.0.2.53")
            && resolv.contains("nameserver 192.0.2.1")
            && resolv.contains("edge.example"),
        "{resolv}"
    );
    assert_eq!(
        exec_until(&rt, &c, &["hostname"], "shop").await.trim(),
        "shop-1"
    );
    // runc mounts the container's own memory cgroup (v1) at /sys/fs/cgroup/memory.
    let limit = exec_until(
        &rt,
        &c,
        &["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"],
        "",
    )
    .await;
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
    rt.stop_container(&c, 1).await.unwrap();
    rt.stop_pod_sandbox(&sb).await.unwrap();
    rt.remove_pod_sandbox(&sb).await.unwrap();
}

/// edged's pod sync on real containerd: the init container runs to completion first, the app
/// then runs with a pod IP; a crashing container is restarted as a new attempt with the
/// kubelet's back-off, and the status says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_sync_runs_init_then_app_and_restarts_a_crashing_container() {
    use edgecore::edged::backoff::RestartBackoff;
    use edgecore::edged::cri_config::NodeSettings;
    use edgecore::edged::sync::{PodMemory, sync_pod};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    let ctr = TestContainerd::start().unwrap();
    let rt = CriRuntime::connect(&ctr.socket).await.unwrap();
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "crashy", "namespace": "default", "uid": "uid-crashy"},
        "spec": {"nodeName": "edge-1",
            "initContainers": [{"name": "init", "image": ctr.busybox_image, "imagePullPolicy": "Never",
                "command": ["sh", "-c", "sleep 0.3"]}],
            "containers": [
                {"name": "app", "image": ctr.busybox_image, "imagePullPolicy": "Never",
                 "command": ["sh", "-c", "exec sleep 3600"]},
                {"name": "crash", "image": ctr.busybox_image, "imagePullPolicy": "Never",
                 "command": ["sh", "-c", "sleep 0.2; exit 3"]}]}
    }))
    .unwrap();
    let node = NodeSettings {
        node_name: "edge-1".into(),
        resolv_conf: "nameserver 192.0.2.53\n".into(),
        cluster_dns: Vec::new(),
        cluster_domain: "cluster.local".into(),
        cgroup_root: ctr.cgroup_parent.clone(),
        pod_log_root: ctr.dir().join("pods"),
        root_dir: ctr.dir().join("edged"),
        node_memory_bytes: 8 << 30,
    };
    let mut backoff = RestartBackoff::default();
    let mut memory = PodMemory::default();
    let source = OneConfigMap(
        serde_json::from_value(json!({"metadata": {"name": "x", "namespace": "y"}})).unwrap(),
    );
    let t0 = Instant::now();
    let mut saw_pending_with_init_running = false;
    let mut last = None;
    while t0.elapsed() < Duration::from_secs(20) {
        let wall = Time(k8s_openapi::jiff::Timestamp::now());
        let s = sync_pod(
            &rt,
            &pod,
            &node,
            "192.0.2.10",
            &source,
            &mut backoff,
            &mut memory,
            Instant::now(),
            wall,
        )
        .await
        .unwrap_or_else(|e| panic!("sync: {e}\n{}", ctr.log()));
        let init_running = s.init_container_statuses.as_ref().unwrap()[0]
            .state
            .as_ref()
            .unwrap()
            .running
            .is_some();
        if init_running {
            saw_pending_with_init_running = true;
            assert_eq!(s.phase.as_deref(), Some("Pending"));
            assert!(
                s.container_statuses
                    .as_ref()
                    .unwrap()
                    .iter()
                    .all(|c| c.container_id.is_none()),
                "nothing else starts while the init container runs"
            );
        }
        let crash = &s.container_statuses.as_ref().unwrap()[1];
        let done = crash.restart_count >= 2
            && crash
                .state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .and_then(|w| w.reason.as_deref())
                == Some("CrashLoopBackOff");
        last = Some(s);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let s = last.unwrap();
    assert!(saw_pending_with_init_running);
    assert_eq!(s.phase.as_deref(), Some("Running"));
    assert!(
        s.pod_ip
            .as_deref()
            .is_some_and(|ip| ip.starts_with("10.233.")),
        "{:?}",
        s.pod_ip
    );
    let statuses = s.container_statuses.unwrap();
    let app = &statuses[0];
    assert!(app.state.as_ref().unwrap().running.is_some() && app.ready);
    assert_eq!(
        app.restart_count, 0,
        "the healthy container was never restarted"
    );
    let crash = &statuses[1];
    assert!(crash.restart_count >= 2, "{crash:?}");
    assert_eq!(
        crash
            .last_state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .exit_code,
        3
    );
    assert!(!crash.ready);
    let init = &s.init_container_statuses.unwrap()[0];
    assert_eq!(
        init.state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .exit_code,
        0
    );
    // Clean up through the same code edged uses.
    let observed = edgecore::edged::sync::observe(&rt, "uid-crashy")
        .await
        .unwrap();
    edgecore::edged::sync::kill_pod(&rt, &observed, 1)
        .await
        .unwrap();
    for sb in &observed.pod.sandboxes {
        rt.remove_pod_sandbox(&sb.id).await.unwrap();
    }
}

/// Image GC on real containerd: with the image filesystem "full", an image a container uses
/// (even an exited one) and the sandbox image (from containerd's config) stay; once the
/// container is removed, its image goes. The filesystem figures containerd's mountpoint gives
/// are read for real too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_gc_removes_only_unused_images_and_never_the_sandbox_image() {
    use edgecore::edged::image_gc::{ImageGc, ImageGcPolicy};
    use edgecore::edged::pressure::FsStats;
    use std::path::Path;
    let ctr = TestContainerd::start().unwrap();
    let rt = CriRuntime::connect(&ctr.socket).await.unwrap();
    assert_eq!(
        rt.sandbox_image().await.unwrap().as_deref(),
        Some(ctr.pause_image.as_str())
    );
    let fs = rt.image_fs_info().await.unwrap();
    let mountpoint = fs[0].fs_id.as_ref().unwrap().mountpoint.clone();
    let real = FsStats::of(Path::new(&mountpoint)).unwrap();
    assert!(
        real.capacity > 0 && real.available <= real.capacity,
        "{real:?}"
    );

    // A container from busybox, exited.
    let sandbox = rt
        .run_pod_sandbox(sandbox_config(&ctr, "gc1", true))
        .await
        .unwrap();
    let id = rt
        .create_container(
            &sandbox,
            container_config(&ctr, "exit 0"),
            sandbox_config(&ctr, "gc1", true),
        )
        .await
        .unwrap();
    let full = |_: &Path| {
        Ok(FsStats {
            capacity: 1 << 30,
            available: 0,
            ..FsStats::default()
        })
    };
    let mut gc = ImageGc::new(ImageGcPolicy {
        high_threshold_percent: 50,
        low_threshold_percent: 10,
        min_age: Duration::ZERO,
    });
    let kept = gc.collect(&rt, full, Instant::now()).await.unwrap();
    assert!(kept.removed.is_empty(), "{kept:?}");
    assert!(rt.image_status(&ctr.busybox_image).await.unwrap().is_some());

    rt.remove_container(&id).await.unwrap();
    rt.stop_pod_sandbox(&sandbox).await.unwrap();
    rt.remove_pod_sandbox(&sandbox).await.unwrap();
    let collected = gc.collect(&rt, full, Instant::now()).await.unwrap();
    assert_eq!(collected.removed.len(), 1, "{collected:?}");
    assert!(collected.freed_bytes > 0);
    assert!(rt.image_status(&ctr.busybox_image).await.unwrap().is_none());
    assert!(
        rt.image_status(&ctr.pause_image).await.unwrap().is_some(),
        "the sandbox image stays"
    );
}

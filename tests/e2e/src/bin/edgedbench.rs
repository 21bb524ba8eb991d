//! edged benchmark on this machine's containerd, side by side in one run:
//! (a) the floor: the same pods started directly over CRI by a minimal client (sandbox, create,
//!     start), and
//! (b) kedge end to end: the pod created in the test API server → seen `Running` and `Ready` in
//!     the API (cloudcore → link → SQLite → edged → containerd → status report → cloudcore →
//!     API), polled every 5 ms.
//! 20 pods one after another and 20 created at once; edgecore's RSS idle (MetaServer on) and
//! with 10 pods; a ConfigMap change → new file content inside the container.
//!
//! ```sh
//! cargo build --release -p cloudcore -p edgecore -p kedge-e2e --bins
//! ./target/release/edgedbench
//! ```
//!
//! `KEDGE_BENCH_HOLD=<seconds>` pauses with the 10 pods running, to inspect edgecore.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use edgecore::edged::cri_config::{NodeSettings, container_config, sandbox_config};
use edgecore::edged::env::{ObjectSource, PodContext};
use edgecore::edged::runtime::{CriRuntime, Runtime};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kedge_e2e::apiserver::TestApiServer;
use kedge_e2e::containerd::TestContainerd;
use kedge_e2e::daemons::Setup;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

const NODE: &str = "edge-bench";
const N: usize = 20;

struct Nothing;
impl ObjectSource for Nothing {
    fn config_map(&self, _: &str, _: &str) -> Option<ConfigMap> {
        None
    }
    fn secret(&self, _: &str, _: &str) -> Option<Secret> {
        None
    }
}

fn pod_json(name: &str, image: &str) -> serde_json::Value {
    json!({"metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
        "spec": {"nodeName": NODE, "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "main", "image": image, "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", "exec sleep 3600"]}]}})
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms",
        at(0.5).as_secs_f64() * 1e3,
        at(0.9).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3
    )
}

/// The floor: one pod through CRI directly, timed from the first call to a started container.
async fn direct(
    rt: &CriRuntime,
    ctr: &TestContainerd,
    node: &NodeSettings,
    name: &str,
) -> anyhow::Result<Duration> {
    let pod: Pod = serde_json::from_value(pod_json(name, &ctr.busybox_image))?;
    let sb = sandbox_config(&pod, node, 0)?;
    let c = container_config(
        &pod,
        &pod.spec.as_ref().context("spec")?.containers[0],
        0,
        node,
        &PodContext::default(),
        &Nothing,
    )?;
    tokio::fs::create_dir_all(&sb.log_directory).await?;
    let t = Instant::now();
    let id = rt.run_pod_sandbox(sb.clone()).await?;
    let cid = rt.create_container(&id, c, sb).await?;
    rt.start_container(&cid).await?;
    Ok(t.elapsed())
}

async fn clean_direct(rt: &CriRuntime) -> anyhow::Result<()> {
    for s in rt.list_pod_sandboxes(None).await? {
        rt.stop_pod_sandbox(&s.id).await?;
        rt.remove_pod_sandbox(&s.id).await?;
    }
    Ok(())
}

fn running_and_ready(p: &Pod) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Running")
            && s.conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

async fn wait_ready(
    pods: &Api<Pod>,
    names: &[String],
    since: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let mut done: Vec<Option<Duration>> = vec![None; names.len()];
    while done.iter().any(Option::is_none) {
        for (i, n) in names.iter().enumerate() {
            if done[i].is_none()
                && pods
                    .get_opt(n)
                    .await?
                    .is_some_and(|p| running_and_ready(&p))
            {
                done[i] = Some(since.elapsed());
            }
        }
        if since.elapsed() > Duration::from_secs(120) {
            let mut waiting = Vec::new();
            for (i, n) in names.iter().enumerate() {
                if done[i].is_none() {
                    let status = pods.get_opt(n).await?.and_then(|p| p.status);
                    waiting.push(format!("{n}: {}", serde_json::to_string(&status)?));
                }
            }
            bail!("pods not Ready within 120 s:\n{}", waiting.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(done.into_iter().flatten().collect())
}

async fn delete_all(pods: &Api<Pod>, names: &[String], rt: &CriRuntime) -> anyhow::Result<()> {
    for n in names {
        pods.delete(n, &DeleteParams::default()).await?;
    }
    let t = Instant::now();
    while !rt.list_pod_sandboxes(None).await?.is_empty() || t.elapsed() < Duration::from_millis(100)
    {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("pods not removed within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn rss_mib(pid: u32) -> f64 {
    kedge_e2e::procfs::rss_kb(pid).0 as f64 / 1024.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kedge_common::tls::install_crypto_provider();
    let ctr = TestContainerd::start()?;
    let rt = CriRuntime::connect(&ctr.socket).await?;
    let node = NodeSettings {
        node_name: NODE.into(),
        resolv_conf: "nameserver 192.0.2.53\n".into(),
        cluster_dns: Vec::new(),
        cluster_domain: "cluster.local".into(),
        cgroup_root: ctr.cgroup_parent.clone(),
        pod_log_root: ctr.dir().join("direct-pods"),
        root_dir: ctr.dir().join("direct-edged"),
        node_memory_bytes: 8 << 30,
    };

    // (a) the floor
    let mut floor_seq = Vec::new();
    for i in 0..N {
        floor_seq.push(direct(&rt, &ctr, &node, &format!("d{i}")).await?);
    }
    clean_direct(&rt).await?;
    let t = Instant::now();
    let futs: Vec<_> = (0..N)
        .map(|i| {
            let (rt, ctr, node) = (&rt, &ctr, &node);
            async move { direct(rt, ctr, node, &format!("p{i}")).await }
        })
        .collect();
    for r in futures_util::future::join_all(futs).await {
        r?;
    }
    let floor_parallel = t.elapsed();
    clean_direct(&rt).await?;

    // (b) kedge end to end
    let server = TestApiServer::start().await?;
    let client = server.client()?;
    server.create_namespace("kubeedge").await?;
    let dir = tempfile::tempdir()?;
    let setup = Setup::write(dir.path(), server.kubeconfig_path(), NODE)?;
    setup.use_container_runtime(&ctr.socket, &ctr.cgroup_parent)?;
    let (cloud, edge) = setup.start_both().await?;
    let pid = edge.pid().context("edgecore pid")?;
    let cloud_pid = cloud.pid().context("cloudcore pid")?;
    let nodes: Api<Node> = Api::all(client.clone());
    while nodes.get_opt(NODE).await?.is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_idle = rss_mib(pid);
    let cloud_rss_idle = rss_mib(cloud_pid);
    let pods: Api<Pod> = Api::default_namespaced(client.clone());

    let mut kedge_seq = Vec::new();
    let mut names = Vec::new();
    for i in 0..N {
        let name = format!("s{i}");
        let mut body = pod_json(&name, &ctr.busybox_image);
        body["metadata"]
            .as_object_mut()
            .context("meta")?
            .remove("uid");
        let t = Instant::now();
        pods.create(&PostParams::default(), &serde_json::from_value(body)?)
            .await?;
        let ready = wait_ready(&pods, std::slice::from_ref(&name), t).await;
        let ready = ready.with_context(|| setup.log_tails(80))?;
        kedge_seq.extend(ready);
        names.push(name);
    }
    delete_all(&pods, &names, &rt).await?;

    let names: Vec<String> = (0..N).map(|i| format!("b{i}")).collect();
    let t = Instant::now();
    for name in &names {
        let mut body = pod_json(name, &ctr.busybox_image);
        body["metadata"]
            .as_object_mut()
            .context("meta")?
            .remove("uid");
        pods.create(&PostParams::default(), &serde_json::from_value(body)?)
            .await?;
    }
    let parallel = wait_ready(&pods, &names, t)
        .await
        .with_context(|| setup.log_tails(80))?;
    let kedge_parallel = parallel.iter().max().copied().unwrap_or_default();
    delete_all(&pods, &names, &rt).await?;

    // RSS with 10 pods, and ConfigMap -> file.
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "bench-cfg"}, "data": {"v": "0"}}))?,
    )
    .await?;
    let names: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
    for name in &names {
        let mut body = pod_json(name, &ctr.busybox_image);
        body["metadata"]
            .as_object_mut()
            .context("meta")?
            .remove("uid");
        body["spec"]["volumes"] = json!([{"name": "cfg", "configMap": {"name": "bench-cfg"}}]);
        body["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": "cfg", "mountPath": "/cfg"}]);
        pods.create(&PostParams::default(), &serde_json::from_value(body)?)
            .await?;
    }
    wait_ready(&pods, &names, Instant::now())
        .await
        .with_context(|| setup.log_tails(80))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_10 = rss_mib(pid);
    let cloud_rss_10 = rss_mib(cloud_pid);
    if let Ok(secs) = std::env::var("KEDGE_BENCH_HOLD").map(|s| s.parse::<u64>().unwrap_or(60)) {
        // For a look at the process (e.g. /proc/<pid>/smaps_rollup) with 10 pods running.
        eprintln!("edgecore pid {pid} with 10 pods; holding {secs} s");
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    let target = rt
        .list_containers(None)
        .await?
        .into_iter()
        .next()
        .context("a container")?
        .id;
    let mut cm_times = Vec::new();
    for round in 1..=5 {
        let want = round.to_string();
        let t = Instant::now();
        cms.patch(
            "bench-cfg",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"v": want}})),
        )
        .await?;
        loop {
            let out = rt
                .exec_sync(&target, vec!["cat".into(), "/cfg/v".into()], 5)
                .await?;
            if String::from_utf8_lossy(&out.stdout) == want {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("ConfigMap change not seen in 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cm_times.push(t.elapsed());
    }
    delete_all(&pods, &names, &rt).await?;

    let p50 = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2]
    };
    println!("{N} pods one after another:");
    println!(
        "  floor (direct CRI: sandbox + create + start): {}",
        percentiles(floor_seq.clone())
    );
    println!(
        "  kedge (API create -> Running and Ready in the API): {}",
        percentiles(kedge_seq.clone())
    );
    println!(
        "  kedge overhead over the floor at p50: {:.0} ms",
        (p50(&kedge_seq).as_secs_f64() - p50(&floor_seq).as_secs_f64()) * 1e3
    );
    println!("{N} pods at once:");
    println!(
        "  floor: all started in {:.2} s",
        floor_parallel.as_secs_f64()
    );
    println!(
        "  kedge: all Running and Ready in {:.2} s ({:.2} x the floor); per pod {}",
        kedge_parallel.as_secs_f64(),
        kedge_parallel.as_secs_f64() / floor_parallel.as_secs_f64(),
        percentiles(parallel)
    );
    println!("edgecore RSS: {rss_idle:.1} MiB idle (MetaServer on), {rss_10:.1} MiB with 10 pods");
    println!(
        "cloudcore RSS: {cloud_rss_idle:.1} MiB with one idle node, {cloud_rss_10:.1} MiB with its 10 pods"
    );
    println!(
        "ConfigMap change -> new file content in the container: {}",
        percentiles(cm_times)
    );
    Ok(())
}

//! Streams benchmark (kubectl logs/exec through cloudcore): one edge node on real containerd,
//! cloudcore and edgecore as shipped, the test API server as the cluster. Each figure is taken
//! side by side with its floor, in one run:
//! - time to the first log byte of `GET /containerLogs` through cloudcore (as the API server
//!   calls it) vs. asking CRI for the log path and reading the file on the node;
//! - exec set-up round trip (`POST /exec` upgrade answered `101` by containerd's streaming
//!   server) through cloudcore vs. CRI `Exec` plus the same upgrade straight to containerd;
//! - `kubectl exec -- true` end to end vs. `kubectl get pod` (kubectl's own start-up and one
//!   API call);
//! - throughput of one `logs -f` of a container writing as fast as it can, with and without
//!   object traffic for the node (a ConfigMap the pod mounts, updated continuously), vs. how
//!   fast containerd grows the log file meanwhile.
//!
//! ```sh
//! cargo build --release -p cloudcore -p edgecore -p kedge-e2e --bins
//! ./target/release/streambench --rounds 50
//! ```

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use edgecore::edged::runtime::{CriRuntime, Runtime, api};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kedge_e2e::apiserver::kubelet_proxy::KUBELET_CLIENT_USER;
use kedge_e2e::edgerig::Rig;
use kedge_e2e::kubelet::KubeletApiClient;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    /// Samples per latency figure.
    #[arg(long, default_value_t = 50)]
    rounds: usize,
    /// Seconds of each throughput phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

const NODE: &str = "edge-streambench";

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "p50 {:.2} ms, p99 {:.2} ms",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3
    )
}

/// Reads from `conn` until the end of the response head; returns the head and what followed.
async fn read_head<R: tokio::io::AsyncRead + Unpin>(
    conn: &mut R,
) -> anyhow::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            bail!(
                "closed before a response head: {}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf[i + 4..].to_vec();
            buf.truncate(i);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
    }
}

const UPGRADE: [(&str, &str); 3] = [
    ("Connection", "Upgrade"),
    ("Upgrade", "SPDY/3.1"),
    ("X-Stream-Protocol-Version", "v4.channel.k8s.io"),
];

async fn container_id(cri: &CriRuntime, pod: &str) -> anyhow::Result<String> {
    let cs = cri
        .list_containers(Some(api::ContainerFilter {
            label_selector: [
                ("io.kubernetes.pod.name".to_owned(), pod.to_owned()),
                ("io.kubernetes.container.name".to_owned(), "main".to_owned()),
            ]
            .into(),
            state: Some(api::ContainerStateValue {
                state: api::ContainerState::ContainerRunning as i32,
            }),
            ..Default::default()
        }))
        .await?;
    cs.into_iter()
        .next()
        .map(|c| c.id)
        .context("no running container")
}

async fn wait_running(pods: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = pods.get(name).await?;
        if p.status.and_then(|s| s.phase).as_deref() == Some("Running") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rig = Rig::start(NODE).await;
    let pods: Api<Pod> = Api::default_namespaced(rig.client.clone());
    let cms: Api<ConfigMap> = Api::default_namespaced(rig.client.clone());
    let image = rig.ctr.busybox_image.clone();
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "churn"}, "data": {"n": "0"}}))?,
    )
    .await?;
    let pod = |name: &str, script: &str| -> anyhow::Result<Pod> {
        Ok(serde_json::from_value(json!({"metadata": {"name": name},
            "spec": {"nodeName": NODE, "terminationGracePeriodSeconds": 1,
                "volumes": [{"name": "churn", "configMap": {"name": "churn"}}],
                "containers": [{"name": "main", "image": image, "command": ["sh", "-c", script],
                    "volumeMounts": [{"name": "churn", "mountPath": "/churn"}]}]}}))?)
    };
    let pp = PostParams::default();
    pods.create(
        &pp,
        &pod(
            "quiet",
            "for i in $(seq 100); do echo line-$i; done; exec sleep 3600",
        )?,
    )
    .await?;
    wait_running(&pods, "quiet").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let addr = format!("127.0.0.1:{}", rig.setup.stream_port).parse()?;
    let apiserver = KubeletApiClient::new(
        addr,
        rig._server.cluster_ca(),
        KUBELET_CLIENT_USER,
        Some("kubeadm:cluster-admins"),
    )?;
    let cri = CriRuntime::connect(&rig.ctr.socket).await?;
    let quiet = container_id(&cri, "quiet").await?;

    // Time to the first log byte.
    let (mut via, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        let t = Instant::now();
        let mut conn = apiserver
            .send("GET", "/containerLogs/default/quiet/main", &[])
            .await?;
        let (head, mut rest) = read_head(&mut conn).await?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("logs: {head}");
        }
        if rest.is_empty() {
            let mut b = [0u8; 1];
            conn.read_exact(&mut b).await?;
            rest.push(b[0]);
        }
        via.push(t.elapsed());
        let t = Instant::now();
        let path = cri.container_status(&quiet).await?.log_path;
        let mut f = tokio::fs::File::open(&path).await?;
        let mut b = [0u8; 64];
        f.read_exact(&mut b).await?;
        direct.push(t.elapsed());
    }
    println!(
        "time to first log byte, through cloudcore: {}",
        summary(via)
    );
    println!(
        "  floor (CRI ContainerStatus + reading the file on the node): {}",
        summary(direct)
    );

    // Exec set-up round trip.
    let (mut via, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        let t = Instant::now();
        let mut conn = apiserver
            .send(
                "POST",
                "/exec/default/quiet/main?command=true&output=1",
                &UPGRADE,
            )
            .await?;
        let (head, _) = read_head(&mut conn).await?;
        if !head.starts_with("HTTP/1.1 101") {
            bail!("exec through cloudcore: {head}");
        }
        via.push(t.elapsed());
        drop(conn);
        let t = Instant::now();
        let url = cri
            .exec(api::ExecRequest {
                container_id: quiet.clone(),
                cmd: vec!["true".into()],
                stdout: true,
                ..Default::default()
            })
            .await?;
        let rest = url.strip_prefix("http://").context("streaming URL")?;
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let mut tcp = tokio::net::TcpStream::connect(host).await?;
        tcp.set_nodelay(true)?;
        let mut head = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\n");
        for (k, v) in UPGRADE {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        tcp.write_all(head.as_bytes()).await?;
        let (head, _) = read_head(&mut tcp).await?;
        if !head.starts_with("HTTP/1.1 101") {
            bail!("exec straight to containerd: {head}");
        }
        direct.push(t.elapsed());
    }
    println!(
        "exec set-up round trip (to 101 Switching Protocols), through cloudcore: {}",
        summary(via)
    );
    println!(
        "  floor (CRI Exec + the upgrade straight to containerd): {}",
        summary(direct)
    );

    // kubectl exec end to end vs kubectl's own floor.
    let kc = rig._server.kubeconfig_path().to_owned();
    let rounds = args.rounds.min(30);
    let timed = |args: &[&str]| -> anyhow::Result<Duration> {
        let t = Instant::now();
        let o = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &kc)
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
            .output()?;
        if !o.status.success() {
            bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(t.elapsed())
    };
    let (mut exec, mut get) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        exec.push(timed(&["exec", "quiet", "--", "true"])?);
        get.push(timed(&["get", "pod", "quiet"])?);
    }
    println!("kubectl exec quiet -- true: {}", summary(exec));
    println!("  floor (kubectl get pod quiet): {}", summary(get));

    // Throughput of one followed log.
    pods.create(
        &pp,
        &pod("loud", "exec yes 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqr")?,
    )
    .await?;
    wait_running(&pods, "loud").await?;
    let loud = container_id(&cri, "loud").await?;
    let log_path = cri.container_status(&loud).await?.log_path;
    for churn in [false, true] {
        let updates = Arc::new(AtomicU64::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let churner = churn.then(|| {
            let (cms, updates, stop) = (cms.clone(), updates.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let n = updates.fetch_add(1, Ordering::Relaxed);
                    let p = json!({"data": {"n": n.to_string(), "pad": "x".repeat(2048)}});
                    let _ = cms
                        .patch("churn", &PatchParams::default(), &Patch::Merge(&p))
                        .await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        });
        let mut conn = apiserver
            .send(
                "GET",
                "/containerLogs/default/loud/main?follow=true&tailLines=0",
                &[],
            )
            .await?;
        let (head, rest) = read_head(&mut conn).await?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("follow: {head}");
        }
        let size0 = tokio::fs::metadata(&log_path).await?.len();
        let t = Instant::now();
        let newlines = |b: &[u8]| b.iter().filter(|c| **c == b'\n').count() as u64;
        let mut got = rest.len() as u64;
        let mut lines = newlines(&rest);
        let mut buf = vec![0u8; 256 * 1024];
        while t.elapsed() < Duration::from_secs(args.seconds) {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                bail!("follow ended early");
            }
            got += n as u64;
            lines += newlines(&buf[..n]);
        }
        let secs = t.elapsed().as_secs_f64();
        let size1 = tokio::fs::metadata(&log_path).await?.len();
        // Lines containerd appended meanwhile (the CRI format adds ~40 bytes to each).
        let mut f = tokio::fs::File::open(&log_path).await?;
        tokio::io::AsyncSeekExt::seek(&mut f, std::io::SeekFrom::Start(size0)).await?;
        let mut written = 0u64;
        let mut left = size1 - size0;
        while left > 0 {
            let n = f.read(&mut buf[..(left.min(256 * 1024) as usize)]).await?;
            if n == 0 {
                break;
            }
            written += newlines(&buf[..n]);
            left -= n as u64;
        }
        stop.cancel();
        if let Some(c) = churner {
            let _ = c.await;
        }
        drop(conn);
        println!(
            "logs -f throughput{}: {:.1} MB/s of log content ({:.0} lines/s); containerd wrote {:.0} lines/s meanwhile ({:.0}% of them read){}",
            if churn { " with object traffic" } else { "" },
            got as f64 / secs / 1e6,
            lines as f64 / secs,
            written as f64 / secs,
            100.0 * lines as f64 / written.max(1) as f64,
            if churn {
                format!(
                    " ({} ConfigMap updates for the node, {:.0}/s)",
                    updates.load(Ordering::Relaxed),
                    updates.load(Ordering::Relaxed) as f64 / secs
                )
            } else {
                String::new()
            }
        );
    }
    pods.delete("loud", &Default::default()).await?;
    Ok(())
}

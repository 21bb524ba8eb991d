//! cloudcore benchmark: N edge nodes × P pods each.
//!
//! Runs the real `cloudcore` binary (release build, separate process, so its RSS is its own)
//! against the in-process test API server, with N real `EdgeHub`s as the edge nodes. Measures the
//! time from creating all N × P pods in the API until every pod is stored (and so acked) on its
//! node, cloudcore's RSS, and the API requests cloudcore made, by verb.
//!
//! ```sh
//! cargo build --release -p cloudcore -p kedge-e2e --bins
//! ./target/release/podbench --nodes 1000 --pods-per-node 10
//! ./target/release/podbench --nodes 1000 --pods-per-node 10 --no-inventory   # edges like KubeEdge's
//! ./target/release/podbench --nodes 10000 --pods-per-node 1 --replicas 2 --kill-one
//! ```
//!
//! With `--replicas R` the edges reach R cloudcore processes through a round-robin TCP load
//! balancer (as a Service would). `--kill-one` then SIGKILLs the first replica, creates one more
//! pod per node at once, and clocks until every node has stored it: the killed replica's nodes
//! must first be back on another replica with their state reconciled.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use edgecore::edgehub::outbox::MemoryOutbox;
use edgecore::edgehub::{EdgeHub, EdgeHubSettings};
use edgecore::metamanager::store::{Applied, MemoryStore, ObjectStore, StoreError};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kedge_common::Message;
use kedge_common::pki::CertificateAuthority;
use kedge_e2e::apiserver::TestApiServer;
use kedge_e2e::cloud::cluster_node_credentials;
use kedge_e2e::procfs::{free_port, rss_kb};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    #[arg(long, default_value_t = 10)]
    pods_per_node: usize,
    /// The cloudcore binary (default: next to this one).
    #[arg(long)]
    cloudcore: Option<PathBuf>,
    /// Edges offer no inventory (like KubeEdge's): cloudcore records their acks in sync
    /// ConfigMaps, as it did for every edge before inventories.
    #[arg(long)]
    no_inventory: bool,
    /// cloudcore processes behind a round-robin load balancer.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// After the pods: kill the first replica, then one more pod per node.
    #[arg(long)]
    kill_one: bool,
    /// Internal: run only a load balancer in front of these backends (a child process, so that
    /// its two sockets per connection do not count against this process's descriptor limit).
    #[arg(long, hide = true)]
    serve_lb: Vec<std::net::SocketAddr>,
    /// Seconds between node Lease renewals (`nodeUpdateFrequency`; kubelet's 10). At 10,000
    /// nodes the default is 1,000 Lease writes a second, more than the test API server here
    /// sustains beside the pods.
    #[arg(long, default_value_t = 10)]
    lease_seconds: u64,
}

/// Edges per load balancer process: each proxied connection costs it two descriptors.
const EDGES_PER_LB: usize = 4000;

/// A load balancer in a child process; returns it and where it listens.
fn spawn_lb(
    backends: &[std::net::SocketAddr],
) -> anyhow::Result<(std::process::Child, std::net::SocketAddr)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    for b in backends {
        cmd.arg("--serve-lb").arg(b.to_string());
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("lb ")
        .context("load balancer did not start")?
        .parse()?;
    Ok((child, addr))
}

/// One cloudcore process.
struct Replica {
    child: std::process::Child,
    pid: u32,
    port: u16,
}

/// Starts cloudcore `i` against the test API server, with its own ports and the shared PKI in
/// `cert_dir`; returns once it listens.
fn start_replica(
    lease_seconds: u64,
    bin: &std::path::Path,
    kubeconfig: &std::path::Path,
    cert_dir: &std::path::Path,
    dir: &std::path::Path,
    i: usize,
) -> anyhow::Result<Replica> {
    let (port, stream_port, obs_port) = (free_port()?, free_port()?, free_port()?);
    let config = dir.join(format!("cloudcore-{i}.yaml"));
    std::fs::write(
        &config,
        format!(
            "kubeAPIConfig:\n  kubeConfig: {}\nmodules:\n  cloudHub:\n    certDir: {}\n    websocket: {{address: 127.0.0.1, port: {port}}}\n    https: {{enable: false}}\n  edgeController: {{nodeUpdateFrequency: {lease_seconds}}}\n  cloudStream: {{address: 127.0.0.1, port: {stream_port}}}\nobservability: {{address: 127.0.0.1, port: {obs_port}}}\n",
            kubeconfig.display(),
            cert_dir.display()
        ),
    )?;
    let mut child = Command::new(bin)
        .args(["--config"])
        .arg(&config)
        .env(
            "RUST_LOG",
            "warn,cloudcore::daemon=info,cloudcore::leader=info",
        )
        .env("POD_NAME", format!("cloudcore-{i}"))
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    loop {
        let line = lines.next().context("cloudcore exited")??;
        if line.contains("cloudhub listening") {
            break;
        }
    }
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("leader election") {
                eprintln!("[cloudcore-{i}] {line}");
            }
        }
    });
    Ok(Replica { child, pid, port })
}

/// A store that counts pods stored, across all simulated nodes.
struct CountingStore {
    inner: MemoryStore,
    pods: Arc<AtomicUsize>,
}

impl ObjectStore for CountingStore {
    fn apply(
        &self,
        msg: &Message,
    ) -> impl std::future::Future<Output = Result<Applied, StoreError>> + Send + 'static + use<>
    {
        let r = self.inner.apply_now(msg);
        if r.as_ref().is_ok_and(|a| *a == Applied::Stored) && msg.route.resource.contains("/pod/") {
            self.pods.fetch_add(1, Ordering::Relaxed);
        }
        std::future::ready(r)
    }

    fn inventory(
        &self,
    ) -> impl std::future::Future<
        Output = Result<Vec<kedge_common::inventory::InventoryItem>, StoreError>,
    >
    + Send
    + 'static
    + use<> {
        self.inner.inventory()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kedge_common::tls::install_crypto_provider();
    let args = Args::parse();
    if !args.serve_lb.is_empty() {
        let lb = kedge_e2e::proxy::LoadBalancer::start(args.serve_lb.clone()).await?;
        println!("lb {}", lb.addr());
        std::future::pending::<()>().await;
    }
    let (n, per) = (args.nodes, args.pods_per_node);
    let total = n * per;
    let cloudcore_bin = match args.cloudcore {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("cloudcore"),
    };

    let start = Instant::now();
    let server = TestApiServer::start().await?;
    let client = server.client()?;
    server.create_namespace("kubeedge").await?;

    let dir = tempfile::tempdir()?;
    let cert_dir = dir.path().join("certs");
    // The first replica creates the PKI in cert_dir, the others load it.
    let mut replicas = Vec::new();
    for i in 0..args.replicas.max(1) {
        replicas.push(start_replica(
            args.lease_seconds,
            &cloudcore_bin,
            server.kubeconfig_path(),
            &cert_dir,
            dir.path(),
            i,
        )?);
    }
    let backends: Vec<std::net::SocketAddr> = replicas
        .iter()
        .map(|r| std::net::SocketAddr::from(([127, 0, 0, 1], r.port)))
        .collect();
    let mut lbs = Vec::new();
    if replicas.len() > 1 {
        for _ in 0..n.div_ceil(EDGES_PER_LB) {
            lbs.push(spawn_lb(&backends)?);
        }
    }
    let edge_addr = |i: usize| {
        if lbs.is_empty() {
            backends[0]
        } else {
            lbs[i % lbs.len()].1
        }
    };
    println!(
        "{} cloudcore process(es) (pids {:?}) behind {} round-robin load balancer process(es); {n} nodes x {per} pods; edges {} inventories",
        replicas.len(),
        replicas.iter().map(|r| r.pid).collect::<Vec<_>>(),
        lbs.len(),
        if args.no_inventory { "without" } else { "with" }
    );

    let ca = CertificateAuthority::from_pem(
        &std::fs::read_to_string(cert_dir.join("ca.crt"))?,
        &std::fs::read_to_string(cert_dir.join("ca.key"))?,
    )?;
    let stored = Arc::new(AtomicUsize::new(0));
    let mut links = Vec::with_capacity(n);
    let stop = CancellationToken::new();
    for i in 0..n {
        let node = format!("edge-{i:05}");
        let creds = cluster_node_credentials(&client, &ca, &node).await?;
        let mut settings = EdgeHubSettings::new(edge_addr(i).to_string(), node);
        settings.inventory = !args.no_inventory;
        let edge = EdgeHub::new(
            settings,
            Arc::new(RwLock::new(creds)),
            Arc::new(CountingStore {
                inner: MemoryStore::new(),
                pods: stored.clone(),
            }),
            Arc::new(MemoryOutbox::new()),
        );
        links.push(edge.link_state());
        tokio::spawn(edge.run(stop.clone()));
    }
    // Every session up before the clock starts: the pods measure fan-out, not the TLS storm.
    let t = Instant::now();
    for link in links.iter_mut() {
        link.wait_for(|s| *s == edgecore::edgehub::LinkState::Connected)
            .await?;
    }
    println!(
        "{n} edge nodes connected in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let nodes: Api<Node> = Api::all(client.clone());
    let t = Instant::now();
    loop {
        let have = nodes
            .list(&ListParams::default().labels("node-role.kubernetes.io/edge"))
            .await?
            .items
            .len();
        if have >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "{n} edge nodes registered in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Let the initial node objects settle before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before: Vec<u64> = replicas.iter().map(|r| rss_kb(r.pid).0).collect();

    let before = server.requests().snapshot();
    let t = Instant::now();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    futures_util::stream::iter(0..total)
        .for_each_concurrent(64, |i| {
            let pods = pods.clone();
            async move {
                let node = format!("edge-{:05}", i % n);
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("p{i:06}")},
                    "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}
                }))
                .unwrap_or_default();
                if let Err(e) = pods.create(&PostParams::default(), &pod).await {
                    eprintln!("create p{i}: {e}");
                }
            }
        })
        .await;
    let created = t.elapsed();
    while stored.load(Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if t.elapsed() > Duration::from_secs(600) {
            anyhow::bail!(
                "only {} of {total} pods reached their nodes",
                stored.load(Ordering::Relaxed)
            );
        }
    }
    let all_acked = t.elapsed();
    let after = server.requests().snapshot();
    let rss: Vec<(u64, u64)> = replicas.iter().map(|r| rss_kb(r.pid)).collect();
    let mut delta: Vec<u64> = after
        .iter()
        .zip(before.iter())
        .map(|(a, b)| a - b)
        .collect();
    // Our own creates are not cloudcore's.
    delta[3] = delta[3].saturating_sub(total as u64);
    let names = [
        "get", "list", "watch", "create", "update", "patch", "delete", "other",
    ];
    let by_verb: Vec<String> = names
        .iter()
        .zip(&delta)
        .filter(|(_, c)| **c > 0)
        .map(|(n, c)| format!("{n} {c}"))
        .collect();
    println!(
        "created {total} pods in {:.2} s; all stored and acked on their nodes at {:.2} s",
        created.as_secs_f64(),
        all_acked.as_secs_f64()
    );
    for (i, (before, (rss, hwm))) in rss_before.iter().zip(&rss).enumerate() {
        println!(
            "cloudcore-{i} RSS {} MiB before the pods, {} MiB after (peak {} MiB)",
            before / 1024,
            rss / 1024,
            hwm / 1024
        );
    }
    println!(
        "cloudcore API requests during the {:.1} s window: {} ({})",
        all_acked.as_secs_f64(),
        delta.iter().sum::<u64>(),
        by_verb.join(", ")
    );
    // The whole run, for context: start-up, node registration, Leases (every 10 s per node).
    let mut whole = after;
    whole[3] = whole[3].saturating_sub(total as u64 + 1);
    let by_verb: Vec<String> = names
        .iter()
        .zip(&whole)
        .filter(|(_, c)| **c > 0)
        .map(|(n, c)| format!("{n} {c}"))
        .collect();
    println!(
        "cloudcore API requests since it started ({:.0} s): {} ({})",
        start.elapsed().as_secs_f64(),
        whole.iter().sum::<u64>(),
        by_verb.join(", ")
    );
    if args.kill_one && replicas.len() > 1 {
        let mut victim = replicas.remove(0);
        let t = Instant::now();
        victim.child.kill()?;
        victim.child.wait()?;
        // One more pod per node, created at once: the victim's nodes get theirs only once
        // they are back on a survivor with their state reconciled.
        let wave = stored.load(Ordering::Relaxed);
        futures_util::stream::iter(0..n)
            .for_each_concurrent(64, |i| {
                let pods = pods.clone();
                async move {
                    let pod: Pod = serde_json::from_value(json!({
                        "metadata": {"name": format!("after-kill-{i:06}")},
                        "spec": {"nodeName": format!("edge-{i:05}"), "containers": [{"name": "c", "image": "busybox"}]}
                    }))
                    .unwrap_or_default();
                    if let Err(e) = pods.create(&PostParams::default(), &pod).await {
                        eprintln!("create after-kill-{i}: {e}");
                    }
                }
            })
            .await;
        while stored.load(Ordering::Relaxed) < wave + n {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if t.elapsed() > Duration::from_secs(600) {
                anyhow::bail!(
                    "after the kill only {} of {n} new pods reached their nodes",
                    stored.load(Ordering::Relaxed) - wave
                );
            }
        }
        println!(
            "killed cloudcore-0; all {n} nodes stored a pod created right after the kill at {:.2} s",
            t.elapsed().as_secs_f64()
        );
        for r in &replicas {
            let (rss, hwm) = rss_kb(r.pid);
            println!(
                "surviving cloudcore RSS {} MiB (peak {} MiB)",
                rss / 1024,
                hwm / 1024
            );
        }
    }
    stop.cancel();
    for (mut lb, _) in lbs {
        let _ = lb.kill();
        let _ = lb.wait();
    }
    for mut r in replicas {
        let _ = r.child.kill();
        let _ = r.child.wait();
    }
    Ok(())
}

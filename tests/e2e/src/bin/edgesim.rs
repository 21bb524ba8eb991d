//! The link benchmark: N simulated edge nodes — each a real `EdgeHub` (TLS, WebSocket,
//! keepalives, backoff, ack-after-store) — against `hubbench`, a separate process running
//! cloudhub, so the cloud side's RSS and CPU are measured alone.
//!
//! ```sh
//! cargo build --release -p kedge-e2e --bins
//! ./target/release/edgesim --nodes 1000
//! ./target/release/edgesim --nodes 10000
//! ```
//! Reports: connect time, hub RSS, hub CPU while idle (keepalives only), fan-out of one update to
//! all nodes until acked, and the reconnect storm after `kill -9` of the hub, then a full resync.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use edgecore::edgehub::outbox::MemoryOutbox;
use edgecore::edgehub::{EdgeHub, EdgeHubSettings};
use edgecore::metamanager::store::MemoryStore;
use kedge_common::pki::CertificateAuthority;
use kedge_e2e::cloud::issue_node_credentials;
use kedge_e2e::procfs::{cpu_ticks, rss_kb};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// Number of simulated edge nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Seconds to sample the hub's CPU while it only handles keepalives.
    #[arg(long, default_value_t = 15)]
    idle_seconds: u64,
    /// Keepalive interval of the simulated nodes, seconds.
    #[arg(long, default_value_t = 15)]
    heartbeat: u64,
    /// The hubbench binary (default: next to this one).
    #[arg(long)]
    hub_bin: Option<PathBuf>,
}

struct Hub {
    child: Child,
    stdin: ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    addr: String,
}

impl Hub {
    fn spawn(bin: &Path, cert_dir: &Path, listen: &str) -> anyhow::Result<Hub> {
        let mut child = Command::new(bin)
            .args(["--cert-dir"])
            .arg(cert_dir)
            .args(["--listen", listen])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdin = child.stdin.take().context("hub stdin")?;
        let mut lines = BufReader::new(child.stdout.take().context("hub stdout")?).lines();
        let ready = lines.next().context("hub exited")??;
        let addr = ready
            .strip_prefix("READY ")
            .with_context(|| format!("unexpected hub output: {ready}"))?
            .to_owned();
        Ok(Hub {
            child,
            stdin,
            lines,
            addr,
        })
    }

    fn ask(&mut self, cmd: &str) -> anyhow::Result<Vec<String>> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        let line = self.lines.next().context("hub exited")??;
        Ok(line.split_whitespace().map(str::to_owned).collect())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn node_name(i: usize) -> String {
    format!("sim-{i:05}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kedge_common::tls::install_crypto_provider();
    let args = Args::parse();
    let n = args.nodes;
    let hub_bin = match args.hub_bin {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("hubbench"),
    };
    let dir = tempfile::tempdir()?;
    let cert_dir = dir.path().join("certs");

    let mut hub = Hub::spawn(&hub_bin, &cert_dir, "127.0.0.1:0")?;
    let addr = hub.addr.clone();
    println!("hub pid {} on {addr}; {n} nodes", hub.pid());
    let (rss0, _) = rss_kb(hub.pid());

    // Node identities, signed directly with the hub's CA.
    let t = Instant::now();
    let ca = CertificateAuthority::from_pem(
        &std::fs::read_to_string(cert_dir.join("ca.crt"))?,
        &std::fs::read_to_string(cert_dir.join("ca.key"))?,
    )?;
    let mut creds = Vec::with_capacity(n);
    for i in 0..n {
        let node = node_name(i);
        creds.push(issue_node_credentials(&ca, &node)?);
    }
    println!(
        "signed {n} node certificates in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Start every node at once: the initial connect is itself a storm.
    let stop = CancellationToken::new();
    let cpu_start = cpu_ticks(hub.pid());
    let t = Instant::now();
    for (i, c) in creds.into_iter().enumerate() {
        let mut s = EdgeHubSettings::new(addr.clone(), node_name(i));
        s.heartbeat = Duration::from_secs(args.heartbeat);
        s.read_deadline = s.heartbeat + Duration::from_secs(5);
        let edge = EdgeHub::new(
            s,
            Arc::new(RwLock::new(c)),
            Arc::new(MemoryStore::new()),
            Arc::new(MemoryOutbox::new()),
        );
        tokio::spawn(edge.run(stop.clone()));
    }
    let reply = tokio::task::block_in_place(|| hub.ask(&format!("WAIT_CONNECTED {n}")))?;
    let connect_s = t.elapsed().as_secs_f64();
    let connect_cpu = cpu_ticks(hub.pid()) - cpu_start;
    let (rss_connected, _) = rss_kb(hub.pid());
    println!(
        "all {n} connected in {connect_s:.2} s (hub: {reply:?}); hub CPU {:.2} s",
        connect_cpu as f64 / 100.0
    );

    // Idle: keepalives only.
    let c0 = cpu_ticks(hub.pid());
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let idle_ticks = cpu_ticks(hub.pid()) - c0;
    let (rss_idle, hwm_idle) = rss_kb(hub.pid());
    let idle_pct = idle_ticks as f64 / args.idle_seconds as f64;
    println!(
        "idle {}s: hub CPU {idle_pct:.1}% of one core; RSS {} MiB (peak {} MiB), {:.1} KiB/node",
        args.idle_seconds,
        rss_idle / 1024,
        hwm_idle / 1024,
        (rss_idle.saturating_sub(rss0)) as f64 / n as f64
    );

    // Fan-out: one update to every node, until every node has acked it.
    let c0 = cpu_ticks(hub.pid());
    let reply = tokio::task::block_in_place(|| hub.ask(&format!("FANOUT {n} 2")))?;
    let fan_cpu = cpu_ticks(hub.pid()) - c0;
    let fan_ms: u64 = reply.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);
    let acked: usize = reply.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    if acked != n {
        bail!("fan-out acked by {acked} of {n}");
    }
    println!(
        "fan-out: {n} acks in {:.2} s; hub CPU {:.2} s",
        fan_ms as f64 / 1000.0,
        fan_cpu as f64 / 100.0
    );

    // Reconnect storm: kill -9 the hub, start a new one on the same port and CA.
    hub.child.kill()?;
    let _ = hub.child.wait();
    let t = Instant::now();
    let mut hub = Hub::spawn(&hub_bin, &cert_dir, &addr)?;
    let c0 = cpu_ticks(hub.pid());
    let reply = tokio::task::block_in_place(|| hub.ask(&format!("WAIT_CONNECTED {n}")))?;
    let reconnect_s = t.elapsed().as_secs_f64();
    let reply2 = tokio::task::block_in_place(|| hub.ask(&format!("FANOUT {n} 3")))?;
    let resync_s = t.elapsed().as_secs_f64();
    let storm_cpu = cpu_ticks(hub.pid()) - c0;
    let (rss_after, hwm_after) = rss_kb(hub.pid());
    println!(
        "restart: all {n} reconnected in {reconnect_s:.2} s ({reply:?}), resynced (one object each, acked) at {resync_s:.2} s ({reply2:?}); hub CPU {:.2} s; RSS {} MiB (peak {} MiB)",
        storm_cpu as f64 / 100.0,
        rss_after / 1024,
        hwm_after / 1024
    );
    println!(
        "| {n} | {connect_s:.1} s | {} MiB | {idle_pct:.1} % | {:.2} s | {reconnect_s:.1} s | {resync_s:.1} s | {} MiB |",
        rss_idle / 1024,
        fan_ms as f64 / 1000.0,
        hwm_after.max(hwm_idle) / 1024,
    );
    let _ = rss_connected;
    stop.cancel();
    let _ = hub.child.kill();
    let _ = hub.child.wait();
    Ok(())
}

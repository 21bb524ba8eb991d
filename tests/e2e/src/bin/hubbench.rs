//! The cloud half of the link benchmark: cloudhub exactly as cloudcore wires it (same crate, same
//! settings) plus a line protocol on stdin/stdout so `edgesim` can drive it from another process
//! and measure this process's RSS and CPU on its own. Not a product binary.
//!
//! Commands (one per line): `WAIT_CONNECTED <n>` → `CONNECTED <n> <ms>`;
//! `FANOUT <n> <rv>` → enqueue one update for each of `sim-00000 … sim-<n-1>` and answer
//! `FANOUT_DONE <acked> <ms>` when all are acked.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use cloudcore::cloudhub::{self, CloudHubOptions, HubSettings, ObjectKey, Upstream, certs};
use kedge_common::{Message, Operation};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    cert_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
}

fn sim_node(i: usize) -> String {
    format!("sim-{i:05}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kedge_common::tls::install_crypto_provider();
    let args = Args::parse();
    let pki = Arc::new(certs::load_or_create_in_dir(
        &args.cert_dir,
        &["127.0.0.1".to_owned()],
    )?);
    let shutdown = CancellationToken::new();
    let opts = CloudHubOptions {
        websocket_addr: args.listen,
        bootstrap_addr: None,
        settings: HubSettings {
            node_limit: 100_000,
            ..HubSettings::default()
        },
        node_cert_validity: Duration::from_secs(86_400),
        upstream_capacity: 65_536,
    };
    let running = cloudhub::start(
        pki,
        opts,
        Arc::new(kedge_e2e::cloud::AnyNodeCertificate),
        shutdown.clone(),
    )
    .await?;
    println!("READY {}", running.websocket_addr);
    let handle = running.handle.clone();
    let mut upstream = running.upstream;
    let _tasks = running.tasks;

    // Acks are counted as they come; FANOUT waits on them.
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    tokio::spawn(async move {
        while let Some(ev) = upstream.recv().await {
            if let Upstream::Acked { node, acked } = ev {
                let _ = ack_tx.send((node, acked.resource_version));
            }
        }
    });

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.context("stdin")? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["WAIT_CONNECTED", n] => {
                let n: usize = n.parse()?;
                let start = Instant::now();
                while handle.connected_count() < n {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                println!(
                    "CONNECTED {} {}",
                    handle.connected_count(),
                    start.elapsed().as_millis()
                );
            }
            ["FANOUT", n, rv] => {
                let n: usize = n.parse()?;
                let start = Instant::now();
                for i in 0..n {
                    let node = sim_node(i);
                    let msg = Message::new(
                        "edgecontroller",
                        "resource",
                        Operation::Update,
                        format!("node/{node}/default/configmap/bench"),
                        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": "bench", "namespace": "default", "uid": "bench-uid", "resourceVersion": rv},
                            "data": {"key": "value"}}),
                    )
                    .with_resource_version(*rv);
                    let key = ObjectKey {
                        kind: "configmap".into(),
                        namespace: Some("default".into()),
                        name: "bench".into(),
                        uid: "bench-uid".into(),
                    };
                    handle.enqueue(Some(key), msg)?;
                }
                let mut acked = HashSet::new();
                while acked.len() < n {
                    let Some((node, got_rv)) = ack_rx.recv().await else {
                        break;
                    };
                    if got_rv == *rv {
                        acked.insert(node);
                    }
                }
                println!(
                    "FANOUT_DONE {} {}",
                    acked.len(),
                    start.elapsed().as_millis()
                );
            }
            [] => {}
            other => eprintln!("hubbench: unknown command {other:?}"),
        }
    }
    shutdown.cancel();
    Ok(())
}

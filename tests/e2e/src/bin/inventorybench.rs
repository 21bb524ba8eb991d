//! Inventory benchmark: what the edge's inventory costs on every connect, for a node holding N
//! objects (N pods, created in the test API server and delivered through the real link into a
//! real SQLite store).
//!
//! Per N: the bytes and chunks of the inventory, the time to read it from SQLite, and the time
//! of a reconnect that carries it — from starting the EdgeHub to cloudcore's edgecontroller having
//! compared it with what the node must hold — next to the same reconnect without an inventory
//! (the floor: TLS + WebSocket handshake, nothing re-sent either way). Medians of 5.
//!
//! ```sh
//! cargo run --release -p kedge-e2e --bin inventorybench -- --objects 1000 --objects 10000
//! ```

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use cloudcore::cloudhub::certs;
use cloudcore::edgecontroller::EdgeControllerSettings;
use cloudcore::server::RunningCloudCore;
use edgecore::edgehub::credentials::NodeCredentials;
use edgecore::edgehub::{EdgeHub, EdgeHubSettings};
use edgecore::metamanager::sqlite::{SqliteOutbox, SqliteStore};
use edgecore::metamanager::store::ObjectStore;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kedge_e2e::apiserver::TestApiServer;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const NODE: &str = "edge-bench";
const ROUNDS: usize = 5;

#[derive(Parser)]
struct Args {
    /// Objects the node holds (repeatable).
    #[arg(long = "objects", default_values_t = [1000, 10000])]
    objects: Vec<usize>,
}

struct Bench {
    _api: TestApiServer,
    client: kube::Client,
    cloud: RunningCloudCore,
    creds: NodeCredentials,
    store: SqliteStore,
    outbox: Arc<SqliteOutbox>,
    _dir: tempfile::TempDir,
}

impl Bench {
    async fn start() -> anyhow::Result<Bench> {
        let api = TestApiServer::start().await?;
        let client = api.client()?;
        api.create_namespace("kubeedge").await?;
        let dir = tempfile::tempdir()?;
        let pki = Arc::new(certs::load_or_create_in_dir(
            &dir.path().join("pki"),
            &["127.0.0.1".to_owned()],
        )?);
        let opts = kedge_e2e::cloud::cloudcore_options(
            "127.0.0.1:0".parse()?,
            EdgeControllerSettings::default(),
            None,
        );
        let cloud = cloudcore::server::start(client.clone(), pki.clone(), opts).await?;
        let creds = kedge_e2e::cloud::cluster_node_credentials(&client, &pki.ca, NODE).await?;
        let store = SqliteStore::open(&dir.path().join("edge.db")).await?;
        let outbox = Arc::new(SqliteOutbox::new(&store).await?);
        Ok(Bench {
            _api: api,
            client,
            cloud,
            creds,
            store,
            outbox,
            _dir: dir,
        })
    }

    /// Runs an EdgeHub on the node's store until the returned token is cancelled.
    fn connect(&self, inventory: bool) -> CancellationToken {
        let mut settings = EdgeHubSettings::new(self.cloud.websocket_addr.to_string(), NODE);
        settings.inventory = inventory;
        settings.backoff_initial = Duration::from_millis(10);
        settings.backoff_max = Duration::from_millis(50);
        let hub = EdgeHub::new(
            settings,
            Arc::new(RwLock::new(self.creds.clone())),
            Arc::new(self.store.clone()),
            self.outbox.clone(),
        );
        let stop = CancellationToken::new();
        tokio::spawn(hub.run(stop.clone()));
        stop
    }

    async fn wait(&self, what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !cond() {
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    async fn pods_stored(&self) -> anyhow::Result<usize> {
        Ok(self.store.list(Some("pod"), None).await?.0.len())
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn run(n: usize) -> anyhow::Result<()> {
    let b = Bench::start().await?;
    let link = b.connect(true);
    let hub = b.cloud.hub.clone();
    b.wait("the node to connect", || hub.is_connected(NODE))
        .await?;
    let pods: Api<Pod> = Api::default_namespaced(b.client.clone());
    futures_util::stream::iter(0..n)
        .for_each_concurrent(64, |i| {
            let pods = pods.clone();
            async move {
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("p{i:06}"), "labels": {"app": "bench"}},
                    "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "busybox"}]}
                }))
                .unwrap_or_default();
                if let Err(e) = pods.create(&PostParams::default(), &pod).await {
                    eprintln!("create p{i}: {e}");
                }
            }
        })
        .await;
    let t = Instant::now();
    while b.pods_stored().await? < n || hub.outstanding(NODE) > 0 {
        if t.elapsed() > Duration::from_secs(300) {
            bail!("pods did not reach the edge");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    link.cancel();
    b.wait("the node to disconnect", || !hub.is_connected(NODE))
        .await?;

    // The inventory itself: read from SQLite, chunked under the default 8 MiB message limit.
    let mut reads = Vec::new();
    let mut items = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        items = b.store.inventory().await?;
        reads.push(t.elapsed());
    }
    // The same read without the covering index, for comparison (then put back).
    let mut conn = b.store.pool().acquire().await?;
    sqlx::query("DROP INDEX objects_inventory")
        .execute(&mut *conn)
        .await?;
    let mut unindexed = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        b.store.inventory().await?;
        unindexed.push(t.elapsed());
    }
    sqlx::query("CREATE INDEX objects_inventory ON objects (deleted, kind, namespace, name, uid, resource_version)")
        .execute(&mut *conn)
        .await?;
    drop(conn);
    let msgs = kedge_common::inventory::to_messages(
        &items,
        kedge_common::message::DEFAULT_MAX_MESSAGE_BYTES,
    )?;
    let bytes: usize = msgs.iter().map(|m| m.to_json().len()).sum();

    let stats = b.cloud.stats.clone();
    let mut with = Vec::new();
    let mut without = Vec::new();
    let queued_before = stats.queued.load(Ordering::Relaxed);
    for _ in 0..ROUNDS {
        // With the inventory: until the edgecontroller has reconciled it.
        let done = stats.inventories_reconciled.load(Ordering::Relaxed);
        let t = Instant::now();
        let link = b.connect(true);
        b.wait("the inventory to be reconciled", || {
            stats.inventories_reconciled.load(Ordering::Relaxed) > done
        })
        .await?;
        with.push(t.elapsed());
        link.cancel();
        b.wait("disconnect", || !hub.is_connected(NODE)).await?;
        // Without: until the session is up (nothing is due either way).
        let t = Instant::now();
        let link = b.connect(false);
        b.wait("the node to connect", || hub.is_connected(NODE))
            .await?;
        without.push(t.elapsed());
        link.cancel();
        b.wait("disconnect", || !hub.is_connected(NODE)).await?;
    }
    let resent = stats.queued.load(Ordering::Relaxed) - queued_before;
    let held = items.len();
    println!(
        "{n} pods ({held} objects with the Node): inventory {bytes} bytes ({:.1} bytes/object) in {} chunk(s); read from SQLite {:.1} ms ({:.1} ms without the covering index)",
        bytes as f64 / held.max(1) as f64,
        msgs.len(),
        ms(median(reads)),
        ms(median(unindexed))
    );
    println!(
        "  reconnect with inventory (connect .. reconciled): {:.1} ms; without: {:.1} ms; objects re-sent over {} reconnects: {resent}",
        ms(median(with)),
        ms(median(without)),
        ROUNDS * 2
    );
    if b.pods_stored().await? != n {
        bail!("the edge lost pods");
    }
    b.cloud.stop().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kedge_common::tls::install_crypto_provider();
    let args = Args::parse();
    for n in args.objects {
        if let Err(e) = run(n).await {
            anyhow::bail!("{n} objects: {e:?}");
        }
    }
    Ok(())
}

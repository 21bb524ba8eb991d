//! How fast an edge node is back after the cloud becomes reachable again.
//!
//! One EdgeHub (default settings: backoff 200 ms doubling to a 2 s cap, with jitter) talks to
//! cloudhub through a proxy. Each trial: the proxy cuts the link and refuses connections for
//! `--outage` seconds (the node keeps retrying), then accepts again; we measure from that moment
//! to the node's `Connected` state.
//!
//! ```sh
//! cargo run --release -p kedge-e2e --bin reconnectbench -- --trials 20 --outage 5
//! ```

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use clap::Parser;
use cloudcore::cloudhub::HubSettings;
use edgecore::edgehub::outbox::MemoryOutbox;
use edgecore::edgehub::{EdgeHub, EdgeHubSettings, LinkState};
use edgecore::metamanager::store::MemoryStore;
use kedge_e2e::cloud::TestCloud;
use kedge_e2e::proxy::ChaosProxy;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Seconds the cloud stays unreachable in each trial.
    #[arg(long, default_value_t = 5.0)]
    outage: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cloud = TestCloud::start(HubSettings::default()).await?;
    let proxy = ChaosProxy::start(cloud.websocket_addr).await?;
    let creds = cloud.node_credentials("edge-reconnect")?;
    let settings = EdgeHubSettings::new(proxy.addr().to_string(), "edge-reconnect");
    let hub = EdgeHub::new(
        settings,
        Arc::new(RwLock::new(creds)),
        Arc::new(MemoryStore::new()),
        Arc::new(MemoryOutbox::new()),
    );
    let mut link = hub.link_state();
    let stop = CancellationToken::new();
    tokio::spawn(hub.run(stop.clone()));
    link.wait_for(|s| *s == LinkState::Connected).await?;

    let mut samples = Vec::with_capacity(args.trials);
    for _ in 0..args.trials {
        proxy.set_refusing(true);
        proxy.cut_all();
        link.wait_for(|s| *s == LinkState::Disconnected).await?;
        tokio::time::sleep(Duration::from_secs_f64(args.outage)).await;
        let back = Instant::now();
        proxy.set_refusing(false);
        link.wait_for(|s| *s == LinkState::Connected).await?;
        samples.push(back.elapsed());
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = samples[samples.len() / 2];
    let max = samples[samples.len() - 1];
    let mean = samples.iter().map(|d| ms(*d)).sum::<f64>() / samples.len() as f64;
    println!(
        "reconnect after a {:.0} s outage, {} trials: median {:.0} ms, mean {:.0} ms, max {:.0} ms",
        args.outage,
        samples.len(),
        ms(median),
        mean,
        ms(max)
    );
    stop.cancel();
    Ok(())
}

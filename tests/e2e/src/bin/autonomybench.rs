//! Autonomy benchmark: an edge node with two running pods loses its cloud for `--outage`
//! seconds (cloudcore killed; the cluster marks the node Unknown and taints it, as the node
//! lifecycle controller does); then cloudcore starts again. Measured from cloudcore's start
//! (so it includes cloudcore's own start-up) to the Node Ready and both pods Ready in the API,
//! over `--trials` outages. Also checks nothing was evicted or restarted.
//!
//! ```sh
//! cargo build --release -p cloudcore -p edgecore -p kedge-e2e --bins
//! ./target/release/autonomybench --outage 60 --trials 10
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::{Node, Pod};
use kedge_e2e::edgerig::Rig;
use kube::api::{Api, PostParams};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Seconds the cloud stays away in each trial.
    #[arg(long, default_value_t = 60)]
    outage: u64,
    #[arg(long, default_value_t = 10)]
    trials: usize,
}

const NODE: &str = "edge-autonomy";
const PODS: [&str; 2] = ["web", "worker"];

fn ready(conditions: Option<&Vec<k8s_openapi::api::core::v1::NodeCondition>>) -> bool {
    conditions.is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "p50 {:.0} ms, max {:.0} ms",
        at(0.5).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rig = Rig::start(NODE).await;
    let pods: Api<Pod> = Api::default_namespaced(rig.client.clone());
    let nodes: Api<Node> = Api::all(rig.client.clone());
    for name in PODS {
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name},
                "spec": {"nodeName": NODE, "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "main", "image": rig.ctr.busybox_image, "command": ["sh", "-c", "exec sleep 36000"]}]}}))?,
        )
        .await?;
    }
    let all_ready = || async {
        let mut ok = true;
        for n in PODS {
            ok &= pods.get(n).await.is_ok_and(|p| pod_ready(&p));
        }
        ok
    };
    let t = Instant::now();
    while !all_ready().await {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("pods not Ready\n{}", rig.setup.log_tails(40));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let uids: Vec<String> = {
        let mut v = Vec::new();
        for n in PODS {
            v.push(pods.get(n).await?.metadata.uid.context("uid")?);
        }
        v
    };
    let mut cloud = rig.cloud;
    let (mut node_times, mut pod_times) = (Vec::new(), Vec::new());
    for trial in 0..args.trials {
        cloud.kill();
        let evicted = rig
            ._server
            .evict_unreachable(NODE, Duration::from_secs(args.outage))?;
        if !evicted.is_empty() {
            bail!("evicted: {evicted:?}");
        }
        tokio::time::sleep(Duration::from_secs(args.outage)).await;
        let t = Instant::now();
        cloud.start()?;
        let mut node_at = None;
        loop {
            if node_at.is_none()
                && ready(
                    nodes
                        .get(NODE)
                        .await?
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref()),
                )
            {
                node_at = Some(t.elapsed());
            }
            if node_at.is_some() && all_ready().await {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("not back within 60 s\n{}", rig.setup.log_tails(40));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let pods_at = t.elapsed();
        println!(
            "trial {}: node Ready {:.0} ms, pods Ready {:.0} ms after cloudcore started",
            trial + 1,
            node_at.unwrap_or_default().as_secs_f64() * 1e3,
            pods_at.as_secs_f64() * 1e3
        );
        node_times.push(node_at.unwrap_or_default());
        pod_times.push(pods_at);
    }
    for (n, uid) in PODS.iter().zip(&uids) {
        let p = pods.get(n).await?;
        let restarts = p
            .status
            .and_then(|s| s.container_statuses)
            .map_or(-1, |c| c[0].restart_count);
        if p.metadata.uid.as_ref() != Some(uid) || restarts != 0 {
            bail!("{n} was re-created or restarted (restarts {restarts})");
        }
    }
    println!(
        "{} outages of {} s: node Ready {}; pods Ready {} (same pod objects, no restarts)",
        args.trials,
        args.outage,
        percentiles(node_times),
        percentiles(pod_times)
    );
    Ok(())
}

//! Device benchmark: one edge node with `--devices` devices (the shipped cloudcore and edgecore,
//! the test API server, the embedded MQTT broker, a mapper made of an MQTT client here).
//!
//! - desired → delta: a Device's desired setpoint patched in the API until the mapper receives
//!   the delta (p50/p99 over `--samples`);
//! - publish → DeviceStatus: one reported value published by the mapper until a watch on
//!   DeviceStatus shows it (p50/p99 over `--samples`);
//! - throughput: `--updates` reported values published as fast as the mapper can, round-robin
//!   over the devices, until every DeviceStatus shows its device's last value (values of one
//!   property may coalesce on the way; the last one must arrive);
//! - edgecore RSS: with the broker and the devices after the run, against the same node with
//!   the EventBus off (no broker, no devices) measured first.
//!
//! ```sh
//! cargo build --release -p cloudcore -p edgecore -p kedge-e2e --bins
//! ./target/release/devicebench --devices 100 --updates 10000 --samples 100
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kedge_common::crd::{Device, DeviceModel, DeviceStatus, all_crds};
use kedge_e2e::apiserver::TestApiServer;
use kedge_e2e::daemons::{Daemon, Setup};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100)]
    devices: usize,
    #[arg(long, default_value_t = 10_000)]
    updates: usize,
    #[arg(long, default_value_t = 100)]
    samples: usize,
    /// Seconds of steady load (every device reports once a second) before the RSS is taken.
    #[arg(long, default_value_t = 20)]
    steady_seconds: usize,
    /// Use a mosquitto started here (`mqttMode: 2`) instead of the embedded broker, to tell
    /// the broker's share of edgecore's memory from DeviceTwin's.
    #[arg(long)]
    external_broker: bool,
}

const NODE: &str = "edge-devices";
/// The baseline node (no EventBus): a name of its own, since a joined name is owned by its first
/// machine and a second join with a token is refused.
const BASELINE_NODE: &str = "edge-baseline";

fn dev_name(i: usize) -> String {
    format!("thermo-{i:03}")
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3
    )
}

/// Median VmRSS (KiB) of 5 samples a second apart.
async fn rss(d: &Daemon) -> anyhow::Result<u64> {
    let pid = d.pid().context("daemon not running")?;
    let mut v = Vec::new();
    for _ in 0..5 {
        v.push(kedge_e2e::procfs::rss_kb(pid).0);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    v.sort();
    Ok(v[2])
}

async fn start(
    server: &TestApiServer,
    dir: &std::path::Path,
    node: &str,
    eventbus: bool,
    external: Option<u16>,
) -> anyhow::Result<(Setup, Daemon, Daemon)> {
    let setup = Setup::write(dir, server.kubeconfig_path(), node)?;
    if let Some(port) = external {
        setup.use_external_broker(port)?;
    }
    if !eventbus {
        let text = std::fs::read_to_string(&setup.edgecore_config)?;
        let text = text.replace(
            &format!(
                "  eventBus:\n    mqttServerInternal: tcp://127.0.0.1:{}\n",
                setup.mqtt_port
            ),
            "  eventBus:\n    enable: false\n",
        );
        std::fs::write(&setup.edgecore_config, text)?;
    }
    let (cloud, edge) = setup.start_both().await?;
    let nodes: Api<Node> = Api::all(server.client()?);
    let t = Instant::now();
    while nodes.get_opt(node).await?.is_none() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("node not registered\n{}", setup.log_tails(30));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((setup, cloud, edge))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    kedge_common::tls::install_crypto_provider();
    let server = TestApiServer::start().await?;
    let client = server.client()?;
    server.create_namespace("kubeedge").await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in all_crds() {
        crds.create(&PostParams::default(), &crd).await?;
    }

    // Baseline: the same node without EventBus and devices.
    let base_dir = tempfile::tempdir()?;
    let (_s, mut c0, mut e0) = start(&server, base_dir.path(), BASELINE_NODE, false, None).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_base = rss(&e0).await?;
    e0.kill();
    c0.kill();

    let dir = tempfile::tempdir()?;
    let mut mosquitto = None;
    let external = if args.external_broker {
        let port = kedge_e2e::procfs::free_port()?;
        mosquitto = Some(
            std::process::Command::new("/usr/sbin/mosquitto")
                .args(["-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("mosquitto (apt-get install mosquitto)")?,
        );
        Some(port)
    } else {
        None
    };
    let (setup, _cloud, edge) = start(&server, dir.path(), NODE, true, external).await?;
    let broker_port = external.unwrap_or(setup.mqtt_port);
    let models: Api<DeviceModel> = Api::namespaced(client.clone(), "default");
    let devices: Api<Device> = Api::namespaced(client.clone(), "default");
    let statuses: Api<DeviceStatus> = Api::namespaced(client.clone(), "default");
    models
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "thermometer", "namespace": "default"},
                "spec": {"properties": [
                    {"name": "temperature", "type": "DOUBLE", "accessMode": "ReadOnly"},
                    {"name": "setpoint", "type": "INT", "accessMode": "ReadWrite", "minimum": "0", "maximum": "100000"}]}
            }))?,
        )
        .await?;

    // The mapper: every publish it receives goes to `rx` with its arrival time.
    let mut opts = MqttOptions::new("bench-mapper", "127.0.0.1", broker_port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts.set_inflight(1000);
    let (mqtt, mut events) = AsyncClient::new(opts, 10_000);
    // As a mapper should: small packets, no Nagle delay.
    let mut network = events.network_options();
    network.set_tcp_nodelay(true);
    events.set_network_options(network);
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Value, Instant)>();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    if tx.send((p.topic, v, Instant::now())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    mqtt.subscribe("$hw/events/device/+/+/twin/update/delta", QoS::AtLeastOnce)
        .await?;
    for i in 0..args.devices {
        devices
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": dev_name(i), "namespace": "default"},
                    "spec": {"deviceModelRef": {"name": "thermometer"}, "nodeName": NODE, "properties": [
                        {"name": "temperature"}, {"name": "setpoint", "desired": {"value": "20"}}]}
                }))?,
            )
            .await?;
    }
    // Every device's first delta: all devices are on the edge.
    let mut seen = std::collections::HashSet::new();
    let t = Instant::now();
    while seen.len() < args.devices {
        let left = Duration::from_secs(60).saturating_sub(t.elapsed());
        let Ok(Some((topic, _, _))) = tokio::time::timeout(left, rx.recv()).await else {
            bail!(
                "only {} devices reached the mapper\n{}",
                seen.len(),
                setup.log_tails(30)
            );
        };
        seen.insert(topic);
    }
    println!(
        "{} devices on the edge after {:.1} s",
        args.devices,
        t.elapsed().as_secs_f64()
    );

    // Watch DeviceStatus: (device, temperature) with arrival time.
    let (stx, mut srx) = mpsc::unbounded_channel::<(String, String, Instant)>();
    let wapi = statuses.clone();
    tokio::spawn(async move {
        let mut s = std::pin::pin!(watcher(wapi, watcher::Config::default()).applied_objects());
        while let Some(ev) = s.next().await {
            let Ok(ds) = ev else { continue };
            let name = ds.metadata.name.clone().unwrap_or_default();
            let temp = ds.status.and_then(|s| {
                s.twins
                    .into_iter()
                    .find(|t| t.property_name.as_deref() == Some("temperature"))
                    .and_then(|t| t.reported.map(|r| r.value))
            });
            if let Some(temp) = temp
                && stx.send((name, temp, Instant::now())).is_err()
            {
                return;
            }
        }
    });

    // desired → delta.
    while rx.try_recv().is_ok() {}
    let mut delta_lat = Vec::new();
    for i in 0..args.samples {
        let name = dev_name(i % args.devices);
        let value = (1000 + i).to_string();
        let patch = json!({"spec": {"properties": [{"name": "temperature"}, {"name": "setpoint", "desired": {"value": value}}]}});
        let t0 = Instant::now();
        devices
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        loop {
            let Ok(Some((topic, v, at))) =
                tokio::time::timeout(Duration::from_secs(30), rx.recv()).await
            else {
                bail!("no delta for {name}\n{}", setup.log_tails(30));
            };
            if topic.contains(&format!("/{name}/")) && v["delta"]["setpoint"] == value.as_str() {
                delta_lat.push(at - t0);
                break;
            }
        }
    }
    println!(
        "desired -> delta ({} samples): {}",
        args.samples,
        percentiles(delta_lat)
    );

    let publish = |name: String, value: String| {
        let mqtt = mqtt.clone();
        async move {
            let body =
                json!({"event_id": "", "twin": {"temperature": {"actual": {"value": value}}}});
            mqtt.publish(
                format!("$hw/events/device/default/{name}/twin/update"),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&body).unwrap_or_default(),
            )
            .await
        }
    };

    // publish → DeviceStatus, one at a time.
    let mut status_lat = Vec::new();
    for i in 0..args.samples {
        let name = dev_name(i % args.devices);
        let value = format!("{}.5", 100 + i);
        let t0 = Instant::now();
        publish(name.clone(), value.clone()).await?;
        loop {
            let Ok(Some((n, v, at))) =
                tokio::time::timeout(Duration::from_secs(30), srx.recv()).await
            else {
                bail!(
                    "{name}={value} never reached DeviceStatus\n{}",
                    setup.log_tails(30)
                );
            };
            if n == name && v == value {
                status_lat.push(at - t0);
                break;
            }
        }
    }
    println!(
        "publish -> DeviceStatus ({} samples): {}",
        args.samples,
        percentiles(status_lat)
    );

    // Steady load, as a node's mappers make it: every device reports once a second.
    for round in 0..args.steady_seconds {
        let t = Instant::now();
        for i in 0..args.devices {
            publish(dev_name(i), format!("{}.75", 500 + round)).await?;
        }
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(t.elapsed())).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_steady = rss(&edge).await?;

    // Throughput.
    while srx.try_recv().is_ok() {}
    let mut last: HashMap<String, String> = HashMap::new();
    let t0 = Instant::now();
    for k in 0..args.updates {
        let name = dev_name(k % args.devices);
        let value = format!("{}.25", 10_000 + k);
        last.insert(name.clone(), value.clone());
        publish(name, value).await?;
    }
    let published = t0.elapsed();
    let mut pending: HashMap<String, String> = last.clone();
    let mut arrived = 0usize;
    while !pending.is_empty() {
        let Ok(Some((n, v, _))) = tokio::time::timeout(Duration::from_secs(60), srx.recv()).await
        else {
            bail!(
                "{} devices never showed their last value\n{}",
                pending.len(),
                setup.log_tails(30)
            );
        };
        arrived += 1;
        if pending.get(&n) == Some(&v) {
            pending.remove(&n);
        }
    }
    let total = t0.elapsed();
    println!(
        "throughput: {} updates over {} devices published in {:.2} s, all in DeviceStatus after {:.2} s = {:.0} updates/s end to end ({} DeviceStatus writes seen: latest value per property coalesces)",
        args.updates,
        args.devices,
        published.as_secs_f64(),
        total.as_secs_f64(),
        args.updates as f64 / total.as_secs_f64(),
        arrived
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_dev = rss(&edge).await?;
    let mib = |kb: u64| kb as f64 / 1024.0;
    let broker = if args.external_broker {
        "an external broker"
    } else {
        "the embedded broker"
    };
    println!(
        "edgecore RSS: {:.1} MiB without EventBus; with {broker} and {} devices: {:.1} MiB (+{:.1}) after {} s of one report per device per second, {:.1} MiB (+{:.1}) after the {}-update burst",
        mib(rss_base),
        args.devices,
        mib(rss_steady),
        mib(rss_steady) - mib(rss_base),
        args.steady_seconds,
        mib(rss_dev),
        mib(rss_dev) - mib(rss_base),
        args.updates
    );
    if let Ok(secs) = std::env::var("DEVICEBENCH_HOLD_SECONDS") {
        // Keep the daemons for inspection (e.g. /proc/<pid>/smaps).
        println!("edgecore pid {:?}; holding {secs} s", edge.pid());
        tokio::time::sleep(Duration::from_secs(secs.parse().unwrap_or(60))).await;
    }
    if let Some(mut m) = mosquitto {
        let _ = m.kill();
        let _ = m.wait();
    }
    Ok(())
}

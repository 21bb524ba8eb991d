//! A simulated device mapper: thermometers with a writable setpoint, speaking KubeEdge's MQTT
//! topics, so a twin moves without hardware (tests, benchmarks, `hack/local-up.sh`).
//!
//! For each device (`<namespace>/<name>`) it reports `online`, takes the desired `setpoint` from
//! the twin deltas edgecore publishes (and from `twin/get` at start, for a value set while it was
//! away), and every interval reports `temperature` — drifting half a degree towards the setpoint —
//! and the `setpoint` it applied. Use with a DeviceModel that has `temperature` (DOUBLE,
//! ReadOnly) and `setpoint` (INT, ReadWrite), as in `build/examples/thermometer.yaml`.
//!
//! ```sh
//! thermometer-mapper --broker tcp://127.0.0.1:1883 --device default/thermo-1
//! ```

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Simulated thermometers with a writable setpoint, over KubeEdge's MQTT topics")]
struct Args {
    /// The broker edgecore uses (its embedded one by default).
    #[arg(long, default_value = "tcp://127.0.0.1:1883")]
    broker: String,
    /// A device as `<namespace>/<name>`; repeat for more.
    #[arg(long = "device", required = true)]
    devices: Vec<String>,
    /// Milliseconds between reports.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
}

struct Thermo {
    temperature: f64,
    setpoint: i64,
}

fn setpoint_of(v: &Value) -> Option<i64> {
    // A delta carries {"delta": {"setpoint": "25"}}; a twin document {"twin": {"setpoint":
    // {"expected": {"value": "25"}}}}.
    v["delta"]["setpoint"]
        .as_str()
        .or_else(|| v["twin"]["setpoint"]["expected"]["value"].as_str())
        .and_then(|s| s.parse().ok())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (host, port) = edgecore::eventbus::parse_server("--broker", &args.broker)?;
    let mut opts = MqttOptions::new(
        format!("thermometer-mapper-{}", std::process::id()),
        host,
        port,
    );
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 1024);
    let mut devices: HashMap<String, Thermo> = args
        .devices
        .iter()
        .map(|d| {
            (
                d.clone(),
                Thermo {
                    temperature: 20.0,
                    setpoint: 20,
                },
            )
        })
        .collect();
    for id in &args.devices {
        anyhow::ensure!(
            kedge_common::devices::split_device_id(id).is_some(),
            "--device {id}: expected <namespace>/<name>"
        );
    }
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms.max(10)));
    loop {
        tokio::select! {
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for id in &args.devices {
                        let base = format!("$hw/events/device/{id}");
                        client.subscribe(format!("{base}/twin/update/delta"), QoS::AtLeastOnce).await?;
                        client.subscribe(format!("{base}/twin/get/result"), QoS::AtLeastOnce).await?;
                        client.publish(format!("{base}/state/update"), QoS::AtLeastOnce, false,
                            serde_json::to_vec(&json!({"event_id": "", "state": "online"}))?).await?;
                        client.publish(format!("{base}/twin/get"), QoS::AtLeastOnce, false,
                            serde_json::to_vec(&json!({"event_id": ""}))?).await?;
                    }
                    eprintln!("connected to {}; {} device(s)", args.broker, args.devices.len());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Some(id) = p.topic.strip_prefix("$hw/events/device/")
                        .and_then(|r| r.split("/twin/").next()) else { continue };
                    let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else { continue };
                    if let (Some(t), Some(sp)) = (devices.get_mut(id), setpoint_of(&v)) {
                        if t.setpoint != sp {
                            eprintln!("{id}: setpoint {} -> {sp}", t.setpoint);
                        }
                        t.setpoint = sp;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("broker: {e}; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            _ = tick.tick() => {
                for (id, t) in devices.iter_mut() {
                    let target = t.setpoint as f64;
                    t.temperature += (target - t.temperature).clamp(-0.5, 0.5);
                    let body = json!({"event_id": "", "twin": {
                        "temperature": {"actual": {"value": format!("{:.1}", t.temperature)}},
                        "setpoint": {"actual": {"value": t.setpoint.to_string()}}}});
                    client
                        .publish(format!("$hw/events/device/{id}/twin/update"), QoS::AtLeastOnce, false, serde_json::to_vec(&body)?)
                        .await
                        .context("publishing")?;
                }
            }
        }
    }
}

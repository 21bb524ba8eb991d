//! The node's status as a kubelet posts it: capacity and allocatable, nodeInfo, addresses and the
//! Ready/MemoryPressure/DiskPressure/PIDPressure conditions — reported through the outbox when it
//! changes and at least every `nodeStatusUpdateFrequency`, so the Node shows `Ready` while the
//! link is up (and the last status is delivered when it comes back).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kedge_common::{Message, Operation};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::pressure::{NodeSignals, Pressure, Readings};
use crate::edgehub::outbox::Outbox;

/// What the node reports about itself, gathered once at start (and where its pressure signals
/// are read at each report).
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    pub name: String,
    pub host_ip: String,
    pub cpus: usize,
    pub memory_bytes: i64,
    pub max_pods: u32,
    pub kernel_version: String,
    pub os_image: String,
    pub architecture: String,
    pub machine_id: String,
    pub boot_id: String,
    /// `containerd://1.6.20`
    pub container_runtime_version: String,
    /// `modules.edged.nodeLabels`: added to the Node's labels (never removed, as a kubelet's
    /// `--node-labels`; cloudcore applies only those a node may set on itself).
    pub labels: BTreeMap<String, String>,
    /// Memory and disk signals for the pressure conditions and `ephemeral-storage` (nothing is
    /// read where no path is set).
    pub signals: NodeSignals,
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl NodeFacts {
    /// Reads this machine's facts from `/proc` and `/etc`.
    pub fn gather(name: &str, host_ip: &str, runtime: &str, runtime_version: &str) -> NodeFacts {
        let os_image = std::fs::read_to_string("/etc/os-release")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_else(|| "Linux".to_owned());
        NodeFacts {
            name: name.to_owned(),
            host_ip: host_ip.to_owned(),
            cpus: super::node::cpus(),
            memory_bytes: super::node::memory_bytes(),
            max_pods: 110,
            kernel_version: read_trimmed("/proc/sys/kernel/osrelease"),
            os_image,
            // Go's names, as nodeInfo and the kubernetes.io/arch label use them.
            architecture: match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                "arm" => "arm",
                other => other,
            }
            .to_owned(),
            machine_id: read_trimmed("/etc/machine-id"),
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            container_runtime_version: format!("{runtime}://{runtime_version}"),
            labels: BTreeMap::new(),
            signals: NodeSignals::default(),
        }
    }
}

fn condition(kind: &str, status: &str, reason: &str, message: &str, now: &Time) -> NodeCondition {
    NodeCondition {
        type_: kind.to_owned(),
        status: status.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    }
}

/// The status for `facts` at `now`, with the pressure signals read now.
pub fn node_status(facts: &NodeFacts, now: &Time) -> NodeStatus {
    let (readings, pressure) = facts.signals.sample(std::time::Instant::now());
    node_status_with(facts, &readings, pressure, now)
}

/// What pods may use, as the kubelet computes it with no reservations configured: capacity
/// less the hard eviction thresholds (`memory.available<100Mi`, `nodefs.available<10%`).
fn allocatable(
    facts: &NodeFacts,
    readings: &Readings,
    capacity: &BTreeMap<String, Quantity>,
) -> BTreeMap<String, Quantity> {
    let mut allocatable = capacity.clone();
    let memory = u64::try_from(facts.memory_bytes)
        .unwrap_or(0)
        .saturating_sub(super::pressure::MEMORY_AVAILABLE_MIN);
    allocatable.insert(
        "memory".to_owned(),
        Quantity(format!("{}Ki", memory / 1024)),
    );
    if let Some(nodefs) = readings.nodefs {
        let usable = nodefs.capacity - nodefs.capacity / 10;
        allocatable.insert(
            "ephemeral-storage".to_owned(),
            Quantity(format!("{}Ki", usable / 1024)),
        );
    }
    allocatable
}

/// The status for `facts` with these readings and conditions.
pub fn node_status_with(
    facts: &NodeFacts,
    readings: &Readings,
    pressure: Pressure,
    now: &Time,
) -> NodeStatus {
    let mut capacity: BTreeMap<String, Quantity> = BTreeMap::from([
        ("cpu".to_owned(), Quantity(facts.cpus.to_string())),
        (
            "memory".to_owned(),
            Quantity(format!("{}Ki", facts.memory_bytes / 1024)),
        ),
        ("pods".to_owned(), Quantity(facts.max_pods.to_string())),
    ]);
    if let Some(nodefs) = readings.nodefs {
        capacity.insert(
            "ephemeral-storage".to_owned(),
            Quantity(format!("{}Ki", nodefs.capacity / 1024)),
        );
    }
    let mut addresses = Vec::new();
    if !facts.host_ip.is_empty() {
        addresses.push(NodeAddress {
            type_: "InternalIP".to_owned(),
            address: facts.host_ip.clone(),
        });
    }
    addresses.push(NodeAddress {
        type_: "Hostname".to_owned(),
        address: facts.name.clone(),
    });
    NodeStatus {
        allocatable: Some(allocatable(facts, readings, &capacity)),
        capacity: Some(capacity),
        addresses: Some(addresses),
        conditions: Some(vec![
            if pressure.memory {
                condition(
                    "MemoryPressure",
                    "True",
                    "KubeletHasInsufficientMemory",
                    "kedge has insufficient memory available",
                    now,
                )
            } else {
                condition(
                    "MemoryPressure",
                    "False",
                    "KubeletHasSufficientMemory",
                    "kedge has sufficient memory available",
                    now,
                )
            },
            if pressure.disk {
                condition(
                    "DiskPressure",
                    "True",
                    "KubeletHasDiskPressure",
                    "kedge has disk pressure",
                    now,
                )
            } else {
                condition(
                    "DiskPressure",
                    "False",
                    "KubeletHasNoDiskPressure",
                    "kedge has no disk pressure",
                    now,
                )
            },
            condition(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "kedge has sufficient PID available",
                now,
            ),
            condition(
                "Ready",
                "True",
                "KubeletReady",
                "kedge edged is posting ready status",
                now,
            ),
        ]),
        node_info: Some(NodeSystemInfo {
            architecture: facts.architecture.clone(),
            boot_id: facts.boot_id.clone(),
            container_runtime_version: facts.container_runtime_version.clone(),
            kernel_version: facts.kernel_version.clone(),
            kube_proxy_version: String::new(),
            kubelet_version: format!("kedge-v{}", env!("CARGO_PKG_VERSION")),
            machine_id: facts.machine_id.clone(),
            operating_system: "linux".to_owned(),
            os_image: facts.os_image.clone(),
            system_uuid: facts.machine_id.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Keeps earlier transition times of conditions whose status did not change.
fn carry_transitions(previous: Option<&NodeStatus>, status: &mut NodeStatus) {
    let Some(prev) = previous.and_then(|p| p.conditions.as_ref()) else {
        return;
    };
    for c in status.conditions.iter_mut().flatten() {
        if let Some(p) = prev
            .iter()
            .find(|p| p.type_ == c.type_ && p.status == c.status)
        {
            c.last_transition_time = p.last_transition_time.clone();
        }
    }
}

/// The content of a `nodestatus` report: the status, and the configured labels if any.
fn status_report(facts: &NodeFacts, status: &NodeStatus) -> serde_json::Value {
    if facts.labels.is_empty() {
        json!({"status": status})
    } else {
        json!({"metadata": {"labels": facts.labels}, "status": status})
    }
}

/// Reports the node's status every `every`, and at once whenever the cloud link comes back:
/// after an outage the cluster sees the node Ready again right away (its last heartbeat is
/// old, so the node lifecycle controller has marked it Unknown), not a period later.
pub async fn report<O: Outbox>(
    facts: NodeFacts,
    outbox: Arc<O>,
    every: Duration,
    mut link: tokio::sync::watch::Receiver<crate::edgehub::LinkState>,
    cloud: tokio::sync::watch::Receiver<crate::edgehub::CloudKind>,
    shutdown: CancellationToken,
) {
    let mut previous: Option<NodeStatus> = None;
    let mut tick = tokio::time::interval(every);
    let mut link_open = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            changed = link.changed(), if link_open => {
                if changed.is_err() {
                    link_open = false;
                    continue;
                }
                if *link.borrow_and_update() != crate::edgehub::LinkState::Connected {
                    continue;
                }
                tick.reset();
            }
        }
        if *cloud.borrow() == crate::edgehub::CloudKind::KubeEdge {
            // KubeEdge's cloud takes no status reports: `kubeedge_node` patches the Node.
            continue;
        }
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let mut status = node_status(&facts, &now);
        carry_transitions(previous.as_ref(), &mut status);
        let msg = Message::new(
            "edged",
            "resource",
            Operation::Update,
            format!("null/nodestatus/{}", facts.name),
            status_report(&facts, &status),
        );
        match outbox.put("nodestatus", msg).await {
            Ok(_) => previous = Some(status),
            Err(e) => tracing::error!(error = %e, "cannot queue node status"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_node_with_its_facts() {
        let facts = NodeFacts::gather("edge-1", "192.0.2.10", "containerd", "1.6.20");
        assert!(facts.cpus >= 1 && facts.memory_bytes > 0);
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap());
        let s = node_status(&facts, &t0);
        let ready = s
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        let info = s.node_info.as_ref().unwrap();
        assert_eq!(info.container_runtime_version, "containerd://1.6.20");
        assert!(info.kubelet_version.starts_with("kedge-v"));
        assert_eq!(info.operating_system, "linux");
        assert_eq!(s.capacity.as_ref().unwrap()["pods"].0, "110");
        assert_eq!(s.addresses.as_ref().unwrap()[0].address, "192.0.2.10");
        // A later report keeps the transition time, moves the heartbeat.
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_010).unwrap());
        let mut later = node_status(&facts, &t1);
        carry_transitions(Some(&s), &mut later);
        let r = later
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(r.last_transition_time, Some(t0));
        assert_eq!(r.last_heartbeat_time, Some(t1));
    }

    #[test]
    fn pressure_and_ephemeral_storage_come_from_the_readings() {
        let facts = NodeFacts::gather("edge-1", "192.0.2.10", "containerd", "1.6.20");
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap());
        let readings = Readings {
            nodefs: Some(super::super::pressure::FsStats {
                capacity: 8 << 30,
                available: 100 << 20,
                inodes: 0,
                inodes_free: 0,
            }),
            ..Readings::default()
        };
        let s = node_status_with(
            &facts,
            &readings,
            Pressure {
                memory: false,
                disk: true,
            },
            &t0,
        );
        let cond = |t: &str| {
            s.conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == t)
                .map(|c| (c.status.clone(), c.reason.clone().unwrap()))
                .unwrap()
        };
        assert_eq!(
            cond("DiskPressure"),
            ("True".into(), "KubeletHasDiskPressure".into())
        );
        assert_eq!(
            cond("MemoryPressure"),
            ("False".into(), "KubeletHasSufficientMemory".into())
        );
        assert_eq!(cond("Ready").0, "True");
        assert_eq!(
            s.capacity.as_ref().unwrap()["ephemeral-storage"].0,
            "8388608Ki"
        );
        // Allocatable: less the hard eviction thresholds, as the kubelet's.
        let allocatable = s.allocatable.as_ref().unwrap();
        assert_eq!(allocatable["ephemeral-storage"].0, "7549747Ki");
        let memory_ki = facts.memory_bytes / 1024 - 100 * 1024;
        assert_eq!(allocatable["memory"].0, format!("{memory_ki}Ki"));
        assert_eq!(allocatable["cpu"], s.capacity.as_ref().unwrap()["cpu"]);
        // Without a readable root directory: no ephemeral-storage, no pressure.
        let s = node_status(&facts, &t0);
        assert!(!s.capacity.unwrap().contains_key("ephemeral-storage"));
    }
}

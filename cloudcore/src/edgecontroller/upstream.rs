//! Node → cluster: the Node object of a joining node, its Lease, node status and pod status.
//!
//! Reports are applied in the order a node sent them (one worker per node) and acknowledged only
//! after they were applied, so a cloudcore crash in between makes the edge send the report
//! again. That is safe because every report kind is idempotent: node and pod status are merge
//! patches of absolute values (a restart count, not an increment), and finishing a pod's deletion
//! carries the pod's UID as a precondition (a second attempt finds it gone). The edge's outbox
//! keeps only the latest report per object, so what is sent again is never older than what was
//! applied.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kedge_common::{Message, ResourcePath};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{EDGE_ROLE_LABEL, EdgeControllerSettings, Shared, Stats, kubeedge, tokens};
use crate::cloudhub::{CloudHubHandle, ReportAck};
use crate::devicecontroller::status::StatusWriter;
use kedge_common::devices::{DeviceReport, StateMessage, TwinMessage, parse_report_resource};

const LEASE_NAMESPACE: &str = "kube-node-lease";

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Retries an API call on conflicts and server errors (3 attempts, short backoff).
async fn retry<T, F, Fut>(what: &str, mut f: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match f().await {
            Ok(v) => return Ok(v),
            Err(e)
                if attempt < 3
                    && (is_status(&e, 409)
                        || matches!(&e, kube::Error::Api(s) if s.code >= 500)) =>
            {
                tracing::debug!(%what, error = %e, "retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Makes sure the Node of a connecting edge node carries the edge role label. The Node itself
/// is created by the node's join (with its ownership record); one that is gone was deleted,
/// which revokes the node, so it is never re-created here.
pub async fn ensure_node(client: kube::Client, node: String) {
    let api: Api<Node> = Api::all(client);
    let labels = json!({EDGE_ROLE_LABEL: "", "kubernetes.io/hostname": node});
    let result = match api.get_opt(&node).await {
        Ok(Some(existing)) => {
            let has_label = existing
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(EDGE_ROLE_LABEL));
            if has_label {
                return;
            }
            api.patch(
                &node,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels}})),
            )
            .await
            .map(|_| ())
        }
        Ok(None) => {
            tracing::warn!(%node, "the Node of a connected edge node is gone (deleted); not re-creating it");
            return;
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => tracing::info!(%node, "edge Node labelled"),
        Err(e) => tracing::warn!(%node, error = %e, "cannot label the edge Node"),
    }
}

/// Now as a Kubernetes `MicroTime` (RFC 3339, microseconds, UTC).
pub(crate) fn micro_time_now() -> String {
    let dt = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.microsecond()
    )
}

/// Renews the Lease of one node (creating it the first time), as its kubelet would.
pub async fn renew_lease(
    client: &kube::Client,
    node: &str,
    duration_seconds: i32,
) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let now = micro_time_now();
    let patch = json!({"spec": {"holderIdentity": node, "leaseDurationSeconds": duration_seconds, "renewTime": now}});
    match api
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 404) => {
            // Owned by the Node, so it goes away with it.
            let nodes: Api<Node> = Api::all(client.clone());
            let owner =
                nodes.get_opt(node).await?.and_then(|n| n.metadata.uid).map(
                    |uid| json!([{"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}]),
                );
            let mut lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": node, "namespace": LEASE_NAMESPACE},
                "spec": {"holderIdentity": node, "leaseDurationSeconds": duration_seconds, "renewTime": now}
            });
            if let Some(o) = owner {
                lease["metadata"]["ownerReferences"] = o;
            }
            let lease: Lease = serde_json::from_value(lease).map_err(kube::Error::SerdeError)?;
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(()),
                Err(e) if is_status(&e, 409) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Renews the Leases of connected nodes every `node_update_frequency`. A node whose link is gone
/// is not renewed, so Kubernetes marks it NotReady as usual.
pub async fn renew_leases(
    client: kube::Client,
    shared: Arc<Shared>,
    settings: EdgeControllerSettings,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(settings.node_update_frequency);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let nodes: Vec<String> = {
            let own_lease = shared.kubeedge.lock().unwrap_or_else(|p| p.into_inner());
            shared
                .connected
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|n| !own_lease.contains(*n))
                .cloned()
                .collect()
        };
        futures_util::stream::iter(nodes)
            .for_each_concurrent(32, |node| {
                let client = client.clone();
                let stats = stats.clone();
                async move {
                    match renew_lease(&client, &node, settings.lease_duration_seconds).await {
                        Ok(()) => {
                            stats.lease_renewals.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => tracing::warn!(%node, error = %e, "cannot renew Lease"),
                    }
                }
            })
            .await;
    }
}

/// A field of a report in our casing or KubeEdge's Go casing (`status` / `Status`).
fn field<'a>(v: &'a Value, lower: &str, upper: &str) -> Option<&'a Value> {
    v.get(lower).or_else(|| v.get(upper))
}

/// What became of a report: done (applied, or refused for good), or to be sent again later
/// because the API server could not take it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    RetryLater,
}

/// A failed API call: a 404 means the object is gone and the report is moot; anything else may
/// pass later.
fn outcome_of(e: &kube::Error) -> Outcome {
    if is_status(e, 404) {
        Outcome::Done
    } else {
        Outcome::RetryLater
    }
}

/// Where a node's reports are queued for its worker.
pub type ReportSender = mpsc::UnboundedSender<(Box<Message>, ReportAck)>;

/// Starts the worker that applies one node's reports one after the other, answering each
/// report's ack with its outcome. It stops when the sender is dropped.
pub fn spawn_report_worker(
    client: kube::Client,
    hub: CloudHubHandle,
    shared: Arc<Shared>,
    stats: Arc<Stats>,
    node: String,
) -> ReportSender {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Box<Message>, ReportAck)>();
    tokio::spawn(async move {
        let mut device_status = StatusWriter::new(client.clone());
        while let Some((message, ack)) = rx.recv().await {
            let outcome = handle_report(
                client.clone(),
                &hub,
                shared.clone(),
                stats.clone(),
                &mut device_status,
                &node,
                *message,
            )
            .await;
            match outcome {
                Outcome::Done => ack.processed(),
                Outcome::RetryLater => ack.retry_later(),
            }
        }
    });
    tx
}

/// Handles one report from a node (the resource is already tagged with that node).
pub async fn handle_report(
    client: kube::Client,
    hub: &CloudHubHandle,
    shared: Arc<Shared>,
    stats: Arc<Stats>,
    device_status: &mut StatusWriter,
    node: &str,
    msg: Message,
) -> Outcome {
    let path = match ResourcePath::parse_cloud(&msg.route.resource) {
        Ok(p) if p.node() == Some(node) => p,
        Ok(p) => {
            tracing::warn!(%node, resource = %p, "report names another node; refused");
            return Outcome::Done;
        }
        Err(e) => {
            tracing::warn!(%node, error = %e, "report with a bad resource path; refused");
            return Outcome::Done;
        }
    };
    if let Some(request) = kubeedge::classify(&msg, &path) {
        return kubeedge::handle(&client, hub, &shared, node, &path, &msg, request).await;
    }
    if let Some(report) = parse_report_resource(path.edge_str()) {
        let outcome = device_report(&shared, device_status, node, report, &msg.content).await;
        let counter = match outcome {
            Some(_) => &stats.device_reports_applied,
            None => &stats.device_reports_refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if !msg.header.sync {
            // KubeEdge's edge waits for `devicecontroller/twin/response twin "OK"` (our edge
            // gets CloudHub's ack instead).
            let mut ok = msg.response(
                kedge_common::message::module::DEVICE_CONTROLLER,
                json!("OK"),
            );
            ok.route.group = "twin".into();
            ok.route.resource = format!("node/{node}/twin");
            tokens::send(hub, node, ok);
        }
        return outcome.unwrap_or(Outcome::Done);
    }
    match path.resource_type() {
        Some("nodestatus") => node_status(&client, &shared, node, &msg.content).await,
        Some("podstatus") => {
            let ns = path.namespace().unwrap_or_default().to_owned();
            let name = path.name().map(str::to_owned);
            pod_status(&client, &shared, &stats, node, &ns, name, &msg.content).await
        }
        other => {
            tracing::debug!(%node, resource_type = ?other, "report not handled by edgecontroller");
            Outcome::Done
        }
    }
}

/// The node's addresses and kubelet port as the API server must see them when cloudcore serves
/// the node's kubelet API: cloudcore's address only (the API server takes the first address of
/// its preferred type, and the edge's own would win otherwise); the edge's own addresses move to
/// the annotation [`EDGE_ADDRESSES_ANNOTATION`].
fn point_kubelet_at_cloudcore(
    status: &mut Value,
    endpoint: &crate::cloudstream::KubeletEndpoint,
) -> Option<Value> {
    let own = status.get("addresses").cloned();
    status["addresses"] = json!([{"type": endpoint.address_type, "address": endpoint.address}]);
    status["daemonEndpoints"] = json!({"kubeletEndpoint": {"Port": endpoint.port}});
    own
}

/// The addresses an edge node reported for itself (JSON), when cloudcore's address replaced
/// them in its status.
pub const EDGE_ADDRESSES_ANNOTATION: &str = "kedge.io/edge-addresses";

async fn node_status(
    client: &kube::Client,
    shared: &Shared,
    node: &str,
    content: &Value,
) -> Outcome {
    // KubeEdge sends {"UID", "Status", "ExtendResources"}; a Node object works too.
    let Some(status) = field(content, "status", "Status") else {
        tracing::warn!(%node, "node status report without a status; refused");
        return Outcome::Done;
    };
    let mut patch = json!({"status": {}});
    for f in [
        "conditions",
        "capacity",
        "allocatable",
        "nodeInfo",
        "addresses",
        "daemonEndpoints",
        "images",
    ] {
        if let Some(v) = status.get(f) {
            patch["status"][f] = v.clone();
        }
    }
    let own_addresses = shared
        .kubelet_endpoint
        .as_ref()
        .map(|e| point_kubelet_at_cloudcore(&mut patch["status"], e));
    let api: Api<Node> = Api::all(client.clone());
    let (pp, merge) = (PatchParams::default(), Patch::Merge(&patch));
    let r = retry("node status", || api.patch_status(node, &pp, &merge)).await;
    if let Err(e) = r {
        tracing::warn!(%node, error = %e, "cannot patch node status");
        return outcome_of(&e);
    }
    let own_addresses = own_addresses
        .flatten()
        .map(|v| v.to_string())
        .filter(|own| {
            let written = shared
                .edge_addresses
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            written.get(node) != Some(own)
        });
    if let Some(own) = own_addresses {
        let p = json!({"metadata": {"annotations": {EDGE_ADDRESSES_ANNOTATION: own}}});
        if let Err(e) = api
            .patch(node, &PatchParams::default(), &Patch::Merge(&p))
            .await
        {
            tracing::warn!(%node, error = %e, "cannot annotate the node's own addresses");
            return outcome_of(&e);
        }
        shared
            .edge_addresses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_owned(), own);
    }
    // Architecture, OS and the node's configured labels, patched when they change.
    let (labels, refused) = super::node_labels::from_status_report(content);
    let written = shared
        .node_labels
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(node)
        == Some(&labels);
    if !labels.is_empty() && !written {
        if !refused.is_empty() {
            tracing::warn!(%node, ?refused, "labels a node may not set on itself (NodeRestriction) are not applied");
        }
        let p = json!({"metadata": {"labels": labels}});
        if let Err(e) = api
            .patch(node, &PatchParams::default(), &Patch::Merge(&p))
            .await
        {
            tracing::warn!(%node, error = %e, "cannot label node");
            return outcome_of(&e);
        }
        shared
            .node_labels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_owned(), labels);
    }
    Outcome::Done
}

/// Fields of `PodStatus` the kubelet owns; nothing else from the edge reaches the API.
const KUBELET_POD_STATUS_FIELDS: &[&str] = &[
    "phase",
    "conditions",
    "message",
    "reason",
    "hostIP",
    "hostIPs",
    "podIP",
    "podIPs",
    "startTime",
    "containerStatuses",
    "initContainerStatuses",
    "ephemeralContainerStatuses",
    "qosClass",
    "resize",
    "resourceClaimStatuses",
];

async fn pod_status(
    client: &kube::Client,
    shared: &Shared,
    stats: &Stats,
    node: &str,
    ns: &str,
    name_from_path: Option<String>,
    content: &Value,
) -> Outcome {
    let name = field(content, "name", "Name")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or(name_from_path);
    let Some(name) = name else {
        tracing::warn!(%node, "pod status report without a pod name; refused");
        stats.pod_status_refused.fetch_add(1, Ordering::Relaxed);
        return Outcome::Done;
    };
    let uid = field(content, "uid", "UID").and_then(Value::as_str);
    let owner = shared
        .pod_owner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&(ns.to_owned(), name.clone()))
        .cloned();
    let owned = owner
        .as_ref()
        .is_some_and(|(n, u)| n == node && uid.is_none_or(|x| x == u));
    if !owned {
        tracing::warn!(%node, pod = %format!("{ns}/{name}"), "status report for a pod not bound to this node; refused");
        stats.pod_status_refused.fetch_add(1, Ordering::Relaxed);
        return Outcome::Done;
    }
    let Some(status) = field(content, "status", "Status") else {
        tracing::warn!(%node, pod = %name, "pod status report without a status; refused");
        stats.pod_status_refused.fetch_add(1, Ordering::Relaxed);
        return Outcome::Done;
    };
    let mut owned_status = serde_json::Map::new();
    for f in KUBELET_POD_STATUS_FIELDS {
        if let Some(v) = status.get(*f) {
            owned_status.insert((*f).to_owned(), v.clone());
        }
    }
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let patch = json!({"status": owned_status});
    let pod_uid = owner.map(|(_, u)| u).unwrap_or_default();
    let (pp, merge) = (PatchParams::default(), Patch::Merge(&patch));
    match retry("pod status", || api.patch_status(&name, &pp, &merge)).await {
        Ok(pod) => {
            stats.pod_status_applied.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: "pod_path", %node, pod = %format_args!("{ns}/{name}"), uid = %pod_uid,
                phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default(),
                ready = pod.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
                "7 status patched");
            if pod.metadata.deletion_timestamp.is_some() && containers_stopped(&pod) {
                // As the kubelet: the containers are gone, so finish the graceful deletion.
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(pod_uid),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match api.delete(&name, &dp).await {
                    Ok(_) => tracing::info!(%node, pod = %name, "containers stopped; pod deleted"),
                    Err(e) if is_status(&e, 404) => {}
                    Err(e) => {
                        tracing::warn!(%node, pod = %name, error = %e, "cannot finish pod deletion");
                        return Outcome::RetryLater;
                    }
                }
            }
            Outcome::Done
        }
        Err(e) => {
            tracing::warn!(%node, pod = %name, error = %e, "cannot patch pod status");
            outcome_of(&e)
        }
    }
}

/// True when no container of the pod is running or waiting to run.
fn containers_stopped(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return true;
    }
    let all = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten());
    let mut any = false;
    for c in all {
        any = true;
        let terminated = c.state.as_ref().is_some_and(|s| s.terminated.is_some());
        if !terminated {
            return false;
        }
    }
    any
}

/// A twin or state report for a device: applied only if `node` hosts the device now. `None`:
/// refused for good.
async fn device_report(
    shared: &Shared,
    writer: &mut StatusWriter,
    node: &str,
    report: DeviceReport<'_>,
    content: &Value,
) -> Option<Outcome> {
    let (ns, name) = match report {
        DeviceReport::Twin { namespace, name } | DeviceReport::State { namespace, name } => {
            (namespace.to_owned(), name.to_owned())
        }
    };
    let key = (ns, name);
    let owner = shared
        .device_owner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned();
    let uid = match owner {
        Some((owner, uid)) if owner == node => uid,
        // Before Devices and DeviceModels are first listed (cloudcore just started) nobody is
        // known to host anything: the report waits on the edge instead of being refused.
        _ if !shared.lists_done.load(std::sync::atomic::Ordering::Acquire) => {
            return Some(Outcome::RetryLater);
        }
        other => {
            tracing::warn!(%node, namespace = %key.0, device = %key.1, host = ?other.map(|o| o.0),
                "device report from a node that does not host the device; refused");
            writer.forget(&key);
            return None;
        }
    };
    // KubeEdge's content is the bare object; a JSON string holding it is accepted too.
    let content = match content {
        Value::String(s) => serde_json::from_str(s).unwrap_or(Value::Null),
        other => other.clone(),
    };
    match report {
        DeviceReport::Twin { .. } => match serde_json::from_value::<TwinMessage>(content) {
            Ok(m) => Some(writer.twin_report(&key, &uid, &m).await),
            Err(e) => {
                tracing::warn!(%node, device = %key.1, error = %e, "malformed twin report; refused");
                None
            }
        },
        DeviceReport::State { .. } => match serde_json::from_value::<StateMessage>(content) {
            Ok(m) => Some(writer.state_report(&key, &uid, &m).await),
            Err(e) => {
                tracing::warn!(%node, device = %key.1, error = %e, "malformed state report; refused");
                None
            }
        },
    }
}

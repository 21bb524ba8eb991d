//! edgecontroller: the cluster → node and node → cluster halves of cloudcore.
//!
//! Down: kube-runtime watchers (with backoff) on edge Nodes, bound Pods, ConfigMaps and Secrets
//! feed one event loop, which decides what each edge node must hold: its pods and every
//! ConfigMap/Secret they reference, sent *before* the pod. Changes go into the node's CloudHub
//! queue; a referenced object no pod on a node needs any more is deleted from that node. After a
//! re-list (watch expired, cloudcore restarted) objects that did not reappear are treated as
//! deleted. A kedge edge's inventory on every connect makes the node hold exactly what it must
//! (see `resync`); for KubeEdge edges, objects acknowledged before a restart that are gone now
//! are deleted from the node (synccontroller).
//!
//! Up: a connecting node gets its Node object (edge role label) and a Lease it renews while
//! connected; node status reports patch the Node's status; pod status reports patch the pod's
//! status subresource (kubelet-owned fields only) after checking that the pod is bound to the
//! reporting node; a terminating pod whose containers all stopped is deleted with grace period 0.

pub mod autonomy;
mod devices;
mod holders;
pub mod kubeedge;
pub use kedge_common::refs;
mod node_labels;
mod nodes;
mod resync;
mod sessions;
mod tokens;
pub mod upstream;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kedge_common::{Message, Operation};
use kube::Resource;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cloudhub::{CloudHubHandle, ObjectKey, Pushed, Upstream};
use crate::devicecontroller;
use crate::node_refs::NodeRefs;
use crate::nodeidentity::cluster::ClusterIdentities;
use crate::synccontroller::SyncState;
use devices::devices_served;
use kedge_common::crd::{Device, DeviceModel};
use refs::{ObjectRef, RefKind, pod_refs};

/// The label marking edge nodes.
pub const EDGE_ROLE_LABEL: &str = "node-role.kubernetes.io/edge";
pub const SOURCE: &str = "edgecontroller";

/// Counters for tests, benchmarks and logs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages queued for nodes.
    pub queued: AtomicU64,
    /// Versions not sent because the node already holds them (or newer).
    pub unchanged: AtomicU64,
    /// Pod status reports applied / refused.
    pub pod_status_applied: AtomicU64,
    pub pod_status_refused: AtomicU64,
    pub lease_renewals: AtomicU64,
    /// Inventories compared with what their node must hold.
    pub inventories_reconciled: AtomicU64,
    /// Pods whose tolerations were patched for their node's autonomy.
    pub toleration_patches: AtomicU64,
    /// Devices refused as invalid (each new reason once).
    pub invalid_devices: AtomicU64,
    /// Device reports applied / refused (from a node not hosting the device, or malformed).
    pub device_reports_applied: AtomicU64,
    pub device_reports_refused: AtomicU64,
    /// The first lists finished and what nodes missed meanwhile was queued (`/readyz`).
    pub initial_sync_done: std::sync::atomic::AtomicBool,
    /// This replica runs the cluster-wide controllers (see `crate::leader`).
    pub leader: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone)]
pub struct EdgeControllerSettings {
    /// Seconds between Lease renewals for connected nodes.
    pub node_update_frequency: Duration,
    pub lease_duration_seconds: i32,
    /// Serve Devices and DeviceModels (needs the `devices.kubeedge.io` CRDs; without them the
    /// device part stays off and says so).
    pub devices: bool,
    /// Where the API server reaches the kubelet API of our nodes (cloudcore's CloudStream);
    /// written into the status of every node that reports one. `None`: nodes keep their own.
    pub kubelet_endpoint: Option<crate::cloudstream::KubeletEndpoint>,
}

impl Default for EdgeControllerSettings {
    fn default() -> Self {
        EdgeControllerSettings {
            node_update_frequency: Duration::from_secs(10),
            lease_duration_seconds: 40,
            devices: false,
            kubelet_endpoint: None,
        }
    }
}

/// Everything the event loop reacts to. Kubernetes objects are large: boxed.
enum Input {
    Nodes(Box<watcher::Event<Node>>),
    Pods(Box<watcher::Event<Pod>>),
    ConfigMaps(Box<watcher::Event<ConfigMap>>),
    Secrets(Box<watcher::Event<Secret>>),
    Devices(Box<watcher::Event<Device>>),
    DeviceModels(Box<watcher::Event<DeviceModel>>),
    Hub(Upstream),
    /// Try again to pick up the pods already bound to a new edge node.
    Adopt(String),
    /// The pods bound to a new edge node when it became one.
    Adoptable(String, Vec<Pod>),
    /// What a node without an inventory (a KubeEdge edge) acknowledged, as recorded in the
    /// cluster, read when it connected; `None`: the read failed and is tried again.
    AckRecord(String, Option<Vec<crate::synccontroller::AckedObject>>),
    /// This replica became leader (true) or stopped being leader (false); see `crate::leader`.
    Leader(bool),
}

type NsName = (String, String);

fn ns_name<K: Resource>(obj: &K) -> NsName {
    (
        obj.meta().namespace.clone().unwrap_or_default(),
        obj.meta().name.clone().unwrap_or_default(),
    )
}

struct PodEntry {
    pod: Pod,
    node: String,
    refs: Vec<ObjectRef>,
}

/// Tracks a watcher's re-list: keys seen between `Init` and `InitDone`.
#[derive(Default)]
struct Relist {
    seen: Option<HashSet<NsName>>,
    done_once: bool,
}

impl Relist {
    fn init(&mut self) {
        self.seen = Some(HashSet::new());
    }
    fn saw(&mut self, k: NsName) {
        if let Some(s) = &mut self.seen {
            s.insert(k);
        }
    }
    /// The set seen by the finished re-list.
    fn done(&mut self) -> HashSet<NsName> {
        self.done_once = true;
        self.seen.take().unwrap_or_default()
    }
}

/// The shared state behind the event loop, readable for Lease renewal and status checks.
pub struct Shared {
    pub connected: Mutex<HashSet<String>>,
    /// Pods bound to edge nodes: (namespace, name) → (node, uid).
    pub pod_owner: Mutex<HashMap<NsName, (String, String)>>,
    /// Devices placed on edge nodes: (namespace, name) → (node, uid).
    pub device_owner: Mutex<HashMap<NsName, (String, String)>>,
    /// Connected nodes that are KubeEdge edgecores (they renew their own Lease).
    pub kubeedge: Mutex<HashSet<String>>,
    /// See [`EdgeControllerSettings::kubelet_endpoint`].
    pub kubelet_endpoint: Option<crate::cloudstream::KubeletEndpoint>,
    /// The edge's own addresses last written to each node's annotation (written on change only).
    pub edge_addresses: Mutex<HashMap<String, String>>,
    /// The labels last applied for each node from its status reports (patched on change only).
    pub node_labels: Mutex<HashMap<String, serde_json::Map<String, serde_json::Value>>>,
    /// Every watch has listed once: who hosts which device is known.
    pub lists_done: std::sync::atomic::AtomicBool,
}

impl crate::cloudstream::PodLocator for Shared {
    fn node_of(&self, namespace: &str, pod: &str) -> Option<String> {
        let owners = self.pod_owner.lock().unwrap_or_else(|p| p.into_inner());
        owners
            .get(&(namespace.to_owned(), pod.to_owned()))
            .map(|(node, _)| node.clone())
    }
}

pub struct EdgeController {
    client: kube::Client,
    hub: CloudHubHandle,
    sync: Arc<SyncState>,
    settings: EdgeControllerSettings,
    pub stats: Arc<Stats>,
    shared: Arc<Shared>,
    identities: Arc<ClusterIdentities>,
    leader: tokio::sync::watch::Receiver<bool>,
}

struct Loop {
    client: kube::Client,
    hub: CloudHubHandle,
    /// Ownership records, kept fresh from the Node watch; a change closes sessions whose
    /// certificate no longer counts.
    identities: Arc<ClusterIdentities>,
    sync: Arc<SyncState>,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    edge_nodes: BTreeMap<String, Node>,
    pods: HashMap<NsName, PodEntry>,
    configmaps: HashMap<NsName, ConfigMap>,
    secrets: HashMap<NsName, Secret>,
    /// For each referenced object: which nodes need it, and by how many pods.
    holders: NodeRefs<ObjectRef>,
    relists: [Relist; 4],
    orphans_checked: bool,
    /// Pod events that arrived before ConfigMaps and Secrets were first listed.
    held_pods: Vec<watcher::Event<Pod>>,
    /// Nodes whose current (or last) session sent an inventory: the edge, not the synccontroller,
    /// says what they hold.
    inventory_nodes: HashSet<String>,
    /// Inventories that arrived before the first lists finished.
    pending_inventories: HashMap<String, HashMap<ObjectKey, String>>,
    /// Per node, the worker that applies its reports in order.
    report_workers: HashMap<String, upstream::ReportSender>,
    /// New edge nodes whose pods are being listed, with the pods deleted meanwhile (the list may
    /// predate the deletion).
    adopting: HashMap<String, HashSet<NsName>>,
    /// The pod version whose tolerations were last patched (one patch per version at most).
    autonomy_patched: HashMap<NsName, String>,
    retry_tx: mpsc::WeakSender<Input>,
    /// Devices and models, and where they were sent; `None` when the device part is off.
    devices: Option<devicecontroller::Devices>,
    /// Re-lists of Devices and DeviceModels.
    device_relists: [Relist; 2],
    events: kube::runtime::events::Recorder,
    /// Whether this replica runs the controllers that must act once in the cluster: deleting
    /// the pods of deleted edge Nodes, toleration patches, Events about invalid devices.
    leader: tokio::sync::watch::Receiver<bool>,
}

impl EdgeController {
    pub fn new(
        client: kube::Client,
        hub: CloudHubHandle,
        sync: Arc<SyncState>,
        settings: EdgeControllerSettings,
        identities: Arc<ClusterIdentities>,
    ) -> Self {
        let kubelet_endpoint = settings.kubelet_endpoint.clone();
        EdgeController {
            client,
            hub,
            sync,
            settings,
            identities,
            leader: always_leader(),
            stats: Arc::new(Stats::default()),
            shared: Arc::new(Shared {
                connected: Mutex::new(HashSet::new()),
                pod_owner: Mutex::new(HashMap::new()),
                device_owner: Mutex::new(HashMap::new()),
                kubeedge: Mutex::new(HashSet::new()),
                kubelet_endpoint,
                edge_addresses: Mutex::new(HashMap::new()),
                node_labels: Mutex::new(HashMap::new()),
                lists_done: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Runs the cluster-wide controllers only while `leader` says so (several replicas); without
    /// this call this cloudcore is the only one and always runs them.
    pub fn with_leader(mut self, leader: tokio::sync::watch::Receiver<bool>) -> Self {
        self.leader = leader;
        self
    }

    /// Which edge node hosts a pod (for CloudStream's routing).
    pub fn pod_locator(&self) -> Arc<dyn crate::cloudstream::PodLocator> {
        self.shared.clone()
    }

    /// Runs until `shutdown`. `upstream` is CloudHub's channel.
    pub async fn run(self, mut upstream: mpsc::Receiver<Upstream>, shutdown: CancellationToken) {
        let (tx, mut rx) = mpsc::channel::<Input>(1024);
        let strip = |m: &mut kube::api::ObjectMeta| m.managed_fields = None;
        let c = &self.client;
        let wc = watcher::Config::default().any_semantic();
        spawn_watch(
            watcher(
                Api::<Node>::all(c.clone()),
                watcher::Config::default().labels(EDGE_ROLE_LABEL),
            )
            .default_backoff()
            .modify(move |n| strip(n.meta_mut())),
            tx.clone(),
            |e| Input::Nodes(Box::new(e)),
            shutdown.clone(),
        );
        spawn_watch(
            watcher(
                Api::<Pod>::all(c.clone()),
                wc.clone().fields("spec.nodeName!="),
            )
            .default_backoff()
            .modify(move |p| strip(p.meta_mut())),
            tx.clone(),
            |e| Input::Pods(Box::new(e)),
            shutdown.clone(),
        );
        spawn_watch(
            watcher(Api::<ConfigMap>::all(c.clone()), wc.clone())
                .default_backoff()
                .modify(move |o| strip(o.meta_mut())),
            tx.clone(),
            |e| Input::ConfigMaps(Box::new(e)),
            shutdown.clone(),
        );
        spawn_watch(
            watcher(Api::<Secret>::all(c.clone()), wc)
                .default_backoff()
                .modify(move |o| strip(o.meta_mut())),
            tx.clone(),
            |e| Input::Secrets(Box::new(e)),
            shutdown.clone(),
        );
        let devices = self.settings.devices && devices_served(c).await;
        if devices {
            spawn_watch(
                watcher(Api::<Device>::all(c.clone()), watcher::Config::default())
                    .default_backoff()
                    .modify(move |o| strip(o.meta_mut())),
                tx.clone(),
                |e| Input::Devices(Box::new(e)),
                shutdown.clone(),
            );
            spawn_watch(
                watcher(
                    Api::<DeviceModel>::all(c.clone()),
                    watcher::Config::default(),
                )
                .default_backoff()
                .modify(move |o| strip(o.meta_mut())),
                tx.clone(),
                |e| Input::DeviceModels(Box::new(e)),
                shutdown.clone(),
            );
        }
        {
            let (tx, mut leader, stop) = (tx.clone(), self.leader.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        changed = leader.changed() => {
                            // The election is over (single replica, or shutting down).
                            if changed.is_err() { return }
                        }
                    }
                    let leads = *leader.borrow_and_update();
                    if tx.send(Input::Leader(leads)).await.is_err() {
                        return;
                    }
                }
            });
        }
        let hub_tx = tx.clone();
        let hub_stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = hub_stop.cancelled() => return,
                    ev = upstream.recv() => match ev {
                        Some(ev) => if hub_tx.send(Input::Hub(ev)).await.is_err() { return },
                        None => return,
                    }
                }
            }
        });
        // The loop keeps a weak sender for its own retries, so the channel still closes when the
        // watchers stop.
        let retry_tx = tx.downgrade();
        drop(tx);

        tokio::spawn(upstream::renew_leases(
            self.client.clone(),
            self.shared.clone(),
            self.settings.clone(),
            self.stats.clone(),
            shutdown.clone(),
        ));

        let mut l = Loop {
            client: self.client.clone(),
            hub: self.hub.clone(),
            identities: self.identities.clone(),
            sync: self.sync.clone(),
            stats: self.stats.clone(),
            shared: self.shared.clone(),
            edge_nodes: BTreeMap::new(),
            pods: HashMap::new(),
            configmaps: HashMap::new(),
            secrets: HashMap::new(),
            holders: NodeRefs::default(),
            relists: Default::default(),
            orphans_checked: false,
            held_pods: Vec::new(),
            inventory_nodes: HashSet::new(),
            pending_inventories: HashMap::new(),
            report_workers: HashMap::new(),
            autonomy_patched: HashMap::new(),
            adopting: HashMap::new(),
            retry_tx,
            devices: devices.then(devicecontroller::Devices::default),
            device_relists: Default::default(),
            events: kube::runtime::events::Recorder::new(
                self.client.clone(),
                kube::runtime::events::Reporter {
                    controller: "kedge-cloudcore".into(),
                    instance: None,
                },
            ),
            leader: self.leader.clone(),
        };
        l.stats.leader.store(l.leads(), Ordering::Relaxed);
        loop {
            let input = tokio::select! {
                _ = shutdown.cancelled() => return,
                i = rx.recv() => match i { Some(i) => i, None => return },
            };
            l.handle(input).await;
        }
    }
}

/// The election of a cloudcore that runs alone: it always leads.
fn always_leader() -> tokio::sync::watch::Receiver<bool> {
    tokio::sync::watch::channel(true).1
}

fn spawn_watch<K, S>(
    stream: S,
    tx: mpsc::Sender<Input>,
    wrap: fn(watcher::Event<K>) -> Input,
    shutdown: CancellationToken,
) where
    K: Send + 'static,
    S: futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = stream.next() => n,
            };
            match next {
                Some(Ok(ev)) => {
                    if tx.send(wrap(ev)).await.is_err() {
                        return;
                    }
                }
                // Retryable: the backoff inside the stream waits before the next attempt.
                Some(Err(e)) => tracing::warn!(error = %e, "watch failed; retrying"),
                None => return,
            }
        }
    });
}

fn obj_key(kind: &str, namespace: Option<&str>, name: &str, uid: &str) -> ObjectKey {
    ObjectKey {
        kind: kind.to_owned(),
        namespace: namespace.map(str::to_owned),
        name: name.to_owned(),
        uid: uid.to_owned(),
    }
}

fn rv_of<K: Resource>(obj: &K) -> String {
    obj.meta().resource_version.clone().unwrap_or_default()
}

pub(crate) fn to_json<T: Serialize>(obj: &T) -> Value {
    serde_json::to_value(obj).unwrap_or(Value::Null)
}

impl Loop {
    async fn handle(&mut self, input: Input) {
        match input {
            Input::Nodes(ev) => self.on_nodes(*ev).await,
            Input::Pods(ev) => {
                // Until edge nodes, ConfigMaps and Secrets are listed, a pod cannot be placed and
                // its references cannot be sent before it: hold pod events back (start-up only).
                if self.refs_listed() {
                    self.on_pods(*ev).await;
                } else {
                    self.held_pods.push(*ev);
                }
            }
            Input::ConfigMaps(ev) => self.on_refs(*ev, RefKind::ConfigMap),
            Input::Secrets(ev) => self.on_refs(*ev, RefKind::Secret),
            Input::Devices(ev) => self.on_devices(*ev),
            Input::DeviceModels(ev) => self.on_device_models(*ev),
            Input::Hub(ev) => self.on_hub(ev),
            Input::Adopt(node) => {
                if self.edge_nodes.contains_key(&node) {
                    self.adopt_pods_of(&node);
                }
            }
            Input::Adoptable(node, pods) => self.adopt(&node, pods).await,
            Input::AckRecord(node, record) => self.on_ack_record(node, record),
            Input::Leader(leads) if leads != self.stats.leader.load(Ordering::Relaxed) => {
                self.stats.leader.store(leads, Ordering::Relaxed);
                self.leadership_changed(leads);
            }
            Input::Leader(_) => {}
        }
        if !self.held_pods.is_empty() && self.refs_listed() {
            for ev in std::mem::take(&mut self.held_pods) {
                self.on_pods(ev).await;
            }
        }
        let devices_listed =
            self.devices.is_none() || self.device_relists.iter().all(|r| r.done_once);
        if !self.orphans_checked && devices_listed && self.relists.iter().all(|r| r.done_once) {
            self.orphans_checked = true;
            self.shared.lists_done.store(true, Ordering::Release);
            self.initial_lists_done();
            self.reconcile_held_inventories();
        }
    }

    fn leads(&self) -> bool {
        *self.leader.borrow()
    }

    fn leadership_changed(&mut self, leads: bool) {
        if !leads {
            tracing::info!("no longer leading: cluster-wide controllers paused");
            return;
        }
        // What the previous leader may not have done: every pod looked at again.
        let keys: Vec<NsName> = self.pods.keys().cloned().collect();
        tracing::info!(
            pods = keys.len(),
            "leading: running the cluster-wide controllers"
        );
        for k in keys {
            self.ensure_autonomy(&k);
        }
    }

    /// Queues one object version (or delete) for a node.
    fn send(&self, node: &str, key: ObjectKey, rv: &str, op: Operation, content: Value) {
        let resource = format!(
            "node/{node}/{}/{}/{}",
            key.namespace.as_deref().unwrap_or("null"),
            key.kind,
            key.name
        );
        let name = key.name.clone();
        tracing::debug!(%node, %resource, %op, %rv, "to node");
        // KubeEdge sends Devices and DeviceModels from its devicecontroller.
        let source = match key.kind.as_str() {
            "device" | "devicemodel" => crate::devicecontroller::SOURCE,
            _ => SOURCE,
        };
        let msg = Message::new(source, "resource", op, resource, content).with_resource_version(rv);
        match self.hub.enqueue(Some(key), msg) {
            Ok(Pushed::Queued) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Pushed::Stale) => {
                self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
            }
            // Another replica's node, or one that is away: it gets what it must hold when it
            // connects here.
            Ok(Pushed::NotHere) => {}
            Err(e) => tracing::error!(%node, %name, error = %e, "cannot queue for node"),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Pods

    async fn on_pods(&mut self, ev: watcher::Event<Pod>) {
        match ev {
            watcher::Event::Apply(p) => self.pod_applied(p).await,
            watcher::Event::InitApply(p) => {
                self.relists[1].saw(ns_name(&p));
                self.pod_applied(p).await;
            }
            watcher::Event::Delete(p) => {
                let node = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
                if let Some(deleted) = node.and_then(|n| self.adopting.get_mut(n)) {
                    deleted.insert(ns_name(&p));
                }
                self.pod_deleted(&ns_name(&p), Some(p))
            }
            watcher::Event::Init => self.relists[1].init(),
            watcher::Event::InitDone => {
                let seen = self.relists[1].done();
                let gone: Vec<NsName> = self
                    .pods
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    self.pod_deleted(&k, None);
                }
            }
        }
    }

    /// Edge nodes, ConfigMaps and Secrets have been listed once: pods can be placed and their
    /// references sent first.
    fn refs_listed(&self) -> bool {
        self.relists[0].done_once && self.relists[2].done_once && self.relists[3].done_once
    }

    async fn pod_applied(&mut self, pod: Pod) {
        let key = ns_name(&pod);
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            return;
        };
        if !self.edge_nodes.contains_key(&node) {
            return;
        }
        let refs = pod_refs(&pod);
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        tracing::debug!(target: "pod_path", %node, pod = %format_args!("{}/{}", key.0, key.1), %uid, rv = %rv_of(&pod), "1 API event");
        let old = self.pods.remove(&key);
        // A pod with the same name but a new UID is a new pod: the old one is deleted first.
        let old = match old {
            Some(o) if o.pod.metadata.uid.as_deref() != Some(uid.as_str()) => {
                self.pods.insert(key.clone(), o);
                self.pod_deleted(&key, None);
                None
            }
            other => other,
        };
        let old_refs = old.as_ref().map(|o| o.refs.clone()).unwrap_or_default();
        // Referenced objects first, so the node has them before the pod.
        for r in refs.iter().filter(|r| !old_refs.contains(r)) {
            self.fetch_missing(r).await;
            self.hold(&node, r);
        }
        let op = if old.is_some() {
            Operation::Update
        } else {
            Operation::Insert
        };
        self.send(
            &node,
            obj_key("pod", Some(&key.0), &key.1, &uid),
            &rv_of(&pod),
            op,
            to_json(&pod),
        );
        for r in old_refs.iter().filter(|r| !refs.contains(r)) {
            self.release(&node, r);
        }
        self.shared
            .pod_owner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), (node.clone(), uid));
        self.pods.insert(key.clone(), PodEntry { pod, node, refs });
        self.ensure_autonomy(&key);
    }

    /// The pod is gone from the cluster: delete it on its node and release what it referenced.
    fn pod_deleted(&mut self, key: &NsName, last: Option<Pod>) {
        let Some(entry) = self.pods.remove(key) else {
            return;
        };
        self.autonomy_patched.remove(key);
        self.shared
            .pod_owner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        // A DELETED event carries the deletion's version; a delete found by re-list is sent at the
        // version the node holds.
        let pod = last.unwrap_or(entry.pod);
        let rv = rv_of(&pod);
        self.send(
            &entry.node,
            obj_key(
                "pod",
                Some(&key.0),
                &key.1,
                pod.metadata.uid.as_deref().unwrap_or_default(),
            ),
            &rv,
            Operation::Delete,
            to_json(&pod),
        );
        for r in &entry.refs {
            self.release(&entry.node, r);
        }
    }
}

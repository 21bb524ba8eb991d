//! The edged loop: follows the local store (pods, ConfigMaps, Secrets) — never the cloud — and
//! keeps the runtime in line with it, reporting each pod's status to the outbox when it changes.
//!
//! - At start it removes sandboxes edged created for pods no longer in the store; running pods
//!   are adopted as they are (their containers are found by the pod UID label, nothing restarts).
//! - Every change of a pod, and a relist every `resync`, syncs pods ([`sync::sync_pod`]).
//! - A pod with a `deletionTimestamp` is stopped with its grace period in a task of its own,
//!   its final status (containers terminated) reported once the sandbox is gone; a pod that
//!   disappears from the store is stopped and removed.
//!
//! Pods are synced concurrently, each with its own memory and back-off (per-pod workers with
//! their own timers are the next step of the edged issue).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodStatus, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kedge_common::{Message, Operation};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::backoff::RestartBackoff;
use super::cri_config::{MANAGED_LABEL, NodeSettings, POD_UID_LABEL};
use super::env::ObjectSource;
use super::runtime::{Runtime, api};
use super::sync::{self, PodMemory};
use super::tokens::{TokenKey, Tokens};
use crate::edgehub::outbox::Outbox;
use crate::metamanager::sqlite::SqliteStore;

#[derive(Debug, Clone)]
pub struct EdgedSettings {
    pub node: NodeSettings,
    pub host_ip: String,
    /// Relist interval: status changes edged did not cause (a container exiting) are seen this
    /// fast (containerd 1.6 has no event stream).
    pub resync: Duration,
}

type NsName = (String, String);

/// Pods synced at the same time at most.
const MAX_CONCURRENT_SYNCS: usize = 16;

/// What edged remembers about one pod between syncs.
#[derive(Default)]
struct PodState {
    memory: PodMemory,
    backoff: RestartBackoff,
}

#[derive(Default)]
struct Cache {
    pods: BTreeMap<NsName, Pod>,
    configmaps: HashMap<NsName, ConfigMap>,
    secrets: HashMap<NsName, Secret>,
    tokens: Option<Arc<dyn Tokens>>,
}

/// Wall-clock now in Unix seconds (token lifetimes are wall-clock).
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl ObjectSource for Cache {
    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap> {
        self.configmaps
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }
    fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        self.secrets
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }
    fn service_account_token(&self, key: &TokenKey) -> Option<String> {
        self.tokens.as_ref()?.token(key, unix_now())
    }
}

impl Cache {
    fn apply(
        &mut self,
        kind: &str,
        namespace: &str,
        name: &str,
        object: Option<&serde_json::Value>,
    ) {
        let key = (namespace.to_owned(), name.to_owned());
        fn decode<T: serde::de::DeserializeOwned>(v: &serde_json::Value, what: &str) -> Option<T> {
            serde_json::from_value(v.clone())
                .map_err(|e| tracing::error!(%what, error = %e, "cannot decode a stored object; ignored"))
                .ok()
        }
        match (kind, object) {
            ("pod", Some(v)) => {
                if let Some(p) = decode(v, "pod") {
                    self.pods.insert(key, p);
                }
            }
            ("pod", None) => {
                self.pods.remove(&key);
            }
            ("configmap", Some(v)) => {
                if let Some(c) = decode(v, "configmap") {
                    self.configmaps.insert(key, c);
                }
            }
            ("configmap", None) => {
                self.configmaps.remove(&key);
            }
            ("secret", Some(v)) => {
                if let Some(s) = decode(v, "secret") {
                    self.secrets.insert(key, s);
                }
            }
            ("secret", None) => {
                self.secrets.remove(&key);
            }
            _ => {}
        }
    }
}

pub struct Edged<R: Runtime, O: Outbox> {
    runtime: Arc<R>,
    store: SqliteStore,
    outbox: Arc<O>,
    settings: EdgedSettings,
    /// Service account tokens for projected volumes; without it such pods wait.
    tokens: Option<Arc<dyn Tokens>>,
}

/// Keeps a condition's transition time when its status did not change, so a status only
/// differs from the last one when something did.
fn carry_transition_times(previous: Option<&PodStatus>, status: &mut PodStatus) {
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

fn now_time() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

impl<R: Runtime, O: Outbox> Edged<R, O> {
    pub fn new(
        runtime: Arc<R>,
        store: SqliteStore,
        outbox: Arc<O>,
        settings: EdgedSettings,
    ) -> Self {
        Edged {
            runtime,
            store,
            outbox,
            settings,
            tokens: None,
        }
    }

    /// Where service account tokens come from (cloudcore, through EdgeHub).
    pub fn with_tokens(mut self, tokens: Arc<dyn Tokens>) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// Runs until `shutdown`. Containers keep running when edged stops (as with the kubelet).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut states: HashMap<String, PodState> = HashMap::new();
        let mut reported: HashMap<String, PodStatus> = HashMap::new();
        let terminating: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
        let mut known_uids: HashSet<String> = HashSet::new();
        let mut cleaned_up = false;
        'follow: loop {
            let (rows, snapshot_seq, mut changes) = match self.store.follow(None).await {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, "edged cannot read the store; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let mut cache = Cache {
                tokens: self.tokens.clone(),
                ..Cache::default()
            };
            let token_changes = self.tokens.as_ref().map(|t| t.changed());
            for r in &rows {
                cache.apply(&r.kind, &r.namespace, &r.name, Some(&r.object.content));
            }
            let mut tick = tokio::time::interval(self.settings.resync);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                if !cleaned_up {
                    cleaned_up = self.remove_orphans(&cache).await;
                }
                self.sync_all(
                    &cache,
                    &mut states,
                    &mut reported,
                    &terminating,
                    &mut known_uids,
                )
                .await;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                    _ = async { token_changes.as_ref()?.notified().await; Some(()) }, if token_changes.is_some() => {}
                    change = changes.recv() => match change {
                        Ok(c) => {
                            if c.seq > snapshot_seq {
                                cache.apply(&c.kind, &c.namespace, &c.name, (!c.deleted).then_some(&c.object));
                            }
                            // Take whatever else is queued before syncing.
                            while let Ok(c) = changes.try_recv() {
                                if c.seq > snapshot_seq {
                                    cache.apply(&c.kind, &c.namespace, &c.name, (!c.deleted).then_some(&c.object));
                                }
                            }
                        }
                        Err(RecvError::Lagged(_)) => continue 'follow,
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        }
    }

    /// Removes sandboxes edged made for pods the store no longer has (e.g. deleted while edgecore
    /// was down). Returns whether the runtime answered.
    async fn remove_orphans(&self, cache: &Cache) -> bool {
        let uids: HashSet<String> = cache
            .pods
            .values()
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        let filter = api::PodSandboxFilter {
            label_selector: HashMap::from([(MANAGED_LABEL.to_owned(), "true".to_owned())]),
            ..Default::default()
        };
        let sandboxes = match self.runtime.list_pod_sandboxes(Some(filter)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list sandboxes; will retry");
                return false;
            }
        };
        let orphans: HashSet<String> = sandboxes
            .iter()
            .filter_map(|s| s.labels.get(POD_UID_LABEL).cloned())
            .filter(|u| !uids.contains(u))
            .collect();
        for uid in orphans {
            tracing::info!(%uid, "removing the containers of a pod no longer stored");
            self.remove_pod(&uid, 0).await;
        }
        true
    }

    /// Stops and removes everything of pod `uid`.
    async fn remove_pod(&self, uid: &str, grace: i64) {
        match sync::observe(&*self.runtime, uid).await {
            Ok(o) => {
                if let Err(e) = sync::kill_pod(&*self.runtime, &o, grace).await {
                    tracing::warn!(%uid, error = %e, "cannot stop pod");
                }
                for s in &o.pod.sandboxes {
                    if let Err(e) = self.runtime.remove_pod_sandbox(&s.id).await {
                        tracing::warn!(%uid, error = %e, "cannot remove sandbox");
                    }
                }
            }
            Err(e) => tracing::warn!(%uid, error = %e, "cannot list the pod's containers"),
        }
        self.remove_volumes(uid).await;
    }

    /// Removes the pod's volume directory (unmounting tmpfs emptyDirs) off the async threads.
    async fn remove_volumes(&self, uid: &str) {
        let (root, id) = (self.settings.node.root_dir.clone(), uid.to_owned());
        match tokio::task::spawn_blocking(move || super::volumes::remove(&root, &id)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(%uid, error = %e, "cannot remove the pod's volumes"),
            Err(e) => tracing::warn!(%uid, error = %e, "volume removal task failed"),
        }
    }

    async fn report(&self, pod: &Pod, status: &PodStatus) {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let msg = Message::new(
            "edged",
            "resource",
            Operation::Update,
            format!("{ns}/podstatus/{name}"),
            json!({"uid": pod.metadata.uid, "name": name, "status": status}),
        );
        if let Err(e) = self
            .outbox
            .put(&format!("podstatus/{ns}/{name}"), msg)
            .await
        {
            tracing::error!(pod = %format!("{ns}/{name}"), error = %e, "cannot queue pod status");
        }
    }

    async fn sync_all(
        &self,
        cache: &Cache,
        states: &mut HashMap<String, PodState>,
        reported: &mut HashMap<String, PodStatus>,
        terminating: &Arc<std::sync::Mutex<HashSet<String>>>,
        known_uids: &mut HashSet<String>,
    ) {
        let now_uids: HashSet<String> = cache
            .pods
            .values()
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        // Pods gone from the store: stop and remove what is left of them.
        for gone in known_uids
            .difference(&now_uids)
            .cloned()
            .collect::<Vec<_>>()
        {
            tracing::info!(uid = %gone, "pod removed from the store; removing its containers");
            self.remove_pod(&gone, 0).await;
            states.remove(&gone);
            reported.remove(&gone);
            if let Some(t) = &self.tokens {
                t.forget(&gone);
            }
        }
        *known_uids = now_uids;
        let mut live: HashMap<String, &Pod> = HashMap::new();
        for pod in cache.pods.values() {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if pod.metadata.deletion_timestamp.is_some() {
                self.start_termination(pod, terminating);
            } else {
                states.entry(uid.clone()).or_default();
                live.insert(uid, pod);
            }
        }
        if let Some(t) = &self.tokens {
            let pods: Vec<&Pod> = live.values().copied().collect();
            t.ensure(&pods, unix_now());
        }
        // Pods are synced concurrently (a slow pull or sandbox does not hold up the others);
        // each has its own state, so the syncs share nothing mutable.
        let mut syncs = Vec::new();
        for (uid, state) in states.iter_mut() {
            if let Some(pod) = live.get(uid).copied() {
                syncs.push(self.sync_one(uid, pod, cache, state));
            }
        }
        // Each pod's status goes out as soon as its own sync is done.
        let mut done = futures_util::stream::iter(syncs).buffer_unordered(MAX_CONCURRENT_SYNCS);
        while let Some((uid, pod, result)) = done.next().await {
            match result {
                Ok(mut status) => {
                    carry_transition_times(reported.get(&uid), &mut status);
                    if reported.get(&uid) != Some(&status) {
                        self.report(pod, &status).await;
                        reported.insert(uid, status);
                    }
                }
                Err(e) => {
                    tracing::warn!(pod = ?pod.metadata.name, error = %e, "pod sync failed; retrying");
                }
            }
        }
    }

    /// One pod's sync (a named async fn: a closure here would trip rustc's `Send` inference for
    /// the spawned loop).
    async fn sync_one<'a>(
        &self,
        uid: &str,
        pod: &'a Pod,
        cache: &Cache,
        state: &mut PodState,
    ) -> (
        String,
        &'a Pod,
        Result<PodStatus, super::runtime::RuntimeError>,
    ) {
        let result = sync::sync_pod(
            &*self.runtime,
            pod,
            &self.settings.node,
            &self.settings.host_ip,
            cache,
            &mut state.backoff,
            &mut state.memory,
            Instant::now(),
            now_time(),
        )
        .await;
        (uid.to_owned(), pod, result)
    }

    /// Stops a pod being deleted with its grace period, in a task of its own, and reports its
    /// final status once its sandbox is gone.
    fn start_termination(&self, pod: &Pod, terminating: &Arc<std::sync::Mutex<HashSet<String>>>) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if !terminating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.clone())
        {
            return;
        }
        let grace = pod
            .metadata
            .deletion_grace_period_seconds
            .or(pod
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds))
            .unwrap_or(30)
            .max(0);
        let (runtime, outbox, pod, settings) = (
            self.runtime.clone(),
            self.outbox.clone(),
            pod.clone(),
            self.settings.clone(),
        );
        let edged = Edged {
            runtime,
            store: self.store.clone(),
            outbox,
            settings,
            tokens: None,
        };
        tokio::spawn(async move {
            let observed = match sync::observe(&*edged.runtime, &uid).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(%uid, error = %e, "cannot list a terminating pod's containers");
                    return;
                }
            };
            if let Err(e) = sync::kill_pod(&*edged.runtime, &observed, grace).await {
                tracing::warn!(%uid, error = %e, "cannot stop a terminating pod");
            }
            // The final status: every container terminated, read before the sandbox goes.
            let stopped = sync::observe(&*edged.runtime, &uid).await;
            for s in observed.pod.sandboxes.iter() {
                if let Err(e) = edged.runtime.remove_pod_sandbox(&s.id).await {
                    tracing::warn!(%uid, error = %e, "cannot remove a terminating pod's sandbox");
                }
            }
            edged.remove_volumes(&uid).await;
            if let Ok(stopped) = stopped {
                let status =
                    sync::final_status(&pod, &stopped, &edged.settings.host_ip, now_time());
                edged.report(&pod, &status).await;
                tracing::info!(%uid, grace, "pod stopped and removed; final status reported");
            }
        });
    }
}

//! The edged dispatcher: follows the local store (pods, ConfigMaps, Secrets) — never the cloud —
//! and gives every pod a worker of its own ([`super::worker`]) that keeps the runtime in line with
//! it and reports the pod's status.
//!
//! - At start it removes sandboxes edged created for pods no longer in the store; running pods
//!   are adopted as they are (their containers are found by the pod UID label, nothing restarts).
//! - A pod change goes to that pod's worker; a ConfigMap or Secret change wakes every worker
//!   (each resolves only what its pod uses). A pod that leaves the store has its worker
//!   remove what is left of it.
//! - A relist of the runtime every `resync` (one call for sandboxes, one for containers) wakes
//!   the workers whose containers changed in a way edged did not cause (a container exiting):
//!   containerd 1.6 has no event stream. It also removes what edged made for pods that have
//!   neither a worker nor a place in the store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use tokio::sync::Semaphore;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::cri_config::{MANAGED_LABEL, NodeSettings, POD_UID_LABEL};
use super::env::ObjectSource;
use super::runtime::{Runtime, api};
use super::tokens::{TokenKey, Tokens};
use super::worker::{self, WorkerContext, WorkerHandle};
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

/// Pods synced against the runtime at the same time at most.
const MAX_CONCURRENT_SYNCS: usize = 32;

/// The ConfigMaps and Secrets in the store, shared with the workers (read under a short lock,
/// never held across an await).
#[derive(Default)]
struct Objects {
    configmaps: HashMap<NsName, ConfigMap>,
    secrets: HashMap<NsName, Secret>,
}

struct SharedSource {
    objects: RwLock<Objects>,
    tokens: Option<Arc<dyn Tokens>>,
}

impl SharedSource {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Objects> {
        self.objects.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Objects> {
        self.objects.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl ObjectSource for SharedSource {
    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap> {
        self.read()
            .configmaps
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }
    fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        self.read()
            .secrets
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }
    fn service_account_token(&self, key: &TokenKey) -> Option<String> {
        self.tokens
            .as_ref()?
            .token(key, kedge_common::pki::now_unix())
    }
}

/// The dispatcher's view of the store: pods, and whether referenced objects changed.
#[derive(Default)]
struct Cache {
    pods: BTreeMap<NsName, Arc<Pod>>,
}

impl Cache {
    /// Applies one stored change; returns whether a ConfigMap or Secret changed.
    fn apply(
        &mut self,
        source: &SharedSource,
        kind: &str,
        namespace: &str,
        name: &str,
        object: Option<&serde_json::Value>,
    ) -> bool {
        let key = (namespace.to_owned(), name.to_owned());
        fn decode<T: serde::de::DeserializeOwned>(v: &serde_json::Value, what: &str) -> Option<T> {
            serde_json::from_value(v.clone())
                .map_err(|e| tracing::error!(%what, error = %e, "cannot decode a stored object; ignored"))
                .ok()
        }
        match (kind, object) {
            ("pod", Some(v)) => {
                if let Some(p) = decode::<Pod>(v, "pod") {
                    self.pods.insert(key, Arc::new(p));
                }
                false
            }
            ("pod", None) => {
                self.pods.remove(&key);
                false
            }
            ("configmap", Some(v)) => {
                if let Some(c) = decode(v, "configmap") {
                    source.write().configmaps.insert(key, c);
                }
                true
            }
            ("configmap", None) => source.write().configmaps.remove(&key).is_some(),
            ("secret", Some(v)) => {
                if let Some(s) = decode(v, "secret") {
                    source.write().secrets.insert(key, s);
                }
                true
            }
            ("secret", None) => source.write().secrets.remove(&key).is_some(),
            _ => false,
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
        let source = Arc::new(SharedSource {
            objects: RwLock::new(Objects::default()),
            tokens: self.tokens.clone(),
        });
        let ctx = Arc::new(WorkerContext {
            runtime: self.runtime.clone(),
            outbox: self.outbox.clone(),
            settings: self.settings.clone(),
            source: source.clone(),
            tokens: self.tokens.clone(),
            sync_slots: Arc::new(Semaphore::new(MAX_CONCURRENT_SYNCS)),
        });
        let mut workers: HashMap<String, WorkerHandle> = HashMap::new();
        let mut relist = Relist::default();
        let mut cleaned_up = false;
        let mut tick = tokio::time::interval(self.settings.resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            let mut cache = Cache::default();
            *source.write() = Objects::default();
            for r in &rows {
                cache.apply(
                    &source,
                    &r.kind,
                    &r.namespace,
                    &r.name,
                    Some(&r.object.content),
                );
            }
            let mut objects_changed = true;
            loop {
                if !cleaned_up {
                    cleaned_up = self.remove_orphans(&cache).await;
                }
                self.dispatch(&ctx, &cache, &mut workers, objects_changed, &shutdown);
                objects_changed = false;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        self.relist(&cache, &mut workers, &mut relist).await;
                    }
                    change = changes.recv() => match change {
                        Ok(c) => {
                            let mut batch = vec![c];
                            // Take whatever else is queued before dispatching.
                            while let Ok(c) = changes.try_recv() {
                                batch.push(c);
                            }
                            for c in batch.into_iter().filter(|c| c.seq > snapshot_seq) {
                                objects_changed |= cache.apply(&source, &c.kind, &c.namespace, &c.name, (!c.deleted).then_some(&c.object));
                            }
                        }
                        Err(RecvError::Lagged(_)) => continue 'follow,
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        }
    }

    /// Hands every pod to its worker (starting new ones), tells workers of pods that left the
    /// store, and wakes every worker when objects they may use changed.
    fn dispatch(
        &self,
        ctx: &Arc<WorkerContext<R, O>>,
        cache: &Cache,
        workers: &mut HashMap<String, WorkerHandle>,
        objects_changed: bool,
        shutdown: &CancellationToken,
    ) {
        let mut live: HashSet<&str> = HashSet::new();
        for pod in cache.pods.values() {
            let Some(uid) = pod.metadata.uid.as_deref() else {
                continue;
            };
            live.insert(uid);
            match workers.get(uid) {
                Some(w) => {
                    w.update(pod.clone());
                    if objects_changed {
                        w.nudge();
                    }
                }
                None => {
                    let w = worker::spawn(ctx.clone(), pod.clone(), shutdown.child_token());
                    workers.insert(uid.to_owned(), w);
                }
            }
        }
        // Pods gone from the store: their workers clean up and end on their own.
        workers.retain(|uid, w| {
            if live.contains(uid.as_str()) {
                true
            } else {
                w.remove();
                false
            }
        });
    }

    /// One look at the runtime for all pods: wakes workers whose containers changed, and removes
    /// what edged made for pods it no longer knows.
    async fn relist(
        &self,
        cache: &Cache,
        workers: &mut HashMap<String, WorkerHandle>,
        relist: &mut Relist,
    ) {
        let managed = HashMap::from([(MANAGED_LABEL.to_owned(), "true".to_owned())]);
        let sandboxes = self
            .runtime
            .list_pod_sandboxes(Some(api::PodSandboxFilter {
                label_selector: managed.clone(),
                ..Default::default()
            }))
            .await;
        let containers = self
            .runtime
            .list_containers(Some(api::ContainerFilter {
                label_selector: managed,
                ..Default::default()
            }))
            .await;
        let (Ok(sandboxes), Ok(containers)) = (sandboxes, containers) else {
            tracing::debug!("relist failed; next tick");
            return;
        };
        let mut now: HashMap<String, Vec<(String, i32)>> = HashMap::new();
        for s in &sandboxes {
            if let Some(uid) = s.labels.get(POD_UID_LABEL) {
                now.entry(uid.clone())
                    .or_default()
                    .push((s.id.clone(), s.state));
            }
        }
        for c in &containers {
            if let Some(uid) = c.labels.get(POD_UID_LABEL) {
                now.entry(uid.clone())
                    .or_default()
                    .push((c.id.clone(), c.state));
            }
        }
        for v in now.values_mut() {
            v.sort();
        }
        for (uid, seen) in &now {
            if relist.last.get(uid) != Some(seen)
                && let Some(w) = workers.get(uid)
            {
                w.nudge();
            }
        }
        // Sandboxes or containers of pods neither stored nor being handled: left over.
        let stored: HashSet<&str> = cache
            .pods
            .values()
            .filter_map(|p| p.metadata.uid.as_deref())
            .collect();
        for uid in now.keys() {
            if !stored.contains(uid.as_str())
                && !workers.contains_key(uid)
                && !relist.removing.contains(uid)
                && relist.last.contains_key(uid)
            {
                tracing::info!(%uid, "removing leftovers of a pod edged no longer has");
                relist.removing.insert(uid.clone());
                let (rt, root, uid) = (
                    self.runtime.clone(),
                    self.settings.node.root_dir.clone(),
                    uid.clone(),
                );
                tokio::spawn(async move { worker::remove_pod(&*rt, &root, &uid).await });
            }
        }
        relist.removing.retain(|uid| now.contains_key(uid));
        relist.last = now;
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
            worker::remove_pod(&*self.runtime, &self.settings.node.root_dir, &uid).await;
        }
        true
    }
}

/// What the last relist saw, per pod UID: (sandbox or container ID, state), sorted.
#[derive(Default)]
struct Relist {
    last: HashMap<String, Vec<(String, i32)>>,
    /// Leftovers being removed (not started twice).
    removing: HashSet<String>,
}

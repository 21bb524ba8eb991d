//! synccontroller: what each edge node has acknowledged, kept across cloudcore restarts.
//!
//! KubeEdge writes one ObjectSync object per (node, object) and updates it on every ack: an API
//! write per acknowledged message. kedge keeps one ConfigMap per node (`kedge-sync-<node>` in
//! cloudcore's namespace, labelled `kedge.io/sync=true`) holding `{key: resourceVersion}` for
//! every object the node acknowledged, written at most once per second per node that changed.
//! That is ~1 write per busy node per second instead of one per message, and one list call at
//! start-up instead of one per object.
//!
//! Only nodes that send no inventory are recorded — KubeEdge edges. A kedge edge says what it
//! holds on every connect (see `edgecontroller::resync`), which is exact where recorded acks are
//! not: an ack not yet recorded when cloudcore dies, or lost with a cut link, leaves the record
//! wrong. So the ConfigMap of a node is deleted once the node sends an inventory, and a fleet of
//! kedge edges costs no sync writes at all.
//!
//! For KubeEdge edges, losing the last second of acks in a crash means: a node that looks as if
//! it had an older version gets the newer one again, finds it stale and acks it (harmless); an
//! object acked in that second and deleted while cloudcore is down stays on the node (the gap the
//! inventory closes for kedge edges).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kedge_common::Operation;
use kube::api::{Api, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::cloudhub::{Acked, ObjectKey};

pub const SYNC_LABEL: &str = "kedge.io/sync";
const DATA_KEY: &str = "acked.json";
const FIELD_MANAGER: &str = "kedge-cloudcore";

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("reading sync state from {namespace}: {source}")]
    Load {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("sync state ConfigMap {name} is corrupt ({reason}); it is ignored and rebuilt")]
    Corrupt { name: String, reason: String },
}

/// One acknowledged object, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckedObject {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
    pub rv: String,
}

impl AckedObject {
    pub fn key(&self) -> ObjectKey {
        ObjectKey {
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
        }
    }
}

fn map_key(k: &ObjectKey) -> String {
    format!(
        "{}/{}/{}/{}",
        k.kind,
        k.namespace.as_deref().unwrap_or("null"),
        k.name,
        k.uid
    )
}

/// The acknowledged objects a record holds.
fn parse(cm: &ConfigMap) -> Result<Vec<AckedObject>, String> {
    cm.data
        .as_ref()
        .and_then(|d| d.get(DATA_KEY))
        .ok_or_else(|| format!("no `{DATA_KEY}` key"))
        .and_then(|text| serde_json::from_str::<Vec<AckedObject>>(text).map_err(|e| e.to_string()))
}

pub fn configmap_name(node: &str) -> String {
    format!("kedge-sync-{node}")
}

pub struct SyncState {
    api: Api<ConfigMap>,
    acked: Mutex<HashMap<String, BTreeMap<String, AckedObject>>>,
    dirty: Mutex<HashSet<String>>,
    /// Nodes whose ConfigMap exists (loaded or written by us).
    persisted: Mutex<HashSet<String>>,
    /// Nodes whose ConfigMap is to be deleted at the next flush.
    forgotten: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SyncState {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        SyncState {
            api: Api::namespaced(client, namespace),
            acked: Mutex::new(HashMap::new()),
            dirty: Mutex::new(HashSet::new()),
            persisted: Mutex::new(HashSet::new()),
            forgotten: Mutex::new(HashSet::new()),
        }
    }

    /// Reads `node`'s record afresh (a KubeEdge edge just connected here; another replica may
    /// have served it since) and makes it the one acks are recorded into. A corrupt record is
    /// reported and read as empty: the node then gets everything again, which is safe.
    pub async fn reload(&self, node: &str) -> Result<Vec<AckedObject>, SyncError> {
        let name = configmap_name(node);
        let cm = self
            .api
            .get_opt(&name)
            .await
            .map_err(|source| SyncError::Load {
                namespace: self.api.namespace().unwrap_or_default().to_owned(),
                source,
            })?;
        let objects = match cm {
            None => Vec::new(),
            Some(cm) => {
                lock(&self.persisted).insert(node.to_owned());
                match parse(&cm) {
                    Ok(objects) => objects,
                    Err(reason) => {
                        tracing::error!(error = %SyncError::Corrupt { name, reason }, "sync state");
                        Vec::new()
                    }
                }
            }
        };
        // Acks recorded here but not yet written are newer than what was read.
        let unwritten = lock(&self.dirty).contains(node);
        let mut all = lock(&self.acked);
        let entry = all.entry(node.to_owned()).or_default();
        if !unwritten {
            entry.clear();
        }
        for o in &objects {
            entry.entry(map_key(&o.key())).or_insert_with(|| o.clone());
        }
        Ok(entry.values().cloned().collect())
    }

    /// Records an ack from the edge.
    pub fn record(&self, node: &str, acked: &Acked) {
        let mut all = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        let entries = all.entry(node.to_owned()).or_default();
        let k = map_key(&acked.key);
        if acked.operation == Operation::Delete {
            entries.remove(&k);
        } else {
            entries.insert(
                k,
                AckedObject {
                    kind: acked.key.kind.clone(),
                    namespace: acked.key.namespace.clone(),
                    name: acked.key.name.clone(),
                    uid: acked.key.uid.clone(),
                    rv: acked.resource_version.clone(),
                },
            );
        }
        drop(all);
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_owned());
    }

    /// Stops recording `node` (it sends inventories) and deletes its ConfigMap, if any, at the
    /// next flush.
    pub fn forget(&self, node: &str) {
        lock(&self.acked).remove(node);
        lock(&self.dirty).remove(node);
        if lock(&self.persisted).remove(node) {
            lock(&self.forgotten).insert(node.to_owned());
        }
    }

    /// Everything `node` is known to hold.
    pub fn acked_objects(&self, node: &str) -> Vec<AckedObject> {
        let all = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        all.get(node)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Writes the state of every node that changed since the last flush, and deletes the state
    /// of forgotten nodes.
    pub async fn flush(&self) {
        let forgotten: Vec<String> = std::mem::take(&mut *lock(&self.forgotten))
            .into_iter()
            .collect();
        for node in forgotten {
            let name = configmap_name(&node);
            match self.api.delete(&name, &Default::default()).await {
                Ok(_) => tracing::info!(%node, "node sends inventories; its sync state is deleted"),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    tracing::warn!(%node, error = %e, "cannot delete sync state; will retry");
                    lock(&self.forgotten).insert(node);
                }
            }
        }
        let nodes: Vec<String> =
            std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        for node in nodes {
            let objects = self.acked_objects(&node);
            let text = match serde_json::to_string(&objects) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(%node, error = %e, "cannot encode sync state");
                    continue;
                }
            };
            let name = configmap_name(&node);
            let body = serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "labels": {SYNC_LABEL: "true"}},
                "data": {DATA_KEY: text},
            });
            let pp = PatchParams::apply(FIELD_MANAGER).force();
            lock(&self.persisted).insert(node.clone());
            if let Err(e) = self.api.patch(&name, &pp, &Patch::Apply(&body)).await {
                tracing::warn!(%node, error = %e, "cannot write sync state; will retry");
                self.dirty
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(node);
            }
        }
    }

    /// Flushes once a second until `shutdown`, then a last time.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => self.flush().await,
            }
        }
        self.flush().await;
    }
}

//! Making a node hold exactly what it must after a gap: a cloudcore restart or a new session.
//!
//! Two sources of truth, by what the edge can do:
//! - **A kedge edge sends its inventory** on every connect. The node's queue has already taken it
//!   as the truth (see `cloudhub::queue`); here the controller compares it with what the node
//!   must hold and sends what is missing or older, and deletes whatever the node holds that it
//!   should not — including objects this cloudcore never heard of (deleted while it was down, or
//!   acked in a session whose ack was lost). This is exact: no orphans, nothing missing.
//! - **A KubeEdge edge sends none.** For it the synccontroller records acks in the cluster, and
//!   on every connect that record stands in for the inventory: what it lacks is sent, what it
//!   acknowledged and should not hold is deleted (best effort: an ack not yet recorded when the
//!   replica serving it died is not known, and is sent again).
//!
//! Either way a node can connect to any replica: queues exist only for connected nodes
//! (`cloudhub::HubSettings::queue_retention`), and a session starts from the node's truth, not
//! from what this process happened to see.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kedge_common::Operation;
use serde_json::Value;

use super::refs::{ObjectRef, RefKind};
use super::{Loop, obj_key, rv_of, to_json};
use crate::cloudhub::ObjectKey;
use crate::cloudhub::queue::rv_is_newer;

/// One object a node must hold. Its content is encoded only if it has to be sent: most objects
/// of a reconnecting node are current, and encoding them all would dominate the exchange.
struct Wanted<'a> {
    key: ObjectKey,
    rv: String,
    object: WantedObject<'a>,
}

enum WantedObject<'a> {
    ConfigMap(&'a ConfigMap),
    Secret(&'a Secret),
    Node(&'a Node),
    Pod(&'a Pod),
    /// Devices and models, already encoded (few per node).
    Encoded(Value),
}

impl WantedObject<'_> {
    fn content(&self) -> Value {
        match self {
            WantedObject::ConfigMap(o) => to_json(*o),
            WantedObject::Secret(o) => to_json(*o),
            WantedObject::Node(o) => to_json(*o),
            WantedObject::Pod(o) => to_json(*o),
            WantedObject::Encoded(v) => v.clone(),
        }
    }
}

impl Loop {
    /// The first lists are done: the controller knows what every node must hold.
    pub(super) fn initial_lists_done(&mut self) {
        self.stats.initial_sync_done.store(true, Ordering::Relaxed);
        tracing::info!(
            pending = self.pending_inventories.len(),
            "initial lists done; nodes that connected meanwhile are reconciled now"
        );
    }

    /// A node without an inventory (a KubeEdge edge) connected: read what it acknowledged, as
    /// recorded in the cluster by whichever replica served it last, and treat that as its
    /// inventory. Read fresh on every connect: another replica may have written it since.
    pub(super) fn read_ack_record(&self, node: String) {
        let (sync, tx) = (self.sync.clone(), self.retry_tx.clone());
        tokio::spawn(async move {
            let record = match sync.reload(&node).await {
                Ok(objects) => Some(objects),
                Err(e) => {
                    tracing::warn!(%node, error = %e, "cannot read what the node acknowledged; retrying in 2 s");
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    None
                }
            };
            if let Some(tx) = tx.upgrade() {
                let _ = tx.send(super::Input::AckRecord(node, record)).await;
            }
        });
    }

    pub(super) fn on_ack_record(
        &mut self,
        node: String,
        record: Option<Vec<crate::synccontroller::AckedObject>>,
    ) {
        // Gone again, or it sends inventories now: nothing to do.
        if !self.hub.is_connected(&node) || self.inventory_nodes.contains(&node) {
            return;
        }
        let Some(objects) = record else {
            self.read_ack_record(node);
            return;
        };
        let held: HashMap<ObjectKey, String> =
            objects.into_iter().map(|o| (o.key(), o.rv)).collect();
        self.hub.apply_ack_record(&node, &held);
        if self.orphans_checked {
            self.reconcile_inventory(&node, held);
        } else {
            self.pending_inventories.insert(node, held);
        }
    }

    /// Everything `node` must hold now, references first (the order they are sent in).
    ///
    /// Whatever a node holds that is not listed here is deleted from it on its next connect: a
    /// new kind cloudcore sends to nodes must be added here.
    fn wanted_by(&self, node: &str) -> Vec<Wanted<'_>> {
        let mut out = Vec::new();
        let mut refs: Vec<&ObjectRef> = self.holders.held_by(node).collect();
        refs.sort();
        for r in refs {
            let key = (r.namespace.clone(), r.name.clone());
            let found = match r.kind {
                RefKind::ConfigMap => self
                    .configmaps
                    .get(&key)
                    .map(|o| (WantedObject::ConfigMap(o), &o.metadata)),
                RefKind::Secret => self
                    .secrets
                    .get(&key)
                    .map(|o| (WantedObject::Secret(o), &o.metadata)),
            };
            // A reference that does not exist (yet) is nothing the node can hold.
            let Some((object, meta)) = found else {
                continue;
            };
            out.push(Wanted {
                key: obj_key(
                    r.kind.wire_type(),
                    Some(&r.namespace),
                    &r.name,
                    meta.uid.as_deref().unwrap_or_default(),
                ),
                rv: meta.resource_version.clone().unwrap_or_default(),
                object,
            });
        }
        if let Some(n) = self.edge_nodes.get(node) {
            out.push(Wanted {
                key: obj_key(
                    "node",
                    None,
                    node,
                    n.metadata.uid.as_deref().unwrap_or_default(),
                ),
                rv: rv_of(n),
                object: WantedObject::Node(n),
            });
        }
        for (key, rv, content) in self.devices_wanted_by(node) {
            out.push(Wanted {
                key,
                rv,
                object: WantedObject::Encoded(content),
            });
        }
        let mut pods: Vec<_> = self.pods.iter().filter(|(_, e)| e.node == node).collect();
        pods.sort_by(|a, b| a.0.cmp(b.0));
        for ((ns, name), e) in pods {
            out.push(Wanted {
                key: obj_key(
                    "pod",
                    Some(ns),
                    name,
                    e.pod.metadata.uid.as_deref().unwrap_or_default(),
                ),
                rv: rv_of(&e.pod),
                object: WantedObject::Pod(&e.pod),
            });
        }
        out
    }

    /// Makes `node` hold exactly what it must, given its inventory: deletes for what it holds
    /// and should not (at the version it holds), then what it lacks or holds older. Objects it
    /// holds current are not sent (the queue already knows them as acked).
    pub(super) fn reconcile_inventory(&mut self, node: &str, held: HashMap<ObjectKey, String>) {
        let mut to_send = Vec::new();
        let (orphans, wanted_count) = {
            let wanted = self.wanted_by(node);
            let wanted_keys: HashSet<&ObjectKey> = wanted.iter().map(|w| &w.key).collect();
            let orphans: Vec<(ObjectKey, String)> = held
                .iter()
                .filter(|(k, _)| !wanted_keys.contains(k))
                .map(|(k, rv)| (k.clone(), rv.clone()))
                .collect();
            for w in &wanted {
                let op = match held.get(&w.key) {
                    Some(h) if !rv_is_newer(&w.rv, h) => {
                        self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Some(_) => Operation::Update,
                    None => Operation::Insert,
                };
                to_send.push((w.key.clone(), w.rv.clone(), op, w.object.content()));
            }
            (orphans, wanted.len())
        };
        let mut orphans = orphans;
        // Pods first, so a pod never outlives what it references on the node.
        orphans.sort_by(|(a, _), (b, _)| (a.kind != "pod", a).cmp(&(b.kind != "pod", b)));
        let deletes = orphans.len();
        for (key, rv) in orphans {
            let content = serde_json::json!({
                "metadata": {"name": key.name, "namespace": key.namespace, "uid": key.uid}
            });
            self.send(node, key, &rv, Operation::Delete, content);
        }
        let sent = to_send.len();
        for (key, rv, op, content) in to_send {
            self.send(node, key, &rv, op, content);
        }
        // Versions queued while the node was away (a pod's newer status, say) went into the
        // queue before the references just sent: put those first.
        self.hub.order_references_first(node);
        self.stats
            .inventories_reconciled
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            %node,
            held = held.len(),
            wanted = wanted_count,
            deletes,
            sent,
            "inventory reconciled"
        );
    }

    /// Inventories that arrived before the first lists finished, now that the controller knows
    /// what every node must hold.
    pub(super) fn reconcile_held_inventories(&mut self) {
        for (node, held) in std::mem::take(&mut self.pending_inventories) {
            self.reconcile_inventory(&node, held);
        }
    }
}

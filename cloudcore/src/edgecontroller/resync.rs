//! Making a node hold exactly what it must after a gap: a cloudcore restart or a new session.
//!
//! Two sources of truth, by what the edge can do:
//! - **A kedge edge sends its inventory** on every connect. The node's queue has already taken it
//!   as the truth (see `cloudhub::queue`); here the controller compares it with what the node
//!   must hold and sends what is missing or older, and deletes whatever the node holds that it
//!   should not — including objects this cloudcore never heard of (deleted while it was down, or
//!   acked in a session whose ack was lost). This is exact: no orphans, nothing missing.
//! - **A KubeEdge edge sends none.** For it the synccontroller records acks, and after a restart
//!   objects it acknowledged that are gone now are sent as deletes (best effort: an ack not yet
//!   recorded when cloudcore died is not known).

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
    pub(super) fn delete_orphans_after_restart(&mut self) {
        let mut deletes = 0;
        for node in self.sync.nodes() {
            if self.inventory_nodes.contains(&node) {
                continue;
            }
            for o in self.sync.acked_objects(&node) {
                let still_wanted = match o.kind.as_str() {
                    "pod" => self
                        .pods
                        .get(&(o.namespace.clone().unwrap_or_default(), o.name.clone()))
                        .is_some_and(|e| {
                            e.node == node && e.pod.metadata.uid.as_deref() == Some(o.uid.as_str())
                        }),
                    "configmap" | "secret" => {
                        let kind = if o.kind == "configmap" {
                            RefKind::ConfigMap
                        } else {
                            RefKind::Secret
                        };
                        let r = ObjectRef {
                            kind: kind.clone(),
                            namespace: o.namespace.clone().unwrap_or_default(),
                            name: o.name.clone(),
                        };
                        let held = self.holders.holds(&r, &node);
                        let key = (r.namespace.clone(), r.name.clone());
                        let uid_now = match kind {
                            RefKind::ConfigMap => self
                                .configmaps
                                .get(&key)
                                .and_then(|c| c.metadata.uid.clone()),
                            RefKind::Secret => {
                                self.secrets.get(&key).and_then(|c| c.metadata.uid.clone())
                            }
                        };
                        held && uid_now.as_deref() == Some(o.uid.as_str())
                    }
                    "node" => self
                        .edge_nodes
                        .get(&node)
                        .is_some_and(|n| n.metadata.uid.as_deref() == Some(o.uid.as_str())),
                    "device" | "devicemodel" => self.device_still_wanted(
                        &node,
                        &o.kind,
                        &(o.namespace.clone().unwrap_or_default(), o.name.clone()),
                        &o.uid,
                    ),
                    _ => true,
                };
                if still_wanted {
                    continue;
                }
                let rv = o.rv.clone();
                let content = serde_json::json!({
                    "metadata": {"name": o.name, "namespace": o.namespace, "uid": o.uid}
                });
                self.send(
                    &node,
                    obj_key(&o.kind, o.namespace.as_deref(), &o.name, &o.uid),
                    &rv,
                    Operation::Delete,
                    content,
                );
                deletes += 1;
            }
        }
        self.stats.initial_sync_done.store(true, Ordering::Relaxed);
        tracing::info!(
            deletes,
            unchanged = self.stats.unchanged.load(Ordering::Relaxed),
            "initial sync done; objects deleted while cloudcore was away sent as deletes"
        );
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
                    Some(h) if !rv_is_newer(&w.rv, h) => continue,
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

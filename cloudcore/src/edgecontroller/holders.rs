//! The ConfigMaps and Secrets pods reference, on the nodes that need them: each referenced
//! object is held by the nodes whose pods use it (counted per pod), sent to a node before the
//! first pod that needs it, updated there while held, and deleted there when the last pod on that
//! node stops referencing it.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kedge_common::Operation;
use kube::Resource;
use kube::api::Api;
use kube::runtime::watcher;
use serde::Serialize;

use super::refs::{ObjectRef, RefKind};
use super::{Loop, NsName, ns_name, obj_key, to_json};

impl Loop {
    pub(super) fn send_ref(&self, node: &str, r: &ObjectRef, op: Operation) {
        let key = (r.namespace.clone(), r.name.clone());
        let (obj, meta) = match r.kind {
            RefKind::ConfigMap => match self.configmaps.get(&key) {
                Some(o) => (to_json(o), o.metadata.clone()),
                None => return,
            },
            RefKind::Secret => match self.secrets.get(&key) {
                Some(o) => (to_json(o), o.metadata.clone()),
                None => return,
            },
        };
        self.send(
            node,
            obj_key(
                r.kind.wire_type(),
                Some(&r.namespace),
                &r.name,
                meta.uid.as_deref().unwrap_or_default(),
            ),
            meta.resource_version.as_deref().unwrap_or_default(),
            op,
            obj,
        );
    }

    /// A node now needs `r` once more; sends it when it is new to the node.
    pub(super) fn hold(&mut self, node: &str, r: &ObjectRef) {
        if self.holders.hold(r, node) {
            self.send_ref(node, r, Operation::Insert);
        }
    }

    /// A node needs `r` once less; deletes it from the node when no pod there uses it.
    pub(super) fn release(&mut self, node: &str, r: &ObjectRef) {
        if self.holders.release(r, node) {
            self.send_ref_delete(node, r);
        }
    }

    /// Deletes `r` from a node at the version the node holds (see `queue::supersedes`). A
    /// reference that never existed never reached the node, so nothing is sent then.
    pub(super) fn send_ref_delete(&self, node: &str, r: &ObjectRef) {
        self.send_ref(node, r, Operation::Delete);
    }

    /// A referenced object the ConfigMap/Secret watch has not delivered yet (the watches are
    /// independent streams, so a pod can be seen first): read it once, so it still goes first.
    pub(super) async fn fetch_missing(&mut self, r: &ObjectRef) {
        let key = (r.namespace.clone(), r.name.clone());
        let missing = match r.kind {
            RefKind::ConfigMap => !self.configmaps.contains_key(&key),
            RefKind::Secret => !self.secrets.contains_key(&key),
        };
        if !missing {
            return;
        }
        let result = match r.kind {
            RefKind::ConfigMap => Api::<ConfigMap>::namespaced(self.client.clone(), &r.namespace)
                .get_opt(&r.name)
                .await
                .map(|o| {
                    o.map(|mut o| {
                        o.metadata.managed_fields = None;
                        self.configmaps.insert(key.clone(), o);
                    })
                }),
            RefKind::Secret => Api::<Secret>::namespaced(self.client.clone(), &r.namespace)
                .get_opt(&r.name)
                .await
                .map(|o| {
                    o.map(|mut o| {
                        o.metadata.managed_fields = None;
                        self.secrets.insert(key.clone(), o);
                    })
                }),
        };
        if let Err(e) = result {
            tracing::warn!(namespace = %r.namespace, name = %r.name, error = %e, "cannot read a pod's reference; it follows when the watch delivers it");
        }
    }

    pub(super) fn on_refs<K>(&mut self, ev: watcher::Event<K>, kind: RefKind)
    where
        K: Resource + Clone + Serialize,
        Self: RefCache<K>,
    {
        let idx = match kind {
            RefKind::ConfigMap => 2,
            RefKind::Secret => 3,
        };
        match ev {
            watcher::Event::Apply(o) => self.ref_applied(o, kind),
            watcher::Event::InitApply(o) => {
                self.relists[idx].saw(ns_name(&o));
                self.ref_applied(o, kind);
            }
            watcher::Event::Delete(o) => self.ref_deleted(ns_name(&o), kind),
            watcher::Event::Init => self.relists[idx].init(),
            watcher::Event::InitDone => {
                let seen = self.relists[idx].done();
                let gone: Vec<NsName> = <Self as RefCache<K>>::keys(self)
                    .into_iter()
                    .filter(|k| !seen.contains(k))
                    .collect();
                for k in gone {
                    self.ref_deleted(k, kind.clone());
                }
            }
        }
    }

    pub(super) fn ref_applied<K>(&mut self, obj: K, kind: RefKind)
    where
        K: Resource + Clone + Serialize,
        Self: RefCache<K>,
    {
        let key = ns_name(&obj);
        let r = ObjectRef {
            kind,
            namespace: key.0.clone(),
            name: key.1.clone(),
        };
        <Self as RefCache<K>>::put(self, key, obj);
        let nodes = self.holders.nodes(&r);
        for node in nodes {
            self.send_ref(&node, &r, Operation::Update);
        }
    }

    pub(super) fn ref_deleted(&mut self, key: NsName, kind: RefKind) {
        let r = ObjectRef {
            kind,
            namespace: key.0.clone(),
            name: key.1.clone(),
        };
        let nodes = self.holders.nodes(&r);
        for node in &nodes {
            self.send_ref_delete(node, &r);
        }
        // Pods still reference it by name: if it comes back, they get it again.
        match r.kind {
            RefKind::ConfigMap => {
                self.configmaps.remove(&key);
            }
            RefKind::Secret => {
                self.secrets.remove(&key);
            }
        }
    }
}

/// Access to the ConfigMap and Secret caches by type.
pub(super) trait RefCache<K> {
    fn put(&mut self, key: NsName, obj: K);
    fn keys(&self) -> Vec<NsName>;
}

impl RefCache<ConfigMap> for Loop {
    fn put(&mut self, key: NsName, obj: ConfigMap) {
        self.configmaps.insert(key, obj);
    }
    fn keys(&self) -> Vec<NsName> {
        self.configmaps.keys().cloned().collect()
    }
}

impl RefCache<Secret> for Loop {
    fn put(&mut self, key: NsName, obj: Secret) {
        self.secrets.insert(key, obj);
    }
    fn keys(&self) -> Vec<NsName> {
        self.secrets.keys().cloned().collect()
    }
}

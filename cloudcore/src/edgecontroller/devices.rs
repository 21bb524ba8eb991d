//! The event loop's side of devices: watch events go to `devicecontroller::Devices`, whose
//! decisions are carried out here on the nodes' queues (keyed like pods, so acks, resends and
//! inventories cover devices too).

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use kedge_common::crd::{Device, DeviceModel};
use kedge_common::{Message, Operation};
use kube::Resource;
use kube::runtime::events::{Event, EventType};
use kube::runtime::watcher;

use super::{Loop, NsName, ns_name, obj_key, rv_of, to_json};
use crate::devicecontroller::{self, Action};

/// Whether the cluster serves `devices.kubeedge.io/v1beta1` (the CRDs are installed).
pub(super) async fn devices_served(client: &kube::Client) -> bool {
    match client
        .list_api_group_resources("devices.kubeedge.io/v1beta1")
        .await
    {
        Ok(list) => {
            let has = |plural: &str| list.resources.iter().any(|r| r.name == plural);
            if has("devices") && has("devicemodels") {
                true
            } else {
                tracing::warn!(
                    "devices.kubeedge.io/v1beta1 lacks devices or devicemodels; device controller off (install the CRDs from crds/ and restart)"
                );
                false
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "devices.kubeedge.io/v1beta1 is not served; device controller off (install the CRDs from crds/ and restart)");
            false
        }
    }
}

impl Loop {
    fn edge_node_names(&self) -> HashSet<String> {
        self.edge_nodes.keys().cloned().collect()
    }

    pub(super) fn on_devices(&mut self, ev: watcher::Event<Device>) {
        let edges = self.edge_node_names();
        let Some(devices) = self.devices.as_mut() else {
            return;
        };
        let actions = match ev {
            watcher::Event::Apply(d) => devices.device_applied(d, &edges),
            watcher::Event::InitApply(d) => {
                self.device_relists[0].saw(ns_name(&d));
                devices.device_applied(d, &edges)
            }
            watcher::Event::Delete(d) => devices.device_deleted(&ns_name(&d), Some(d)),
            watcher::Event::Init => {
                self.device_relists[0].init();
                Vec::new()
            }
            watcher::Event::InitDone => {
                let seen = self.device_relists[0].done();
                let mut out = Vec::new();
                for k in devices.device_keys() {
                    if !seen.contains(&k) {
                        out.extend(devices.device_deleted(&k, None));
                    }
                }
                out
            }
        };
        self.carry_out(actions);
    }

    pub(super) fn on_device_models(&mut self, ev: watcher::Event<DeviceModel>) {
        let edges = self.edge_node_names();
        let Some(devices) = self.devices.as_mut() else {
            return;
        };
        let actions = match ev {
            watcher::Event::Apply(m) => devices.model_applied(m, &edges),
            watcher::Event::InitApply(m) => {
                self.device_relists[1].saw(ns_name(&m));
                devices.model_applied(m, &edges)
            }
            watcher::Event::Delete(m) => devices.model_deleted(&ns_name(&m), &edges),
            watcher::Event::Init => {
                self.device_relists[1].init();
                Vec::new()
            }
            watcher::Event::InitDone => {
                let seen = self.device_relists[1].done();
                let mut out = Vec::new();
                for k in devices.model_keys() {
                    if !seen.contains(&k) {
                        out.extend(devices.model_deleted(&k, &edges));
                    }
                }
                out
            }
        };
        self.carry_out(actions);
    }

    /// A node became, or stopped being, an edge node.
    pub(super) fn edge_nodes_changed(&mut self) {
        let edges = self.edge_node_names();
        let Some(devices) = self.devices.as_mut() else {
            return;
        };
        let actions = devices.nodes_changed(&edges);
        self.carry_out(actions);
    }

    fn carry_out(&mut self, actions: Vec<Action>) {
        let mut touched: Vec<NsName> = Vec::new();
        for a in actions {
            match a {
                Action::Send {
                    node,
                    kind,
                    namespace,
                    name,
                    uid,
                    rv,
                    op,
                    content,
                } => {
                    if kind == "device" {
                        touched.push((namespace.clone(), name.clone()));
                    }
                    self.send(
                        &node,
                        obj_key(kind, Some(&namespace), &name, &uid),
                        &rv,
                        op,
                        content,
                    );
                }
                Action::Membership { node, message } => {
                    let content = serde_json::to_value(&message).unwrap_or_default();
                    let msg = Message::new(
                        devicecontroller::SOURCE,
                        "twin",
                        Operation::Update,
                        format!("node/{node}/membership"),
                        content,
                    );
                    if let Err(e) = self.hub.enqueue(None, msg) {
                        tracing::warn!(%node, error = %e, "cannot queue a membership update");
                    }
                }
                Action::Invalid {
                    namespace,
                    name,
                    uid,
                    reason,
                } => {
                    self.stats.invalid_devices.fetch_add(1, Ordering::Relaxed);
                    // One Event per reason in the cluster, not one per replica.
                    if !self.leads() {
                        continue;
                    }
                    let recorder = self.events.clone();
                    tokio::spawn(async move {
                        let reference = k8s_openapi::api::core::v1::ObjectReference {
                            api_version: Some(Device::api_version(&()).into_owned()),
                            kind: Some(Device::kind(&()).into_owned()),
                            namespace: Some(namespace.clone()),
                            name: Some(name.clone()),
                            uid: Some(uid),
                            ..Default::default()
                        };
                        let ev = Event {
                            type_: EventType::Warning,
                            reason: "InvalidDevice".into(),
                            note: Some(reason),
                            action: "SendToNode".into(),
                            secondary: None,
                        };
                        if let Err(e) = recorder.publish(&ev, &reference).await {
                            tracing::warn!(%namespace, %name, error = %e, "cannot record the invalid device event");
                        }
                    });
                }
            }
        }
        if touched.is_empty() {
            return;
        }
        let Some(devices) = self.devices.as_ref() else {
            return;
        };
        let mut owners = self
            .shared
            .device_owner
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for key in touched {
            match devices.node_of(&key) {
                Some(node) => {
                    let uid = devices.uid_of(&key).unwrap_or_default();
                    owners.insert(key, (node.to_owned(), uid));
                }
                None => {
                    owners.remove(&key);
                }
            }
        }
    }

    /// Devices and models `node` must hold, as (key, rv, content), models first.
    pub(super) fn devices_wanted_by(
        &self,
        node: &str,
    ) -> Vec<(crate::cloudhub::ObjectKey, String, serde_json::Value)> {
        fn entry<K: Resource + serde::Serialize>(
            kind: &str,
            o: &K,
        ) -> (crate::cloudhub::ObjectKey, String, serde_json::Value) {
            let key = obj_key(
                kind,
                o.meta().namespace.as_deref(),
                o.meta().name.as_deref().unwrap_or_default(),
                o.meta().uid.as_deref().unwrap_or_default(),
            );
            (key, rv_of(o), to_json(o))
        }
        let Some(devices) = self.devices.as_ref() else {
            return Vec::new();
        };
        let (models, devs) = devices.wanted_by(node);
        models
            .into_iter()
            .map(|m| entry("devicemodel", m))
            .chain(devs.into_iter().map(|d| entry("device", d)))
            .collect()
    }
}

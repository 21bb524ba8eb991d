//! devicecontroller: Devices and DeviceModels (`devices.kubeedge.io/v1beta1`) to the edge nodes
//! that host them, and their reported twins back into DeviceStatus objects.
//!
//! Down, this module only *decides*: given watch events it returns the [`Action`]s a node needs —
//! the model before the first device that uses it, the Device itself (its `desired` values
//! travel inside it, as KubeEdge v1.23 sends them), a membership message for KubeEdge's
//! DeviceTwin, and deletes when a device moves away or goes. edgecontroller's event loop carries
//! the actions out on the same per-node queues as pods, so devices get the same acks, resends and
//! inventory reconciliation. A decision core without I/O keeps the moving-device cases testable.
//!
//! A device that cannot work — its model is missing, it names a property the model lacks, or a
//! desired value is of the wrong type or outside minimum/maximum — is not sent (and is removed
//! from a node that had it); the reason goes into a Warning Event on the Device, and the device is
//! sent as soon as it (or its model) is fixed.
//!
//! Up: see [`status`].

pub mod status;

use std::collections::{HashMap, HashSet};

use kedge_common::Operation;
use kedge_common::crd::{Device, DeviceModel};
use kedge_common::devices::{MemberDevice, MembershipMessage, validate_desired};
use kube::Resource;

use crate::node_refs::NodeRefs;
use serde_json::Value;

pub const SOURCE: &str = "devicecontroller";

type NsName = (String, String);

fn ns_name<K: Resource>(obj: &K) -> NsName {
    (
        obj.meta().namespace.clone().unwrap_or_default(),
        obj.meta().name.clone().unwrap_or_default(),
    )
}

/// What a node must be sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A keyed object (kind `device` or `devicemodel`) for the node's queue.
    Send {
        node: String,
        kind: &'static str,
        namespace: String,
        name: String,
        uid: String,
        rv: String,
        op: Operation,
        content: Value,
    },
    /// KubeEdge's `twin/update membership` (not keyed: the Device objects carry the truth).
    Membership {
        node: String,
        message: MembershipMessage,
    },
    /// A device cannot be sent: tell the user why (a Warning Event on the Device).
    Invalid {
        namespace: String,
        name: String,
        uid: String,
        reason: String,
    },
}

struct Placed {
    node: String,
    model: NsName,
}

/// Devices and models as the cluster has them, and where each device was sent.
#[derive(Default)]
pub struct Devices {
    devices: HashMap<NsName, Device>,
    models: HashMap<NsName, DeviceModel>,
    /// Devices currently on a node (valid, bound to an edge node).
    placed: HashMap<NsName, Placed>,
    /// Per model: the nodes holding it and by how many devices.
    model_holders: NodeRefs<NsName>,
    /// The last reason reported per invalid device (one Event per new reason).
    invalid: HashMap<NsName, String>,
}

fn model_key(d: &Device) -> Option<NsName> {
    let name = d.spec.device_model_ref.as_ref()?.name.clone()?;
    Some((d.metadata.namespace.clone().unwrap_or_default(), name))
}

fn member(d: &Device) -> MemberDevice {
    let (ns, name) = ns_name(d);
    MemberDevice {
        id: kedge_common::devices::device_id(&ns, &name),
        name,
        description: d
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("description").cloned()),
        twin: None,
    }
}

fn membership(node: &str, added: Option<&Device>, removed: Option<&Device>) -> Action {
    Action::Membership {
        node: node.to_owned(),
        message: MembershipMessage {
            event_id: kedge_common::message::new_id(),
            timestamp: kedge_common::pki::now_unix() * 1000,
            added_devices: added.map(|d| vec![member(d)]),
            removed_devices: removed.map(|d| vec![member(d)]),
        },
    }
}

fn send<K: Resource + serde::Serialize>(
    node: &str,
    kind: &'static str,
    obj: &K,
    op: Operation,
) -> Action {
    let (namespace, name) = ns_name(obj);
    Action::Send {
        node: node.to_owned(),
        kind,
        namespace,
        name,
        uid: obj.meta().uid.clone().unwrap_or_default(),
        rv: obj.meta().resource_version.clone().unwrap_or_default(),
        op,
        content: crate::edgecontroller::to_json(obj),
    }
}

impl Devices {
    /// Why `d` cannot be sent, if it cannot.
    fn problem(&self, d: &Device) -> Option<String> {
        let Some(mk) = model_key(d) else {
            return Some("spec.deviceModelRef.name is not set".into());
        };
        let Some(model) = self.models.get(&mk) else {
            return Some(format!("device model {}/{} does not exist", mk.0, mk.1));
        };
        for (i, p) in d.spec.properties.iter().enumerate() {
            let Some(name) = p.name.as_deref() else {
                return Some(format!("spec.properties[{i}] has no name"));
            };
            if kedge_common::devices::model_property(&model.spec.properties, name).is_none() {
                return Some(format!(
                    "spec.properties[{i}]: property `{name}` is not in device model {}",
                    mk.1
                ));
            }
            if let Some(desired) = &p.desired
                && !desired.value.is_empty()
                && let Err(e) = validate_desired(&model.spec.properties, name, &desired.value)
            {
                return Some(format!("spec.properties[{i}].desired: {e}"));
            }
        }
        None
    }

    /// Where `d` belongs now: its node if that is an edge node and the device is valid.
    fn target(
        &mut self,
        d: &Device,
        edge_nodes: &HashSet<String>,
        out: &mut Vec<Action>,
    ) -> Option<String> {
        let node = d
            .spec
            .node_name
            .clone()
            .filter(|n| edge_nodes.contains(n))?;
        let key = ns_name(d);
        match self.problem(d) {
            None => {
                self.invalid.remove(&key);
                Some(node)
            }
            Some(reason) => {
                if self.invalid.get(&key) != Some(&reason) {
                    tracing::warn!(namespace = %key.0, name = %key.1, %reason, "invalid device; not sent to its node");
                    self.invalid.insert(key.clone(), reason.clone());
                    out.push(Action::Invalid {
                        namespace: key.0,
                        name: key.1,
                        uid: d.metadata.uid.clone().unwrap_or_default(),
                        reason,
                    });
                }
                None
            }
        }
    }

    fn hold_model(&mut self, node: &str, mk: &NsName, out: &mut Vec<Action>) {
        if self.model_holders.hold(mk, node)
            && let Some(m) = self.models.get(mk)
        {
            out.push(send(node, "devicemodel", m, Operation::Insert));
        }
    }

    fn release_model(&mut self, node: &str, mk: &NsName, out: &mut Vec<Action>) {
        if self.model_holders.release(mk, node)
            && let Some(m) = self.models.get(mk)
        {
            out.push(send(node, "devicemodel", m, Operation::Delete));
        }
    }

    /// Removes a placed device from its node (`last`: the object to send the delete with).
    fn unplace(&mut self, key: &NsName, last: &Device, out: &mut Vec<Action>) {
        let Some(p) = self.placed.remove(key) else {
            return;
        };
        out.push(send(&p.node, "device", last, Operation::Delete));
        out.push(membership(&p.node, None, Some(last)));
        self.release_model(&p.node, &p.model, out);
    }

    /// A Device was created or changed (or listed).
    pub fn device_applied(&mut self, d: Device, edge_nodes: &HashSet<String>) -> Vec<Action> {
        let mut out = Vec::new();
        let key = ns_name(&d);
        let target = self.target(&d, edge_nodes, &mut out);
        let old = self.devices.insert(key.clone(), d.clone());
        let same_uid = old.as_ref().map(|o| &o.metadata.uid) == Some(&d.metadata.uid);
        let placed_on = self
            .placed
            .get(&key)
            .map(|p| (p.node.clone(), p.model.clone()));
        match (placed_on, target) {
            (Some((node, model)), Some(t))
                if node == t && same_uid && model_key(&d).as_ref() == Some(&model) =>
            {
                out.push(send(&t, "device", &d, Operation::Update));
            }
            (placed, target) => {
                if placed.is_some() {
                    let last = old.unwrap_or_else(|| d.clone());
                    self.unplace(&key, &last, &mut out);
                }
                if let Some(t) = target {
                    self.place(&key, &d, &t, &mut out);
                }
            }
        }
        out
    }

    fn place(&mut self, key: &NsName, d: &Device, node: &str, out: &mut Vec<Action>) {
        let Some(mk) = model_key(d) else { return };
        self.hold_model(node, &mk, out);
        out.push(send(node, "device", d, Operation::Insert));
        out.push(membership(node, Some(d), None));
        self.placed.insert(
            key.clone(),
            Placed {
                node: node.to_owned(),
                model: mk,
            },
        );
    }

    /// A Device is gone (`last`: its final state, if known).
    pub fn device_deleted(&mut self, key: &NsName, last: Option<Device>) -> Vec<Action> {
        let mut out = Vec::new();
        self.invalid.remove(key);
        let Some(old) = self.devices.remove(key) else {
            return out;
        };
        let last = last.unwrap_or(old);
        self.unplace(key, &last, &mut out);
        out
    }

    /// A DeviceModel was created or changed: nodes holding it get the new version, and devices
    /// using it are checked again (a device waiting for its model is sent now).
    pub fn model_applied(&mut self, m: DeviceModel, edge_nodes: &HashSet<String>) -> Vec<Action> {
        let mut out = Vec::new();
        let key = ns_name(&m);
        self.models.insert(key.clone(), m.clone());
        for node in self.model_holders.nodes(&key) {
            out.push(send(&node, "devicemodel", &m, Operation::Update));
        }
        out.extend(self.recheck_users_of(&key, edge_nodes));
        out
    }

    /// A DeviceModel is gone: devices using it become invalid and leave their nodes.
    pub fn model_deleted(&mut self, key: &NsName, edge_nodes: &HashSet<String>) -> Vec<Action> {
        if self.models.remove(key).is_none() {
            return Vec::new();
        }
        self.recheck_users_of(key, edge_nodes)
    }

    fn recheck_users_of(&mut self, model: &NsName, edge_nodes: &HashSet<String>) -> Vec<Action> {
        let users: Vec<Device> = self
            .devices
            .values()
            .filter(|d| model_key(d).as_ref() == Some(model))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for d in users {
            let key = ns_name(&d);
            let placed = self.placed.contains_key(&key);
            let valid = self.problem(&d).is_none();
            // Placed and still valid: the node already has the device (the model update above
            // reached it); only a change of validity moves anything.
            if placed != valid || !valid {
                out.extend(self.device_applied(d, edge_nodes));
            }
        }
        out
    }

    /// The set of edge nodes changed: devices bound to a node that is (no longer) an edge node
    /// are placed (or removed).
    pub fn nodes_changed(&mut self, edge_nodes: &HashSet<String>) -> Vec<Action> {
        let all: Vec<Device> = self.devices.values().cloned().collect();
        let mut out = Vec::new();
        for d in all {
            let key = ns_name(&d);
            let on = self.placed.get(&key).map(|p| p.node.clone());
            let want = d.spec.node_name.clone().filter(|n| edge_nodes.contains(n));
            if on != want {
                out.extend(self.device_applied(d, edge_nodes));
            }
        }
        out
    }

    /// The node hosting a device now, for checking who may report for it.
    pub fn node_of(&self, key: &NsName) -> Option<&str> {
        self.placed.get(key).map(|p| p.node.as_str())
    }

    pub fn uid_of(&self, key: &NsName) -> Option<String> {
        self.devices.get(key).and_then(|d| d.metadata.uid.clone())
    }

    /// Every device and model `node` must hold, models first.
    pub fn wanted_by(&self, node: &str) -> (Vec<&DeviceModel>, Vec<&Device>) {
        let mut models: Vec<(&NsName, &DeviceModel)> = self
            .model_holders
            .held_by(node)
            .filter_map(|k| self.models.get(k).map(|m| (k, m)))
            .collect();
        models.sort_by(|a, b| a.0.cmp(b.0));
        let mut devices: Vec<(&NsName, &Device)> = self
            .placed
            .iter()
            .filter(|(_, p)| p.node == node)
            .filter_map(|(k, _)| self.devices.get(k).map(|d| (k, d)))
            .collect();
        devices.sort_by(|a, b| a.0.cmp(b.0));
        (
            models.into_iter().map(|(_, m)| m).collect(),
            devices.into_iter().map(|(_, d)| d).collect(),
        )
    }

    /// Keys of the devices known now (for re-list bookkeeping).
    pub fn device_keys(&self) -> Vec<NsName> {
        self.devices.keys().cloned().collect()
    }

    pub fn model_keys(&self) -> Vec<NsName> {
        self.models.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model(props: Value) -> DeviceModel {
        serde_json::from_value(json!({
            "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceModel",
            "metadata": {"name": "thermo", "namespace": "default", "uid": "m-1", "resourceVersion": "1"},
            "spec": {"properties": props}
        }))
        .unwrap()
    }

    fn device(node: &str, desired: &str, rv: &str) -> Device {
        serde_json::from_value(json!({
            "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
            "metadata": {"name": "t1", "namespace": "default", "uid": "d-1", "resourceVersion": rv},
            "spec": {"deviceModelRef": {"name": "thermo"}, "nodeName": node,
                     "properties": [{"name": "setpoint", "desired": {"value": desired}}]}
        }))
        .unwrap()
    }

    fn props() -> Value {
        json!([{"name": "setpoint", "type": "INT", "accessMode": "ReadWrite", "minimum": "0", "maximum": "40"},
               {"name": "temperature", "type": "DOUBLE", "accessMode": "ReadOnly"}])
    }

    fn sends(actions: &[Action]) -> Vec<(String, &'static str, Operation)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { node, kind, op, .. } => Some((node.clone(), *kind, op.clone())),
                _ => None,
            })
            .collect()
    }

    fn nodes(n: &[&str]) -> HashSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn model_goes_first_desired_changes_are_updates_and_moves_delete_then_add() {
        let mut d = Devices::default();
        let edges = nodes(&["a", "b"]);
        assert!(d.model_applied(model(props()), &edges).is_empty());
        let a = d.device_applied(device("a", "20", "2"), &edges);
        assert_eq!(
            sends(&a),
            vec![
                ("a".into(), "devicemodel", Operation::Insert),
                ("a".into(), "device", Operation::Insert)
            ]
        );
        assert!(a.iter().any(|x| matches!(x, Action::Membership { node, message } if node == "a" && message.added_devices.is_some())));
        let u = d.device_applied(device("a", "25", "3"), &edges);
        assert_eq!(sends(&u), vec![("a".into(), "device", Operation::Update)]);
        let m = d.device_applied(device("b", "25", "4"), &edges);
        assert_eq!(
            sends(&m),
            vec![
                ("a".into(), "device", Operation::Delete),
                ("a".into(), "devicemodel", Operation::Delete),
                ("b".into(), "devicemodel", Operation::Insert),
                ("b".into(), "device", Operation::Insert)
            ]
        );
        assert_eq!(d.node_of(&("default".into(), "t1".into())), Some("b"));
        let (ms, ds) = d.wanted_by("b");
        assert_eq!((ms.len(), ds.len()), (1, 1));
        assert_eq!(d.wanted_by("a").1.len(), 0);
        let gone = d.device_deleted(&("default".into(), "t1".into()), None);
        assert_eq!(
            sends(&gone),
            vec![
                ("b".into(), "device", Operation::Delete),
                ("b".into(), "devicemodel", Operation::Delete)
            ]
        );
    }

    #[test]
    fn invalid_devices_are_reported_once_not_sent_and_sent_when_fixed() {
        let mut d = Devices::default();
        let edges = nodes(&["a"]);
        // No model yet.
        let a = d.device_applied(device("a", "20", "2"), &edges);
        assert!(sends(&a).is_empty());
        assert!(
            matches!(&a[0], Action::Invalid { reason, .. } if reason.contains("does not exist"))
        );
        // The model arrives: the device is sent.
        let m = d.model_applied(model(props()), &edges);
        assert_eq!(sends(&m).len(), 2);
        // Out of range: removed from the node, with one event.
        let bad = d.device_applied(device("a", "99", "3"), &edges);
        assert!(bad.iter().any(
            |x| matches!(x, Action::Invalid { reason, .. } if reason.contains("above the maximum"))
        ));
        assert!(sends(&bad).contains(&("a".into(), "device", Operation::Delete)));
        let again = d.device_applied(device("a", "99", "4"), &edges);
        assert!(again.is_empty(), "same reason, no second event: {again:?}");
        // A read-only property cannot be desired; a wrong type is refused too.
        let mut ro = device("a", "1.5", "5");
        ro.spec.properties[0].name = Some("temperature".into());
        assert!(
            d.device_applied(ro, &edges).iter().any(
                |x| matches!(x, Action::Invalid { reason, .. } if reason.contains("read-only"))
            )
        );
        let fixed = d.device_applied(device("a", "30", "6"), &edges);
        assert!(sends(&fixed).contains(&("a".into(), "device", Operation::Insert)));
    }

    #[test]
    fn devices_follow_edge_nodes() {
        let mut d = Devices::default();
        d.model_applied(model(props()), &nodes(&[]));
        assert!(sends(&d.device_applied(device("a", "20", "2"), &nodes(&[]))).is_empty());
        let joined = d.nodes_changed(&nodes(&["a"]));
        assert_eq!(sends(&joined).len(), 2);
        let left = d.nodes_changed(&nodes(&[]));
        assert!(sends(&left).contains(&("a".into(), "device", Operation::Delete)));
    }
}

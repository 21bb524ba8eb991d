//! The twin logic without I/O: what the node's devices want and report, and what must be
//! published, saved and reported for each event. Time (`now_ms`) is passed in.
//!
//! Per property the twin keeps the desired value (`expected`, from the Device's
//! `spec.properties[].desired`, versioned by `cloud`) and the reported value (`actual`, from the
//! mapper, versioned by `edge`), each with its timestamp. A delta — the desired values that differ
//! from the reported ones — is published **retained**, so a mapper that was away when the desired
//! value changed receives it when it subscribes again (from the embedded broker too: see
//! `third_party/rumqttd/PATCHED.md`); once nothing differs the retained delta is cleared. Mapper payloads are validated against the DeviceModel before anything is stored:
//! a malformed or invalid update gets an error on `…/result` and changes nothing.

use std::collections::BTreeMap;

use kedge_common::crd::{Device, DeviceModel, ModelProperty};
use kedge_common::devices::{
    self, MemberDevice, MembershipMessage, MsgTwin, ResultMessage, StateMessage, TwinMessage,
    TwinValue, TwinVersion, TypeMetadata, ValueMetadata, topics,
};
use kedge_common::{Message, Operation};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A value and when it was set (ms since the epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamped {
    pub value: String,
    pub timestamp: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PropertyTwin {
    pub expected: Option<Stamped>,
    pub actual: Option<Stamped>,
    pub version: TwinVersion,
}

/// One device's twin, as saved (one JSON row per device).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceTwin {
    pub name: String,
    pub description: Option<String>,
    /// The model's properties (for validating mapper updates while offline, too).
    pub model: Vec<ModelProperty>,
    pub properties: BTreeMap<String, PropertyTwin>,
    pub state: Option<String>,
    pub last_online: Option<String>,
    /// Whether a non-empty delta is retained on the broker now.
    pub delta_retained: bool,
}

/// What the runner must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    /// Persist this device's twin (or delete it, when it is gone).
    Save(String),
    Forget(String),
    /// Queue in the durable outbox for the cloud (latest per key).
    Report {
        key: String,
        message: Box<Message>,
    },
}

fn publish<T: Serialize>(topic: String, body: &T, retain: bool) -> Effect {
    Effect::Publish {
        topic,
        payload: serde_json::to_vec(body).unwrap_or_default(),
        retain,
    }
}

fn result(topic: String, event_id: &str, now_ms: i64, code: u16, reason: String) -> Effect {
    publish(
        topic,
        &ResultMessage {
            event_id: event_id.to_owned(),
            timestamp: now_ms,
            code,
            reason,
        },
        false,
    )
}

/// The answer to a mapper naming a device this node does not host.
fn not_here(topic: String, event_id: &str, now_ms: i64, id: &str) -> Effect {
    result(
        topic,
        event_id,
        now_ms,
        404,
        format!("device {id} is not on this node"),
    )
}

fn value_of(s: &Stamped) -> TwinValue {
    TwinValue {
        value: Some(s.value.clone()),
        metadata: Some(ValueMetadata {
            timestamp: s.timestamp,
        }),
    }
}

fn type_of(model: &[ModelProperty], prop: &str) -> Option<TypeMetadata> {
    devices::model_property(model, prop)
        .and_then(|p| p.property_type)
        .map(|t| TypeMetadata {
            value_type: devices::type_name(t).to_owned(),
        })
}

impl DeviceTwin {
    fn msg_twin(&self, prop: &str, p: &PropertyTwin) -> MsgTwin {
        MsgTwin {
            expected: p.expected.as_ref().map(value_of),
            actual: p.actual.as_ref().map(value_of),
            optional: Some(true),
            metadata: type_of(&self.model, prop),
            expected_version: Some(p.version),
            actual_version: Some(p.version),
        }
    }

    fn twin_map(&self) -> BTreeMap<String, MsgTwin> {
        self.properties
            .iter()
            .map(|(k, p)| (k.clone(), self.msg_twin(k, p)))
            .collect()
    }

    /// Desired values that differ from the reported ones.
    fn delta(&self) -> BTreeMap<String, String> {
        self.properties
            .iter()
            .filter_map(|(k, p)| {
                let e = p.expected.as_ref()?;
                (p.actual.as_ref().map(|a| &a.value) != Some(&e.value))
                    .then(|| (k.clone(), e.value.clone()))
            })
            .collect()
    }

    fn member(&self, id: &str) -> MemberDevice {
        MemberDevice {
            id: id.to_owned(),
            name: self.name.clone(),
            description: self.description.clone(),
            twin: Some(self.twin_map()),
        }
    }
}

/// Every device of the node.
#[derive(Debug, Default)]
pub struct Twins {
    node: String,
    devices: BTreeMap<String, DeviceTwin>,
}

impl Twins {
    pub fn new(node: &str, saved: BTreeMap<String, DeviceTwin>) -> Self {
        Twins {
            node: node.to_owned(),
            devices: saved,
        }
    }

    pub fn get(&self, id: &str) -> Option<&DeviceTwin> {
        self.devices.get(id)
    }

    pub fn ids(&self) -> Vec<String> {
        self.devices.keys().cloned().collect()
    }

    /// The delta and the retained flag after a change: publishes the delta (retained) when
    /// something differs, clears a retained one when nothing does.
    fn publish_delta(&mut self, id: &str, now_ms: i64, out: &mut Vec<Effect>) {
        let Some(d) = self.devices.get_mut(id) else {
            return;
        };
        let delta = d.delta();
        if delta.is_empty() {
            if d.delta_retained {
                d.delta_retained = false;
                out.push(Effect::Publish {
                    topic: topics::twin_update_delta(id),
                    payload: Vec::new(),
                    retain: true,
                });
            }
            return;
        }
        let twin: BTreeMap<String, MsgTwin> = delta
            .keys()
            .filter_map(|k| d.properties.get(k).map(|p| (k.clone(), d.msg_twin(k, p))))
            .collect();
        d.delta_retained = true;
        out.push(publish(
            topics::twin_update_delta(id),
            &json!({"event_id": kedge_common::message::new_id(), "timestamp": now_ms,
                    "twin": twin, "delta": delta}),
            true,
        ));
    }

    /// A Device (and its model) as the store holds it now.
    pub fn device_synced(
        &mut self,
        device: &Device,
        model: Option<&DeviceModel>,
        now_ms: i64,
    ) -> Vec<Effect> {
        let ns = device.metadata.namespace.clone().unwrap_or_default();
        let name = device.metadata.name.clone().unwrap_or_default();
        let id = devices::device_id(&ns, &name);
        let mut out = Vec::new();
        let new = !self.devices.contains_key(&id);
        let d = self.devices.entry(id.clone()).or_default();
        let before_doc = d.twin_map();
        let mut changed = new;
        d.name = name;
        let description = device
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("description").cloned());
        changed |= d.description != description;
        d.description = description;
        if let Some(m) = model
            && d.model != m.spec.properties
        {
            d.model = m.spec.properties.clone();
            changed = true;
        }
        let mut desired_changed = false;
        let wanted: Vec<&str> = device
            .spec
            .properties
            .iter()
            .filter_map(|p| p.name.as_deref())
            .collect();
        for p in &device.spec.properties {
            let Some(prop) = p.name.as_deref() else {
                continue;
            };
            let t = d.properties.entry(prop.to_owned()).or_default();
            let desired = p
                .desired
                .as_ref()
                .map(|x| x.value.clone())
                .filter(|v| !v.is_empty());
            if t.expected.as_ref().map(|e| &e.value) != desired.as_ref() {
                t.expected = desired.map(|value| Stamped {
                    value,
                    timestamp: now_ms,
                });
                t.version.cloud += 1;
                desired_changed = true;
            }
        }
        let before = d.properties.len();
        d.properties.retain(|k, _| wanted.contains(&k.as_str()));
        changed |= before != d.properties.len() || desired_changed;
        if !changed {
            return out;
        }
        out.push(Effect::Save(id.clone()));
        if new {
            let m = MembershipMessage {
                event_id: kedge_common::message::new_id(),
                timestamp: now_ms,
                added_devices: Some(vec![d.member(&id)]),
                removed_devices: None,
            };
            out.push(publish(topics::membership_updated(&self.node), &m, false));
        }
        if desired_changed {
            let doc: BTreeMap<String, serde_json::Value> = d
                .twin_map()
                .into_iter()
                .map(|(k, cur)| {
                    let last = before_doc.get(&k).cloned();
                    (k, json!({"last": last, "current": cur}))
                })
                .collect();
            out.push(publish(
                topics::twin_update_document(&id),
                &json!({"event_id": kedge_common::message::new_id(), "timestamp": now_ms, "twin": doc}),
                false,
            ));
            self.publish_delta(&id, now_ms, &mut out);
        }
        out
    }

    /// A Device left the node (deleted, or moved to another node).
    pub fn device_removed(&mut self, id: &str, now_ms: i64) -> Vec<Effect> {
        let Some(d) = self.devices.remove(id) else {
            return Vec::new();
        };
        let mut out = vec![Effect::Forget(id.to_owned())];
        if d.delta_retained {
            out.push(Effect::Publish {
                topic: topics::twin_update_delta(id),
                payload: Vec::new(),
                retain: true,
            });
        }
        let m = MembershipMessage {
            event_id: kedge_common::message::new_id(),
            timestamp: now_ms,
            added_devices: None,
            removed_devices: Some(vec![MemberDevice {
                id: id.to_owned(),
                name: d.name.clone(),
                description: d.description.clone(),
                twin: None,
            }]),
        };
        out.push(publish(topics::membership_updated(&self.node), &m, false));
        out
    }

    /// Models are stored apart from devices: a changed model reaches the twins that use it.
    pub fn model_synced(&mut self, users: &[String], model: &DeviceModel) -> Vec<Effect> {
        let mut out = Vec::new();
        for id in users {
            if let Some(d) = self.devices.get_mut(id)
                && d.model != model.spec.properties
            {
                d.model = model.spec.properties.clone();
                out.push(Effect::Save(id.clone()));
            }
        }
        out
    }

    /// `…/twin/update` from a mapper: reported values.
    pub fn mapper_twin_update(&mut self, id: &str, payload: &[u8], now_ms: i64) -> Vec<Effect> {
        let topic = topics::twin_update_result(id);
        let msg: TwinMessage = match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(device = %id, error = %e, "malformed twin update from a mapper");
                return vec![result(
                    topic,
                    "",
                    now_ms,
                    400,
                    format!("malformed twin update: {e}"),
                )];
            }
        };
        let Some(d) = self.devices.get_mut(id) else {
            return vec![not_here(topic, &msg.event_id, now_ms, id)];
        };
        // Validate everything first: an update is applied whole or not at all.
        let mut updates = Vec::new();
        for (prop, t) in &msg.twin {
            let Some(model_prop) = devices::model_property(&d.model, prop) else {
                return vec![result(
                    topic,
                    &msg.event_id,
                    now_ms,
                    400,
                    devices::ValueError::UnknownProperty(prop.clone()).to_string(),
                )];
            };
            let Some(actual) = t.actual.as_ref() else {
                continue;
            };
            let Some(value) = actual.value.clone() else {
                continue;
            };
            if let Err(e) = devices::validate_value(model_prop, &value) {
                tracing::warn!(device = %id, error = %e, "invalid twin update from a mapper");
                return vec![result(topic, &msg.event_id, now_ms, 400, e.to_string())];
            }
            let ts = actual
                .metadata
                .as_ref()
                .map(|m| m.timestamp)
                .filter(|t| *t > 0)
                .unwrap_or(now_ms);
            updates.push((prop.clone(), value, ts));
        }
        let mut out = vec![result(topic, &msg.event_id, now_ms, 200, String::new())];
        if updates.is_empty() {
            return out;
        }
        for (prop, value, timestamp) in updates {
            let p = d.properties.entry(prop.clone()).or_default();
            p.actual = Some(Stamped { value, timestamp });
            p.version.edge += 1;
            let p = p.clone();
            let twin = BTreeMap::from([(prop.clone(), d.msg_twin(&prop, &p))]);
            let report = TwinMessage {
                event_id: kedge_common::message::new_id(),
                timestamp: now_ms,
                twin,
            };
            out.push(Effect::Report {
                key: format!("twin/{id}/{prop}"),
                message: Box::new(Message::new(
                    "twin",
                    kedge_common::message::group::RESOURCE,
                    Operation::Update,
                    devices::twin_report_resource(id),
                    serde_json::to_value(&report).unwrap_or_default(),
                )),
            });
        }
        out.push(Effect::Save(id.to_owned()));
        self.publish_delta(id, now_ms, &mut out);
        out
    }

    /// `…/twin/get`: the whole twin document.
    pub fn mapper_twin_get(&self, id: &str, payload: &[u8], now_ms: i64) -> Vec<Effect> {
        let event_id = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v["event_id"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let topic = topics::twin_get_result(id);
        match self.devices.get(id) {
            Some(d) => vec![publish(
                topic,
                &json!({"event_id": event_id, "timestamp": now_ms, "code": 200, "twin": d.twin_map()}),
                false,
            )],
            None => vec![not_here(topic, &event_id, now_ms, id)],
        }
    }

    /// `…/state/update`: the device's state (`online`, `offline`, …).
    pub fn mapper_state_update(&mut self, id: &str, payload: &[u8], now_ms: i64) -> Vec<Effect> {
        let topic = topics::state_update_result(id);
        let msg: StateMessage = match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(e) => {
                return vec![result(
                    topic,
                    "",
                    now_ms,
                    400,
                    format!("malformed state update: {e}"),
                )];
            }
        };
        if msg.state.is_empty() || msg.state.len() > 64 {
            return vec![result(
                topic,
                &msg.event_id,
                now_ms,
                400,
                "state must be a non-empty word".into(),
            )];
        }
        let Some(d) = self.devices.get_mut(id) else {
            return vec![not_here(topic, &msg.event_id, now_ms, id)];
        };
        d.state = Some(msg.state.clone());
        if msg.state == "online" {
            d.last_online = Some(rfc3339(now_ms));
        }
        let report = StateMessage {
            event_id: kedge_common::message::new_id(),
            timestamp: now_ms,
            state: msg.state,
            last_online: d.last_online.clone(),
        };
        vec![
            result(topic, &msg.event_id, now_ms, 200, String::new()),
            Effect::Save(id.to_owned()),
            Effect::Report {
                key: format!("state/{id}"),
                message: Box::new(Message::new(
                    "twin",
                    kedge_common::message::group::RESOURCE,
                    Operation::Update,
                    devices::state_report_resource(id),
                    serde_json::to_value(&report).unwrap_or_default(),
                )),
            },
        ]
    }

    /// `$hw/events/node/<node>/membership/get`: every device with its twin.
    pub fn membership_get(&self, payload: &[u8], now_ms: i64) -> Vec<Effect> {
        let event_id = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v["event_id"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let m = MembershipMessage {
            event_id,
            timestamp: now_ms,
            added_devices: Some(self.devices.iter().map(|(id, d)| d.member(id)).collect()),
            removed_devices: None,
        };
        vec![publish(
            topics::membership_get_result(&self.node),
            &m,
            false,
        )]
    }
}

/// Milliseconds since the epoch as RFC 3339 (UTC, seconds).
pub fn rfc3339(ms: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> DeviceModel {
        serde_json::from_value(json!({
            "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceModel",
            "metadata": {"name": "thermo", "namespace": "default"},
            "spec": {"properties": [
                {"name": "setpoint", "type": "INT", "accessMode": "ReadWrite", "minimum": "0", "maximum": "40"},
                {"name": "temperature", "type": "DOUBLE", "accessMode": "ReadOnly"}]}
        }))
        .unwrap()
    }

    fn device(setpoint: &str) -> Device {
        serde_json::from_value(json!({
            "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
            "metadata": {"name": "t1", "namespace": "default"},
            "spec": {"deviceModelRef": {"name": "thermo"}, "nodeName": "n1", "properties": [
                {"name": "setpoint", "desired": {"value": setpoint}},
                {"name": "temperature"}]}
        }))
        .unwrap()
    }

    fn published(effects: &[Effect]) -> Vec<(String, serde_json::Value, bool)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Publish {
                    topic,
                    payload,
                    retain,
                } => Some((
                    topic.clone(),
                    serde_json::from_slice(payload).unwrap_or(serde_json::Value::Null),
                    *retain,
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn desired_changes_publish_a_retained_delta_until_reported() {
        let mut t = Twins::new("n1", BTreeMap::new());
        let e = t.device_synced(&device("20"), Some(&model()), 1000);
        let p = published(&e);
        assert!(
            p.iter()
                .any(|(t, _, _)| t == "$hw/events/node/n1/membership/updated")
        );
        let delta = p
            .iter()
            .find(|(t, _, _)| t.ends_with("/twin/update/delta"))
            .unwrap();
        assert_eq!(delta.1["delta"]["setpoint"], "20");
        assert!(delta.2, "retained");
        // The same Device again changes nothing.
        assert!(
            t.device_synced(&device("20"), Some(&model()), 2000)
                .is_empty()
        );
        // The mapper reports the desired value: result 200, one report per property, delta cleared.
        let up = json!({"event_id": "e1", "twin": {"setpoint": {"actual": {"value": "20"}},
                        "temperature": {"actual": {"value": "21.5", "metadata": {"timestamp": 5}}}}});
        let e = t.mapper_twin_update("default/t1", &serde_json::to_vec(&up).unwrap(), 3000);
        let p = published(&e);
        assert_eq!(p[0].0, "$hw/events/device/default/t1/twin/update/result");
        assert_eq!(p[0].1["code"], 200);
        let reports: Vec<&String> = e
            .iter()
            .filter_map(|x| match x {
                Effect::Report { key, .. } => Some(key),
                _ => None,
            })
            .collect();
        assert_eq!(
            reports,
            ["twin/default/t1/setpoint", "twin/default/t1/temperature"]
        );
        assert!(
            e.iter().any(|x| matches!(x, Effect::Publish { topic, payload, retain: true } if topic.ends_with("/delta") && payload.is_empty())),
            "the retained delta is cleared"
        );
        let d = t.get("default/t1").unwrap();
        assert_eq!(
            d.properties["temperature"]
                .actual
                .as_ref()
                .unwrap()
                .timestamp,
            5
        );
        assert_eq!(
            d.properties["setpoint"].version,
            TwinVersion { cloud: 1, edge: 1 }
        );
    }

    #[test]
    fn bad_mapper_payloads_get_an_error_and_change_nothing() {
        let mut t = Twins::new("n1", BTreeMap::new());
        t.device_synced(&device("20"), Some(&model()), 1000);
        let before = t.get("default/t1").cloned();
        for bad in [
            &b"not json"[..],
            br#"{"twin": {"setpoint": {"actual": {"value": "99"}}}}"#,
            br#"{"twin": {"setpoint": {"actual": {"value": "abc"}}}}"#,
            br#"{"twin": {"humidity": {"actual": {"value": "1"}}}}"#,
            br#"{"twin": {"setpoint": {"actual": {"value": "10"}}, "temperature": {"actual": {"value": "x"}}}}"#,
        ] {
            let e = t.mapper_twin_update("default/t1", bad, 2000);
            assert_eq!(e.len(), 1, "{e:?}");
            assert_eq!(published(&e)[0].1["code"], 400);
        }
        assert_eq!(t.get("default/t1").cloned(), before);
        let e = t.mapper_twin_update("default/ghost", br#"{"twin": {}}"#, 2000);
        assert_eq!(published(&e)[0].1["code"], 404);
        let e = t.mapper_state_update("default/t1", br#"{"state": ""}"#, 2000);
        assert_eq!(published(&e)[0].1["code"], 400);
    }

    #[test]
    fn state_get_membership_and_removal() {
        let mut t = Twins::new("n1", BTreeMap::new());
        t.device_synced(&device("20"), Some(&model()), 1000);
        let e = t.mapper_state_update("default/t1", br#"{"state": "online"}"#, 1_700_000_000_000);
        assert!(
            e.iter()
                .any(|x| matches!(x, Effect::Report { key, .. } if key == "state/default/t1"))
        );
        assert_eq!(
            t.get("default/t1").unwrap().last_online.as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
        let g = published(&t.mapper_twin_get("default/t1", br#"{"event_id": "g"}"#, 1));
        assert_eq!(g[0].1["twin"]["setpoint"]["expected"]["value"], "20");
        let m = published(&t.membership_get(b"{}", 1));
        assert_eq!(m[0].1["added_devices"][0]["id"], "default/t1");
        let r = t.device_removed("default/t1", 2);
        assert!(r.contains(&Effect::Forget("default/t1".into())));
        assert!(t.get("default/t1").is_none());
    }

    /// 10,000 random payloads on the twin topics: no panic, and the stored twin is unchanged
    /// (every payload is malformed, names unknown properties, or carries values of the wrong
    /// type or out of range).
    #[test]
    fn ten_thousand_random_payloads_change_nothing() {
        let mut t = Twins::new("n1", BTreeMap::new());
        t.device_synced(&device("20"), Some(&model()), 1000);
        t.mapper_twin_update(
            "default/t1",
            br#"{"twin": {"setpoint": {"actual": {"value": "20"}}}}"#,
            1500,
        );
        let before = t.get("default/t1").cloned();
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let garbage_values = [
            "abc", "1e999", "", "NaN", "99", "-5", "20.5", "{}", "[1]", "\u{0}",
        ];
        for i in 0..10_000 {
            let r = next();
            let payload: Vec<u8> = match r % 4 {
                // Raw bytes.
                0 => (0..(r >> 8) % 200).map(|_| next() as u8).collect(),
                // JSON of the wrong shape.
                1 => {
                    serde_json::to_vec(&json!({"twin": (r % 1000) as i64, "event_id": [r as i64]}))
                        .unwrap_or_default()
                }
                // An unknown property.
                2 => serde_json::to_vec(
                    &json!({"twin": {format!("p{}", r % 97): {"actual": {"value": "1"}}}}),
                )
                .unwrap_or_default(),
                // A known property with a value that does not fit.
                _ => {
                    let v = garbage_values[(r >> 16) as usize % garbage_values.len()];
                    serde_json::to_vec(&json!({"twin": {"setpoint": {"actual": {"value": v}}}}))
                        .unwrap_or_default()
                }
            };
            let effects = match i % 3 {
                0 => t.mapper_twin_update("default/t1", &payload, 2000),
                1 => t.mapper_state_update("default/ghost", &payload, 2000),
                _ => t.mapper_twin_get("default/t1", &payload, 2000),
            };
            for e in &effects {
                assert!(
                    !matches!(
                        e,
                        Effect::Save(_) | Effect::Report { .. } | Effect::Forget(_)
                    ),
                    "payload {i} changed state: {e:?}"
                );
            }
        }
        assert_eq!(t.get("default/t1").cloned(), before);
    }
}

//! MQTT payloads from mappers on the twin topics (`$hw/events/device/<id>/twin/update`,
//! `.../twin/get`, `.../state/update`, `.../membership/get`): never a panic, and a payload that
//! is refused (no Save effect) leaves the stored twin as it was.
#![no_main]

use std::collections::BTreeMap;

use edgecore::devicetwin::twin::{Effect, Twins};
use kedge_common::crd::{Device, DeviceModel};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fn twins() -> Twins {
    let model: DeviceModel = serde_json::from_value(json!({
        "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceModel",
        "metadata": {"name": "thermo", "namespace": "default"},
        "spec": {"properties": [
            {"name": "setpoint", "type": "INT", "accessMode": "ReadWrite", "minimum": "0", "maximum": "40"},
            {"name": "temperature", "type": "DOUBLE", "accessMode": "ReadOnly"},
            {"name": "label", "type": "STRING", "accessMode": "ReadWrite"},
            {"name": "on", "type": "BOOLEAN", "accessMode": "ReadWrite"}]}
    }))
    .expect("the model");
    let device: Device = serde_json::from_value(json!({
        "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
        "metadata": {"name": "t1", "namespace": "default"},
        "spec": {"deviceModelRef": {"name": "thermo"}, "nodeName": "n1", "properties": [
            {"name": "setpoint", "desired": {"value": "20"}},
            {"name": "temperature"}, {"name": "label"}, {"name": "on"}]}
    }))
    .expect("the device");
    let mut t = Twins::new("n1", BTreeMap::new());
    t.device_synced(&device, Some(&model), 1000);
    t
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, payload)) = data.split_first() else {
        return;
    };
    let mut t = twins();
    let before = t.get("default/t1").cloned();
    let effects = match which % 5 {
        0 => t.mapper_twin_update("default/t1", payload, 2000),
        1 => t.mapper_twin_get("default/t1", payload, 2000),
        2 => t.mapper_state_update("default/t1", payload, 2000),
        3 => t.mapper_state_update("default/ghost", payload, 2000),
        _ => t.membership_get(payload, 2000),
    };
    if !effects.iter().any(|e| matches!(e, Effect::Save(_))) {
        assert_eq!(t.get("default/t1").cloned(), before, "refused yet changed");
    }
});

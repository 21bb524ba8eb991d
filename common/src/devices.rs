//! Device twins as KubeEdge puts them on the wire, shared by cloudcore's devicecontroller and
//! edgecore's DeviceTwin: the twin document (`{"twin": {"<prop>": {"expected", "actual", …}}}`),
//! membership, MQTT topics, and validation of a value against its DeviceModel property.
//!
//! A device's id is `<namespace>/<name>`, as KubeEdge v1.2x uses it in topics and membership.
//! The names of resources and fields are KubeEdge's (v1.23), so either side can be KubeEdge's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crd::{ModelProperty, PropertyAccessMode, PropertyType};

/// The resource a twin report from the edge goes to: `device/<ns>/<name>/twin/edge_updated`.
pub const TWIN_EDGE_UPDATED: &str = "twin/edge_updated";
/// The resource a device state report goes to: `device/<ns>/<name>/state/update`.
pub const STATE_UPDATED: &str = "state/update";

/// `<namespace>/<name>`.
pub fn device_id(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Splits `<namespace>/<name>`; `None` for anything else.
pub fn split_device_id(id: &str) -> Option<(&str, &str)> {
    let (ns, name) = id.split_once('/')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then_some((ns, name))
}

/// Edge-side resource of a twin report for a device.
pub fn twin_report_resource(id: &str) -> String {
    format!("device/{id}/{TWIN_EDGE_UPDATED}")
}

/// Edge-side resource of a state report for a device.
pub fn state_report_resource(id: &str) -> String {
    format!("device/{id}/{STATE_UPDATED}")
}

/// What a report's resource (edge form, after `device/`) says: which device, and what kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceReport<'a> {
    Twin { namespace: &'a str, name: &'a str },
    State { namespace: &'a str, name: &'a str },
}

/// Parses `device/<ns>/<name>/twin/edge_updated` or `device/<ns>/<name>/state/update`.
pub fn parse_report_resource(resource: &str) -> Option<DeviceReport<'_>> {
    let rest = resource.strip_prefix("device/")?;
    let mut parts = rest.splitn(3, '/');
    let (ns, name, what) = (parts.next()?, parts.next()?, parts.next()?);
    if ns.is_empty() || name.is_empty() {
        return None;
    }
    match what {
        TWIN_EDGE_UPDATED => Some(DeviceReport::Twin {
            namespace: ns,
            name,
        }),
        STATE_UPDATED => Some(DeviceReport::State {
            namespace: ns,
            name,
        }),
        _ => None,
    }
}

/// A value with its metadata (`{"value": "20", "metadata": {"timestamp": 1700000000000}}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinValue {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<ValueMetadata>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueMetadata {
    /// Milliseconds since the epoch.
    #[serde(default)]
    pub timestamp: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeMetadata {
    #[serde(rename = "type", default)]
    pub value_type: String,
}

/// Which side changed a value how often (KubeEdge's `TwinVersion`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinVersion {
    #[serde(default)]
    pub cloud: i64,
    #[serde(default)]
    pub edge: i64,
}

/// One property in a twin message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgTwin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<TwinValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<TwinValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TypeMetadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<TwinVersion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_version: Option<TwinVersion>,
}

/// `…/twin/update` from a mapper, `twin/edge_updated` to the cloud, and the documents and deltas
/// published to mappers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinMessage {
    #[serde(default)]
    pub event_id: String,
    #[serde(default)]
    pub timestamp: i64,
    #[serde(default)]
    pub twin: BTreeMap<String, MsgTwin>,
}

/// `…/state/update` from a mapper and `state/update` to the cloud.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMessage {
    #[serde(default)]
    pub event_id: String,
    #[serde(default)]
    pub timestamp: i64,
    #[serde(default)]
    pub state: String,
    /// RFC 3339 time the device was last seen online (set by the edge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_online: Option<String>,
}

/// A device in a membership message (`{"id": "default/dev", "name": "dev", …}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberDevice {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin: Option<BTreeMap<String, MsgTwin>>,
}

/// `twin/update membership` from the cloud, `…/membership/updated` and `…/get/result` to mappers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipMessage {
    #[serde(default)]
    pub event_id: String,
    #[serde(default)]
    pub timestamp: i64,
    /// Go writes `null` for an empty list.
    #[serde(default)]
    pub added_devices: Option<Vec<MemberDevice>>,
    #[serde(default)]
    pub removed_devices: Option<Vec<MemberDevice>>,
}

/// `{"code": 200, "reason": ""}` on a `…/result` topic (with the event id it answers).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultMessage {
    #[serde(default)]
    pub event_id: String,
    #[serde(default)]
    pub timestamp: i64,
    pub code: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// KubeEdge's name of a model type in twin metadata (`int`, `float`, …).
pub fn type_name(t: PropertyType) -> &'static str {
    match t {
        PropertyType::Int => "int",
        PropertyType::Float => "float",
        PropertyType::Double => "double",
        PropertyType::String => "string",
        PropertyType::Boolean => "boolean",
        PropertyType::Bytes => "bytes",
        PropertyType::Stream => "stream",
    }
}

/// Why a value does not fit its model property.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("property `{0}` is not in the device model")]
    UnknownProperty(String),
    #[error("property `{property}`: `{value}` is not a valid {expected}")]
    WrongType {
        property: String,
        value: String,
        expected: &'static str,
    },
    #[error("property `{property}`: {value} is below the minimum {minimum}")]
    BelowMinimum {
        property: String,
        value: String,
        minimum: String,
    },
    #[error("property `{property}`: {value} is above the maximum {maximum}")]
    AboveMaximum {
        property: String,
        value: String,
        maximum: String,
    },
    #[error("property `{0}` is read-only")]
    ReadOnly(String),
}

/// Finds a property of a model by name.
pub fn model_property<'a>(model: &'a [ModelProperty], name: &str) -> Option<&'a ModelProperty> {
    model.iter().find(|p| p.name.as_deref() == Some(name))
}

/// Checks `value` against the model property: type, and minimum/maximum for numbers.
pub fn validate_value(property: &ModelProperty, value: &str) -> Result<(), ValueError> {
    let name = property.name.clone().unwrap_or_default();
    let wrong = |expected| ValueError::WrongType {
        property: name.clone(),
        value: value.to_owned(),
        expected,
    };
    let number = match property.property_type {
        Some(PropertyType::Int) => {
            Some(value.trim().parse::<i64>().map_err(|_| wrong("integer"))? as f64)
        }
        Some(PropertyType::Float | PropertyType::Double) => {
            let v = value.trim().parse::<f64>().map_err(|_| wrong("number"))?;
            if !v.is_finite() {
                return Err(wrong("finite number"));
            }
            Some(v)
        }
        Some(PropertyType::Boolean) => {
            value.parse::<bool>().map_err(|_| wrong("boolean"))?;
            None
        }
        _ => None,
    };
    if let Some(v) = number {
        if let Some(min) = property
            .minimum
            .as_deref()
            .and_then(|m| m.trim().parse::<f64>().ok())
            && v < min
        {
            return Err(ValueError::BelowMinimum {
                property: name,
                value: value.to_owned(),
                minimum: property.minimum.clone().unwrap_or_default(),
            });
        }
        if let Some(max) = property
            .maximum
            .as_deref()
            .and_then(|m| m.trim().parse::<f64>().ok())
            && v > max
        {
            return Err(ValueError::AboveMaximum {
                property: name,
                value: value.to_owned(),
                maximum: property.maximum.clone().unwrap_or_default(),
            });
        }
    }
    Ok(())
}

/// Checks a desired value: the property must exist, be writable, and the value must fit.
pub fn validate_desired(
    model: &[ModelProperty],
    property: &str,
    value: &str,
) -> Result<(), ValueError> {
    let p = model_property(model, property)
        .ok_or_else(|| ValueError::UnknownProperty(property.to_owned()))?;
    if p.access_mode == Some(PropertyAccessMode::ReadOnly) {
        return Err(ValueError::ReadOnly(property.to_owned()));
    }
    validate_value(p, value)
}

/// MQTT topics of KubeEdge's device side (`$hw/events/…`).
pub mod topics {
    pub const PREFIX: &str = "$hw/events/";
    /// Everything edgecore listens to from devices and mappers.
    pub const DEVICE_FILTER: &str = "$hw/events/device/+/+/twin/+";
    pub const DEVICE_STATE_FILTER: &str = "$hw/events/device/+/+/state/+";
    pub const NODE_FILTER: &str = "$hw/events/node/+/membership/get";
    pub const UPLOAD_FILTER: &str = "$hw/events/upload/#";

    pub fn twin_update(id: &str) -> String {
        format!("$hw/events/device/{id}/twin/update")
    }
    pub fn state_update(id: &str) -> String {
        format!("$hw/events/device/{id}/state/update")
    }
    pub fn twin_update_delta(id: &str) -> String {
        format!("$hw/events/device/{id}/twin/update/delta")
    }
    pub fn twin_update_document(id: &str) -> String {
        format!("$hw/events/device/{id}/twin/update/document")
    }
    pub fn twin_update_result(id: &str) -> String {
        format!("$hw/events/device/{id}/twin/update/result")
    }
    pub fn twin_get_result(id: &str) -> String {
        format!("$hw/events/device/{id}/twin/get/result")
    }
    pub fn state_update_result(id: &str) -> String {
        format!("$hw/events/device/{id}/state/update/result")
    }
    pub fn membership_updated(node: &str) -> String {
        format!("$hw/events/node/{node}/membership/updated")
    }
    pub fn membership_get_result(node: &str) -> String {
        format!("$hw/events/node/{node}/membership/get/result")
    }

    /// What a topic from a device or mapper asks for.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Inbound<'a> {
        TwinUpdate(String),
        TwinGet(String),
        StateUpdate(String),
        MembershipGet(&'a str),
        /// `$hw/events/upload/…`: forwarded to the cloud as it is.
        Upload,
        /// Our own answers (`…/result`, `…/delta`, …) and anything else: not for us.
        Other,
    }

    /// Classifies an inbound topic. Device ids are `<ns>/<name>`.
    pub fn classify(topic: &str) -> Inbound<'_> {
        let Some(rest) = topic.strip_prefix(PREFIX) else {
            return Inbound::Other;
        };
        if rest.starts_with("upload/") {
            return Inbound::Upload;
        }
        if let Some(node) = rest
            .strip_prefix("node/")
            .and_then(|r| r.strip_suffix("/membership/get"))
            && !node.contains('/')
        {
            return Inbound::MembershipGet(node);
        }
        let Some(dev) = rest.strip_prefix("device/") else {
            return Inbound::Other;
        };
        let parts: Vec<&str> = dev.split('/').collect();
        match parts.as_slice() {
            [ns, name, "twin", "update"] => Inbound::TwinUpdate(format!("{ns}/{name}")),
            [ns, name, "twin", "get"] => Inbound::TwinGet(format!("{ns}/{name}")),
            [ns, name, "state", "update"] => Inbound::StateUpdate(format!("{ns}/{name}")),
            _ => Inbound::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prop(t: PropertyType, min: Option<&str>, max: Option<&str>) -> ModelProperty {
        ModelProperty {
            name: Some("temperature".into()),
            property_type: Some(t),
            minimum: min.map(Into::into),
            maximum: max.map(Into::into),
            access_mode: Some(PropertyAccessMode::ReadWrite),
            ..Default::default()
        }
    }

    #[test]
    fn values_are_checked_against_type_and_range() {
        let p = prop(PropertyType::Int, Some("0"), Some("100"));
        assert!(validate_value(&p, "20").is_ok());
        assert!(matches!(
            validate_value(&p, "x"),
            Err(ValueError::WrongType { .. })
        ));
        assert!(matches!(
            validate_value(&p, "2.5"),
            Err(ValueError::WrongType { .. })
        ));
        assert!(matches!(
            validate_value(&p, "101"),
            Err(ValueError::AboveMaximum { .. })
        ));
        assert!(matches!(
            validate_value(&p, "-1"),
            Err(ValueError::BelowMinimum { .. })
        ));
        let f = prop(PropertyType::Double, None, Some("1.5"));
        assert!(validate_value(&f, "1.25").is_ok());
        assert!(validate_value(&f, "NaN").is_err());
        let b = prop(PropertyType::Boolean, None, None);
        assert!(validate_value(&b, "true").is_ok());
        assert!(validate_value(&b, "yes").is_err());
        let s = prop(PropertyType::String, Some("0"), None);
        assert!(validate_value(&s, "anything").is_ok());
        let model = vec![p];
        assert!(matches!(
            validate_desired(&model, "humidity", "1"),
            Err(ValueError::UnknownProperty(_))
        ));
    }

    #[test]
    fn the_captured_kubeedge_report_parses() {
        // From ../shared/interop/kubeedge-v1.23.1/session.jsonl (line 160).
        let raw = r#"{"event_id": "cadec563", "timestamp": 1795449982070, "twin": {"temperature":
            {"actual": {"value": "25", "metadata": {"timestamp": 1795449982067}}, "optional": true,
             "metadata": {"type": "int"}, "actual_version": {"cloud": 0, "edge": 1}}}}"#;
        let m: TwinMessage = serde_json::from_str(raw).unwrap();
        let t = &m.twin["temperature"];
        assert_eq!(t.actual.as_ref().unwrap().value.as_deref(), Some("25"));
        assert_eq!(t.actual_version, Some(TwinVersion { cloud: 0, edge: 1 }));
        assert_eq!(
            parse_report_resource("device/default/kcap-dev/twin/edge_updated"),
            Some(DeviceReport::Twin {
                namespace: "default",
                name: "kcap-dev"
            })
        );
        let membership = r#"{"event_id": "f03c", "timestamp": 1795449896673, "added_devices":
            [{"id": "default/kcap-dev", "name": "kcap-dev", "description": "kcap-test-device"}],
            "removed_devices": null}"#;
        let m: MembershipMessage = serde_json::from_str(membership).unwrap();
        assert_eq!(m.added_devices.unwrap()[0].id, "default/kcap-dev");
    }

    #[test]
    fn topics_are_classified() {
        use topics::{Inbound, classify};
        assert_eq!(
            classify("$hw/events/device/default/t1/twin/update"),
            Inbound::TwinUpdate("default/t1".into())
        );
        assert_eq!(
            classify("$hw/events/device/default/t1/twin/get"),
            Inbound::TwinGet("default/t1".into())
        );
        assert_eq!(
            classify("$hw/events/device/default/t1/twin/update/delta"),
            Inbound::Other
        );
        assert_eq!(
            classify("$hw/events/node/edge-1/membership/get"),
            Inbound::MembershipGet("edge-1")
        );
        assert_eq!(classify("$hw/events/upload/x/y"), Inbound::Upload);
        assert_eq!(classify("other/topic"), Inbound::Other);
    }
}

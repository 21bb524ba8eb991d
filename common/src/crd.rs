//! Custom resources kedge shares with KubeEdge, with KubeEdge's JSON field names so that existing
//! manifests apply unchanged:
//! - `devices.kubeedge.io/v1beta1`: [`Device`], [`DeviceModel`], [`DeviceStatus`];
//! - `reliablesyncs.kubeedge.io/v1alpha1`: [`ObjectSync`], [`ClusterObjectSync`].
//!
//! Go's `omitempty` becomes `skip_serializing_if` here, and every field is optional in the schema
//! (KubeEdge's manifests leave most of them out). The CRD YAML in `crds/` is generated from these
//! types by `cloudcore crds` and checked against them by a test.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A free-form JSON object (KubeEdge's `CustomizedValue`).
pub type FreeFormObject = Map<String, Value>;

/// Schema for a free-form object: the API server keeps whatever fields it holds. Used only where
/// KubeEdge's API really is free-form (protocol config data, status extensions).
fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

// ---------------------------------------------------------------------------------------------
// Device

/// A device instance, bound to the edge node named in `nodeName`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "devices.kubeedge.io",
    version = "v1beta1",
    kind = "Device",
    doc = "A device instance on an edge node (KubeEdge devices.kubeedge.io/v1beta1).",
    plural = "devices",
    namespaced,
    status = "DeviceInstanceStatus",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.deviceModelRef.name"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    /// The device model this device is an instance of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_model_ref: Option<LocalObjectReference>,
    /// The edge node that hosts the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<DeviceProperty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ProtocolConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<DeviceMethod>,
    /// How the mapper reports the device's state (online/offline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_report: Option<StateReport>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct LocalObjectReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub config_data: Option<FreeFormObject>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProperty {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The value the cloud wants the device to have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<TwinProperty>,
    /// How a mapper reads or writes this property.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitors: Option<VisitorConfig>,
    /// Milliseconds between reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_cycle: Option<i64>,
    /// Milliseconds between collections from the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect_cycle: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to_cloud: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_method: Option<PushMethod>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VisitorConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub config_data: Option<FreeFormObject>,
}

/// A property value with metadata (timestamps, types). Go always writes `value`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct TwinProperty {
    #[serde(default)]
    pub value: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMethod {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub property_names: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to_cloud: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_cycle: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PushMethod {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<PushMethodHttp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<PushMethodMqtt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otel: Option<PushMethodOtel>,
    #[serde(rename = "dbMethod", default, skip_serializing_if = "Option::is_none")]
    pub db_method: Option<DbMethodConfig>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushMethodHttp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PushMethodMqtt {
    /// Broker address, like `mqtt://127.0.0.1:1883`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PushMethodOtel {
    #[serde(
        rename = "endpointURL",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoint_url: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct DbMethodConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub influxdb2: Option<DbMethodInfluxdb2>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<DbMethodRedis>,
    #[serde(rename = "TDEngine", default, skip_serializing_if = "Option::is_none")]
    pub tdengine: Option<DbMethodTdEngine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql: Option<DbMethodMysql>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DbMethodInfluxdb2 {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub influxdb2_client_config: Option<Influxdb2ClientConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub influxdb2_data_config: Option<Influxdb2DataConfig>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Influxdb2ClientConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Influxdb2DataConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measurement: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tag: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_key: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DbMethodRedis {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_client_config: Option<RedisClientConfig>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisClientConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poolsize: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_idle_conns: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct DbMethodTdEngine {
    #[serde(
        rename = "TDEngineClientConfig",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub tdengine_client_config: Option<TdEngineClientConfig>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TdEngineClientConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct DbMethodMysql {
    #[serde(
        rename = "mysqlClientConfig",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mysql_client_config: Option<MysqlClientConfig>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MysqlClientConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_name: Option<String>,
}

/// `Device.status` as KubeEdge before v1.23 kept it (twins and state on the Device itself).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInstanceStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub twins: Vec<Twin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_online_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to_cloud: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_cycle: Option<i64>,
}

/// Desired and reported values of one property.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub property_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<TwinProperty>,
    /// The desired value the mapper last saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_desired: Option<TwinProperty>,
}

// ---------------------------------------------------------------------------------------------
// DeviceModel

/// A device model: the properties and protocol a kind of device has.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "devices.kubeedge.io",
    version = "v1beta1",
    kind = "DeviceModel",
    doc = "The properties and protocol of a kind of device.",
    plural = "devicemodels",
    namespaced
)]
pub struct DeviceModelSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<ModelProperty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelProperty {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub property_type: Option<PropertyType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<PropertyAccessMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PropertyType {
    #[serde(rename = "INT")]
    Int,
    #[serde(rename = "FLOAT")]
    Float,
    #[serde(rename = "DOUBLE")]
    Double,
    #[serde(rename = "STRING")]
    String,
    #[serde(rename = "BOOLEAN")]
    Boolean,
    #[serde(rename = "BYTES")]
    Bytes,
    #[serde(rename = "STREAM")]
    Stream,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PropertyAccessMode {
    ReadWrite,
    ReadOnly,
}

// ---------------------------------------------------------------------------------------------
// DeviceStatus (a CRD of its own since KubeEdge v1.23; one per Device, same name)

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "devices.kubeedge.io",
    version = "v1beta1",
    kind = "DeviceStatus",
    doc = "Reported twin values and state of one Device (same name as the Device).",
    plural = "devicestatuses",
    namespaced,
    status = "DeviceStatusStatus"
)]
pub struct DeviceStatusSpec {}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatusStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub twins: Vec<Twin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_online_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub extensions: Option<FreeFormObject>,
}

// ---------------------------------------------------------------------------------------------
// ObjectSync / ClusterObjectSync: what a node has acknowledged

/// The last resourceVersion of one namespaced object that one node acknowledged. Named
/// `<node>.<objectUID>`, in the object's namespace.
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema,
)]
#[kube(
    group = "reliablesyncs.kubeedge.io",
    version = "v1alpha1",
    kind = "ObjectSync",
    doc = "The last resourceVersion of a namespaced object that an edge node acknowledged.",
    plural = "objectsyncs",
    namespaced,
    status = "ObjectSyncStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct ObjectSyncSpec {
    #[serde(
        rename = "objectAPIVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub object_api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectSyncStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_resource_version: Option<String>,
}

/// The cluster-scoped counterpart of [`ObjectSync`], for cluster-scoped objects.
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema,
)]
#[kube(
    group = "reliablesyncs.kubeedge.io",
    version = "v1alpha1",
    kind = "ClusterObjectSync",
    doc = "The last resourceVersion of a cluster-scoped object that an edge node acknowledged.",
    plural = "clusterobjectsyncs",
    status = "ObjectSyncStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterObjectSyncSpec {
    #[serde(
        rename = "objectAPIVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub object_api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_name: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Rendering

/// Every CRD kedge defines, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![
        Device::crd(),
        DeviceModel::crd(),
        DeviceStatus::crd(),
        ObjectSync::crd(),
        ClusterObjectSync::crd(),
    ]
}

/// The file a CRD is kept in under `crds/`: `<group>_<plural>.yaml`, as controller-gen names them.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural)
}

/// One CRD as a YAML document (with the leading `---`), exactly as kept in `crds/`.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    Ok(format!("---\n{}", serde_yaml::to_string(crd)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Device as KubeEdge's docs and examples write one (every v1beta1 field set somewhere).
    const DEVICE_FIXTURE: &str = include_str!("../tests/fixtures/device-v1beta1.yaml");
    const MODEL_FIXTURE: &str = include_str!("../tests/fixtures/devicemodel-v1beta1.yaml");

    #[test]
    fn kubeedge_device_manifest_round_trips_without_losing_fields() {
        let original: Value = serde_yaml::from_str(DEVICE_FIXTURE).unwrap();
        let device: Device = serde_yaml::from_str(DEVICE_FIXTURE).unwrap();
        assert_eq!(device.spec.node_name.as_deref(), Some("edge-node-1"));
        assert_eq!(device.spec.properties.len(), 2);
        let reencoded = serde_json::to_value(&device).unwrap();
        assert_eq!(reencoded, original);
    }

    #[test]
    fn kubeedge_device_model_round_trips() {
        let original: Value = serde_yaml::from_str(MODEL_FIXTURE).unwrap();
        let model: DeviceModel = serde_yaml::from_str(MODEL_FIXTURE).unwrap();
        assert_eq!(
            model.spec.properties[0].property_type,
            Some(PropertyType::Int)
        );
        assert_eq!(serde_json::to_value(&model).unwrap(), original);
    }

    #[test]
    fn unknown_property_type_is_refused() {
        let bad = MODEL_FIXTURE.replace("type: INT", "type: LONG");
        let e = serde_yaml::from_str::<DeviceModel>(&bad).unwrap_err();
        assert!(e.to_string().contains("LONG"), "{e}");
    }

    #[test]
    fn crds_have_the_kubeedge_names() {
        let names: Vec<String> = all_crds()
            .iter()
            .map(|c| c.metadata.name.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "devices.devices.kubeedge.io",
                "devicemodels.devices.kubeedge.io",
                "devicestatuses.devices.kubeedge.io",
                "objectsyncs.reliablesyncs.kubeedge.io",
                "clusterobjectsyncs.reliablesyncs.kubeedge.io",
            ]
        );
        assert_eq!(
            crd_file_name(&Device::crd()),
            "devices.kubeedge.io_devices.yaml"
        );
    }

    /// The rules a real API server applies to a CRD schema (structural schema), checked on the
    /// generated schemas: every node says its type (or is int-or-string / preserve-unknown), no
    /// `$ref`, no type arrays, no `anyOf`/`oneOf` that set types, `additionalProperties` never
    /// together with `properties`, nullable only with a type.
    #[test]
    fn generated_schemas_are_structural() {
        fn check(path: &str, node: &Value, errors: &mut Vec<String>) {
            let Some(obj) = node.as_object() else {
                errors.push(format!("{path}: schema is not an object"));
                return;
            };
            for banned in [
                "$ref",
                "$schema",
                "definitions",
                "$defs",
                "oneOf",
                "allOf",
                "not",
            ] {
                if obj.contains_key(banned) {
                    errors.push(format!("{path}: has `{banned}`"));
                }
            }
            let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
            let preserve =
                obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            match obj.get("type") {
                Some(Value::String(_)) => {}
                Some(other) => errors.push(format!("{path}: type is {other}, not one string")),
                None if int_or_string => {}
                None if preserve => {}
                None => errors.push(format!("{path}: no type")),
            }
            if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
                errors.push(format!(
                    "{path}: properties together with additionalProperties"
                ));
            }
            if let Some(Value::Array(any)) = obj.get("anyOf") {
                for (i, alt) in any.iter().enumerate() {
                    if alt.get("type").is_some() {
                        errors.push(format!("{path}.anyOf[{i}]: sets a type"));
                    }
                }
            }
            if let Some(Value::Object(props)) = obj.get("properties") {
                for (k, v) in props {
                    check(&format!("{path}.{k}"), v, errors);
                }
            }
            if let Some(items) = obj.get("items") {
                check(&format!("{path}[]"), items, errors);
            }
            if let Some(ap @ Value::Object(_)) = obj.get("additionalProperties") {
                check(&format!("{path}{{}}"), ap, errors);
            }
            if let Some(Value::Array(req)) = obj.get("required") {
                let props = obj.get("properties").and_then(Value::as_object);
                for r in req {
                    let known = r
                        .as_str()
                        .is_some_and(|r| props.is_some_and(|p| p.contains_key(r)));
                    if !known {
                        errors.push(format!("{path}: required `{r}` is not a property"));
                    }
                }
            }
        }
        let mut errors = Vec::new();
        for crd in all_crds() {
            for v in &crd.spec.versions {
                let schema = v
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref())
                    .map(|s| serde_json::to_value(s).unwrap())
                    .unwrap_or(Value::Null);
                check(
                    &format!("{}/{}", crd.spec.names.kind, v.name),
                    &schema,
                    &mut errors,
                );
            }
        }
        assert!(
            errors.is_empty(),
            "non-structural schema:\n{}",
            errors.join("\n")
        );
    }
}

//! The labels an edge node gives its own Node: what it reports about itself (architecture and
//! OS) and what its configuration asks for (`modules.edged.nodeLabels`, or the labels of the
//! Node a KubeEdge edge registers). cloudcore writes them with its own credentials, so it holds
//! the node to the API server's NodeRestriction rule itself (`kedge_common::labels`): a label a
//! node may not set on itself is left out and logged, the rest is applied.

use serde_json::{Map, Value, json};

/// Splits the labels a node asked for into those it may set and the keys it may not (or that
/// are not valid labels at all).
pub fn self_set(requested: Option<&Map<String, Value>>) -> (Map<String, Value>, Vec<String>) {
    let mut allowed = Map::new();
    let mut refused = Vec::new();
    for (key, value) in requested.into_iter().flatten() {
        let text = value.as_str();
        let valid = text.is_some_and(|v| kedge_common::labels::validate(key, v).is_ok());
        if valid && kedge_common::labels::node_may_set(key) {
            allowed.insert(key.clone(), value.clone());
        } else {
            refused.push(key.clone());
        }
    }
    (allowed, refused)
}

/// The labels a status report asks for: architecture and OS from `nodeInfo` (as a kubelet sets
/// them) and the node's configured labels, filtered by [`self_set`]; and the refused keys.
pub fn from_status_report(content: &Value) -> (Map<String, Value>, Vec<String>) {
    let (mut labels, refused) = self_set(
        content
            .pointer("/metadata/labels")
            .and_then(Value::as_object),
    );
    let status = content.get("status").or_else(|| content.get("Status"));
    let info = |field: &str| {
        status
            .and_then(|s| s.pointer(&format!("/nodeInfo/{field}")))
            .and_then(Value::as_str)
    };
    if let Some(arch) = info("architecture") {
        labels.insert("kubernetes.io/arch".into(), json!(arch));
        labels.insert("beta.kubernetes.io/arch".into(), json!(arch));
    }
    if let Some(os) = info("operatingSystem") {
        labels.insert("kubernetes.io/os".into(), json!(os));
        labels.insert("beta.kubernetes.io/os".into(), json!(os));
    }
    (labels, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_sets_its_arch_os_and_allowed_labels_only() {
        let content = json!({
            "metadata": {"labels": {
                "zone": "a",
                "example.com/rack": "r7",
                "node-restriction.kubernetes.io/pool": "trusted",
                "node-role.kubernetes.io/control-plane": "",
                "bad key!": "x",
                "count": 3,
            }},
            "status": {"nodeInfo": {"architecture": "arm64", "operatingSystem": "linux"}},
        });
        let (labels, mut refused) = from_status_report(&content);
        assert_eq!(
            Value::Object(labels),
            json!({
                "zone": "a",
                "example.com/rack": "r7",
                "kubernetes.io/arch": "arm64",
                "beta.kubernetes.io/arch": "arm64",
                "kubernetes.io/os": "linux",
                "beta.kubernetes.io/os": "linux",
            })
        );
        refused.sort();
        assert_eq!(
            refused,
            [
                "bad key!",
                "count",
                "node-restriction.kubernetes.io/pool",
                "node-role.kubernetes.io/control-plane"
            ]
        );
        // KubeEdge's report: no labels, `Status` capitalised.
        let kubeedge = json!({"Status": {"nodeInfo": {"architecture": "amd64"}}});
        assert_eq!(
            Value::Object(from_status_report(&kubeedge).0),
            json!({"kubernetes.io/arch": "amd64", "beta.kubernetes.io/arch": "amd64"})
        );
    }
}

//! Test support only: what the node lifecycle controller and the taint eviction controller of a
//! real cluster do to a node that stopped renewing its Lease, so tests can put an edge node
//! through a long absence without waiting for it.
//!
//! The rule is Kubernetes' (written here independently of cloudcore's code, so a test checks
//! cloudcore against it): a pod on a node tainted `NoExecute` is evicted at once if none of its
//! tolerations matches the taint, after the *smallest* `tolerationSeconds` among the matching
//! ones, and never if every matching toleration has no `tolerationSeconds`.

use std::time::Duration;

use serde_json::{Value, json};

use super::store::{ApiError, ListOptions, Store};

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";

fn tolerates(t: &Value, key: &str, effect: &str) -> bool {
    let s = |f: &str| t.get(f).and_then(Value::as_str).unwrap_or_default();
    let effect_ok = s("effect").is_empty() || s("effect") == effect;
    let key_ok = s("key").is_empty() || s("key") == key;
    let op = if s("operator").is_empty() {
        "Equal"
    } else {
        s("operator")
    };
    effect_ok
        && key_ok
        && match op {
            "Exists" => true,
            // The node lifecycle controller's taints carry no value.
            "Equal" => !s("key").is_empty() && s("value").is_empty(),
            _ => false,
        }
}

/// Whether a pod with these tolerations is evicted once the taint has been there `elapsed`.
pub fn evicted(tolerations: &[Value], key: &str, elapsed: Duration) -> bool {
    let matching: Vec<&Value> = tolerations
        .iter()
        .filter(|t| tolerates(t, key, "NoExecute"))
        .collect();
    if matching.is_empty() {
        return true;
    }
    matching
        .iter()
        .filter_map(|t| t.get("tolerationSeconds").and_then(Value::as_i64))
        .min()
        .is_some_and(|secs| elapsed.as_secs() as i64 >= secs.max(0))
}

/// Taints `node` `unreachable:NoExecute`, marks its Ready condition Unknown, and deletes the pods
/// on it that would have been evicted after `unreachable_for`. Returns their names.
pub fn evict_unreachable(
    store: &Store,
    node: &str,
    unreachable_for: Duration,
) -> Result<Vec<String>, ApiError> {
    let nodes = store
        .resolve("", "v1", "nodes")
        .ok_or_else(|| ApiError::bad_request("no nodes"))?;
    let pods = store
        .resolve("", "v1", "pods")
        .ok_or_else(|| ApiError::bad_request("no pods"))?;
    let current = store.get(&nodes, "", node)?;
    let mut taints: Vec<Value> = current
        .pointer("/spec/taints")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !taints.iter().any(|t| t["key"] == UNREACHABLE) {
        taints.push(json!({"key": UNREACHABLE, "effect": "NoExecute", "timeAdded": super::store::now_rfc3339()}));
    }
    store.patch(
        &nodes,
        "",
        node,
        "application/merge-patch+json",
        &json!({"spec": {"taints": taints}}),
        false,
    )?;
    let mut conditions: Vec<Value> = current
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for c in conditions.iter_mut().filter(|c| c["type"] == "Ready") {
        c["status"] = json!("Unknown");
        c["reason"] = json!("NodeStatusUnknown");
        c["message"] = json!("Kubelet stopped posting node status.");
    }
    store.patch(
        &nodes,
        "",
        node,
        "application/merge-patch+json",
        &json!({"status": {"conditions": conditions}}),
        true,
    )?;
    let list = store.list(
        &pods,
        None,
        &ListOptions {
            label_selector: None,
            field_selector: Some(format!("spec.nodeName={node}")),
            resource_version: None,
            limit: None,
            continue_token: None,
        },
    )?;
    let mut evicted_pods = Vec::new();
    for p in list["items"].as_array().into_iter().flatten() {
        let tolerations: Vec<Value> = p
            .pointer("/spec/tolerations")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if evicted(&tolerations, UNREACHABLE, unreachable_for) {
            let ns = p
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default");
            let name = p
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            store.delete(&pods, ns, name, None, None, None)?;
            evicted_pods.push(name.to_owned());
        }
    }
    Ok(evicted_pods)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_rule_smallest_matching_toleration_wins() {
        let t = |v: Value| v;
        let five_min = t(
            json!({"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}),
        );
        let forever = t(json!({"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"}));
        let long = Duration::from_secs(400);
        assert!(evicted(&[], UNREACHABLE, Duration::ZERO));
        assert!(evicted(std::slice::from_ref(&five_min), UNREACHABLE, long));
        assert!(!evicted(
            std::slice::from_ref(&five_min),
            UNREACHABLE,
            Duration::from_secs(299)
        ));
        assert!(
            evicted(&[five_min, forever.clone()], UNREACHABLE, long),
            "a second toleration does not help"
        );
        assert!(!evicted(&[forever], UNREACHABLE, long));
        assert!(!evicted(
            &[json!({"operator": "Exists"})],
            UNREACHABLE,
            long
        ));
        assert!(evicted(
            &[json!({"key": "other", "operator": "Exists"})],
            UNREACHABLE,
            long
        ));
    }
}

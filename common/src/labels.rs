//! Label keys and values as the API server validates them, and which labels a node may set on
//! its own Node.
//!
//! An edge node's labels (`modules.edged.nodeLabels`, or the Node a KubeEdge edge registers)
//! reach the cluster through cloudcore's own credentials, so the API server's NodeRestriction
//! admission never sees the node as the author. cloudcore applies the same rule itself: a node
//! may not give itself labels under `node-restriction.kubernetes.io/` (that prefix exists so
//! that workloads can be steered to nodes an administrator vouched for) nor any other
//! `kubernetes.io`/`k8s.io` label beyond the ones a kubelet sets — otherwise a stolen device
//! could label itself `node-role.kubernetes.io/control-plane` and attract what is meant for the
//! control plane. edgecore refuses such labels in its config for the same reason a kubelet
//! refuses them in `--node-labels`: they would never be applied.

/// Labels a kubelet sets on its own Node (Kubernetes' `kubeletLabels`), plus the two role labels
/// KubeEdge's edge registers with.
const NODE_SELF_LABELS: &[&str] = &[
    "kubernetes.io/hostname",
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/region",
    "node.kubernetes.io/instance-type",
    "beta.kubernetes.io/instance-type",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
    "node-role.kubernetes.io/edge",
    "node-role.kubernetes.io/agent",
];

/// Label prefixes (and their subdomains) a kubelet may set freely.
const NODE_SELF_PREFIXES: &[&str] = &["kubelet.kubernetes.io", "node.kubernetes.io"];

fn in_domain(prefix: &str, domain: &str) -> bool {
    prefix == domain
        || prefix
            .strip_suffix(domain)
            .is_some_and(|sub| sub.ends_with('.'))
}

/// Whether a node may set this label on its own Node (Kubernetes' NodeRestriction rule).
pub fn node_may_set(key: &str) -> bool {
    let Some((prefix, _)) = key.split_once('/') else {
        return true;
    };
    if in_domain(prefix, "node-restriction.kubernetes.io") {
        return false;
    }
    if !in_domain(prefix, "kubernetes.io") && !in_domain(prefix, "k8s.io") {
        return true;
    }
    NODE_SELF_LABELS.contains(&key) || NODE_SELF_PREFIXES.iter().any(|d| in_domain(prefix, d))
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters.
fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Checks a label as the API server would; the error says what is wrong.
pub fn validate(key: &str, value: &str) -> Result<(), String> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            // A DNS-1123 subdomain, as a node name is.
            if let Err(reason) = crate::resource::validate_node_name(prefix) {
                return Err(format!(
                    "label key `{key}`: the prefix must be a DNS subdomain; it {reason}"
                ));
            }
            name
        }
        None => key,
    };
    if !valid_name(name) {
        return Err(format!(
            "label key `{key}`: the name must be 1-63 characters, alphanumeric at both ends, \
             with '-', '_' or '.' between"
        ));
    }
    if !value.is_empty() && !valid_name(value) {
        return Err(format!(
            "label `{key}`: the value `{value}` must be empty or 1-63 characters, alphanumeric at \
             both ends, with '-', '_' or '.' between"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_sets_only_what_node_restriction_allows() {
        for allowed in [
            "zone",
            "example.com/rack",
            "kubernetes.io/arch",
            "topology.kubernetes.io/zone",
            "node.kubernetes.io/instance-type",
            "node.kubernetes.io/anything",
            "x.kubelet.kubernetes.io/y",
            "node-role.kubernetes.io/edge",
            "notkubernetes.io/x",
        ] {
            assert!(node_may_set(allowed), "{allowed}");
        }
        for refused in [
            "node-restriction.kubernetes.io/pool",
            "a.node-restriction.kubernetes.io/pool",
            "node-role.kubernetes.io/control-plane",
            "node-role.kubernetes.io/master",
            "kubernetes.io/made-up",
            "k8s.io/x",
            "sub.k8s.io/x",
            "example.kubernetes.io/x",
        ] {
            assert!(!node_may_set(refused), "{refused}");
        }
    }

    #[test]
    fn label_syntax_is_the_api_servers() {
        assert_eq!(validate("zone", "a"), Ok(()));
        assert_eq!(validate("example.com/rack", ""), Ok(()));
        assert_eq!(validate("a.b-c/x_y.z", "v-1.2_3"), Ok(()));
        for (k, v) in [
            ("", "a"),
            ("-zone", "a"),
            ("Example.com/x", "a"),
            ("example.com/", "a"),
            ("/x", "a"),
            ("zone", "bad value"),
            ("zone", "-a"),
            (&"k".repeat(64), "a"),
            ("zone", &"v".repeat(64)),
        ] {
            assert!(validate(k, v).is_err(), "{k:?}={v:?}");
        }
    }
}

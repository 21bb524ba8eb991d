//! Resource paths: where a message's object lives.
//!
//! Inside the cloud a path carries the node it is for: `node/<node>/<namespace>/<type>[/<name>]`.
//! On the wire to and from that node the `node/<node>/` prefix is stripped, so the edge sees
//! `<namespace>/<type>[/<name>]`. Cluster-scoped objects use the namespace `null`, as KubeEdge
//! does. Because a namespace may itself be called `node`, the two forms are parsed by separate
//! constructors rather than guessed.

use std::fmt;

/// The namespace segment KubeEdge uses for cluster-scoped objects.
pub const CLUSTER_SCOPE: &str = "null";
const NODE_PREFIX: &str = "node";
/// Longest resource path we accept; real ones are well under 1 KiB.
pub const MAX_PATH_BYTES: usize = 2048;
/// Longest single segment (a DNS subdomain is at most 253 bytes).
const MAX_SEGMENT_BYTES: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("resource path is empty")]
    Empty,
    #[error("resource path is {0} bytes, longer than {MAX_PATH_BYTES}")]
    TooLong(usize),
    #[error("resource path `{path}` has an empty segment at position {index}")]
    EmptySegment { path: String, index: usize },
    #[error("resource path `{path}` has a bad segment `{segment}`: {reason}")]
    BadSegment {
        path: String,
        segment: String,
        reason: &'static str,
    },
    #[error("resource path `{0}` does not start with `node/<node>/`")]
    MissingNodePrefix(String),
    #[error("resource path `{path}` names an invalid node `{node}`: {reason}")]
    BadNodeName {
        path: String,
        node: String,
        reason: &'static str,
    },
    #[error("resource path `{0}` has nothing after the node prefix")]
    NothingAfterNode(String),
}

/// A parsed, validated resource path. The node is present for cloud-side paths only.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourcePath {
    node: Option<String>,
    /// The validated edge-side form, `<namespace>/<type>[/<name>]`.
    edge: String,
}

impl ResourcePath {
    /// Parses an edge-side path, `<namespace>/<type>[/<name>...]` or a single word such as `node`
    /// or `membership`.
    pub fn parse_edge(path: &str) -> Result<Self, PathError> {
        validate_segments(path)?;
        Ok(ResourcePath {
            node: None,
            edge: path.to_owned(),
        })
    }

    /// Parses a cloud-side path, `node/<node>/<rest>`.
    pub fn parse_cloud(path: &str) -> Result<Self, PathError> {
        validate_segments(path)?;
        let mut parts = path.splitn(3, '/');
        let (prefix, node, rest) = (parts.next(), parts.next(), parts.next());
        let (Some(NODE_PREFIX), Some(node)) = (prefix, node) else {
            return Err(PathError::MissingNodePrefix(path.to_owned()));
        };
        if let Err(reason) = validate_node_name(node) {
            return Err(PathError::BadNodeName {
                path: path.to_owned(),
                node: node.to_owned(),
                reason,
            });
        }
        let Some(rest) = rest else {
            return Err(PathError::NothingAfterNode(path.to_owned()));
        };
        Ok(ResourcePath {
            node: Some(node.to_owned()),
            edge: rest.to_owned(),
        })
    }

    /// Builds the edge-side path of an object. `namespace: None` means cluster-scoped.
    pub fn object(
        namespace: Option<&str>,
        resource_type: &str,
        name: Option<&str>,
    ) -> Result<Self, PathError> {
        let mut s = format!("{}/{}", namespace.unwrap_or(CLUSTER_SCOPE), resource_type);
        if let Some(n) = name {
            s.push('/');
            s.push_str(n);
        }
        Self::parse_edge(&s)
    }

    /// The node this path is for (cloud-side paths only).
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The same path without the `node/<node>/` prefix, as sent to the edge.
    pub fn without_node(&self) -> ResourcePath {
        ResourcePath {
            node: None,
            edge: self.edge.clone(),
        }
    }

    /// The same path for `node`, as the cloud tags messages coming up from that node.
    pub fn with_node(&self, node: &str) -> Result<ResourcePath, PathError> {
        if let Err(reason) = validate_node_name(node) {
            return Err(PathError::BadNodeName {
                path: self.to_string(),
                node: node.to_owned(),
                reason,
            });
        }
        Ok(ResourcePath {
            node: Some(node.to_owned()),
            edge: self.edge.clone(),
        })
    }

    /// The edge-side form (`<namespace>/<type>[/<name>]`), as sent on the wire.
    pub fn edge_str(&self) -> &str {
        &self.edge
    }

    fn part(&self, i: usize) -> Option<&str> {
        self.edge.splitn(3, '/').nth(i)
    }

    /// The raw namespace segment (`null` for cluster-scoped objects); `None` for one-word paths.
    pub fn namespace_segment(&self) -> Option<&str> {
        self.part(1).and(self.part(0))
    }

    /// The object's namespace; `None` for cluster-scoped objects and one-word paths.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace_segment().filter(|ns| *ns != CLUSTER_SCOPE)
    }

    pub fn is_cluster_scoped(&self) -> bool {
        self.namespace_segment() == Some(CLUSTER_SCOPE)
    }

    /// The resource type (`pod`, `configmap`, `nodestatus`, ...): the second segment.
    pub fn resource_type(&self) -> Option<&str> {
        self.part(1)
    }

    /// The object name: everything after the type. KubeEdge splits a path into at most three
    /// parts, so a name may contain further `/` (twin paths do).
    pub fn name(&self) -> Option<&str> {
        self.part(2)
    }
}

impl fmt::Display for ResourcePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(node) = &self.node {
            write!(f, "{NODE_PREFIX}/{node}/")?;
        }
        f.write_str(&self.edge)
    }
}

fn validate_segments(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong(path.len()));
    }
    for (index, seg) in path.split('/').enumerate() {
        if seg.is_empty() {
            return Err(PathError::EmptySegment {
                path: path.to_owned(),
                index,
            });
        }
        let bad = |reason| PathError::BadSegment {
            path: path.to_owned(),
            segment: seg.to_owned(),
            reason,
        };
        if seg.len() > MAX_SEGMENT_BYTES {
            return Err(bad("longer than 253 bytes"));
        }
        if seg.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad("contains whitespace or control characters"));
        }
        if seg == "." || seg == ".." {
            return Err(bad("is a relative path element"));
        }
    }
    Ok(())
}

/// The Kubernetes `apiVersion` and `kind` of an object sent with resource type `wire`.
pub fn api_type_of(wire: &str) -> Option<(&'static str, &'static str)> {
    Some(match wire {
        "pod" => ("v1", "Pod"),
        "configmap" => ("v1", "ConfigMap"),
        "secret" => ("v1", "Secret"),
        "node" => ("v1", "Node"),
        "service" => ("v1", "Service"),
        "endpoints" => ("v1", "Endpoints"),
        "serviceaccount" => ("v1", "ServiceAccount"),
        "lease" => ("coordination.k8s.io/v1", "Lease"),
        "device" => ("devices.kubeedge.io/v1beta1", "Device"),
        "devicemodel" => ("devices.kubeedge.io/v1beta1", "DeviceModel"),
        _ => return None,
    })
}

/// A Kubernetes node name is a DNS-1123 subdomain: lowercase alphanumerics, `-` and `.`,
/// starting and ending with an alphanumeric, at most 253 characters.
pub fn validate_node_name(node: &str) -> Result<(), &'static str> {
    if node.is_empty() {
        return Err("is empty");
    }
    if node.len() > 253 {
        return Err("is longer than 253 characters");
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if !node.chars().all(ok_char) {
        return Err("may contain only lowercase letters, digits, '-' and '.'");
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !alnum(node.chars().next()) || !alnum(node.chars().last()) {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_path_strips_and_readds_the_node_prefix() {
        let p = ResourcePath::parse_cloud("node/edge-1/default/pod/web").unwrap();
        assert_eq!(p.node(), Some("edge-1"));
        assert_eq!(p.namespace(), Some("default"));
        assert_eq!(p.resource_type(), Some("pod"));
        assert_eq!(p.name(), Some("web"));
        let edge = p.without_node();
        assert_eq!(edge.to_string(), "default/pod/web");
        assert_eq!(edge.edge_str(), "default/pod/web");
        let back = edge.with_node("edge-1").unwrap();
        assert_eq!(back, p);
        assert_eq!(back.to_string(), "node/edge-1/default/pod/web");
    }

    #[test]
    fn cluster_scoped_objects_use_null() {
        let p = ResourcePath::object(None, "node", Some("edge-1")).unwrap();
        assert_eq!(p.to_string(), "null/node/edge-1");
        assert!(p.is_cluster_scoped());
        assert_eq!(p.namespace(), None);
        assert_eq!(p.namespace_segment(), Some("null"));
        let c = ResourcePath::parse_cloud("node/n1/null/nodestatus/n1").unwrap();
        assert!(c.is_cluster_scoped());
    }

    #[test]
    fn lists_and_one_word_paths() {
        let p = ResourcePath::parse_edge("default/podlist").unwrap();
        assert_eq!(p.resource_type(), Some("podlist"));
        assert_eq!(p.name(), None);
        let k = ResourcePath::parse_edge("node").unwrap();
        assert_eq!(k.namespace_segment(), None);
        assert_eq!(k.resource_type(), None);
        let m = ResourcePath::parse_cloud("node/n1/membership").unwrap();
        assert_eq!(m.edge_str(), "membership");
    }

    #[test]
    fn names_may_contain_slashes() {
        let p = ResourcePath::parse_edge("default/device/thermo-1/twin/edge_updated").unwrap();
        assert_eq!(p.name(), Some("thermo-1/twin/edge_updated"));
    }

    #[test]
    fn a_namespace_called_node_is_not_a_prefix_on_the_edge() {
        let p = ResourcePath::parse_edge("node/pod/x").unwrap();
        assert_eq!(p.namespace(), Some("node"));
        assert_eq!(p.node(), None);
    }

    #[test]
    fn bad_paths_are_typed_errors() {
        assert_eq!(ResourcePath::parse_edge(""), Err(PathError::Empty));
        assert!(matches!(
            ResourcePath::parse_edge("default//web"),
            Err(PathError::EmptySegment { index: 1, .. })
        ));
        assert!(matches!(
            ResourcePath::parse_edge("/default/pod"),
            Err(PathError::EmptySegment { index: 0, .. })
        ));
        assert!(matches!(
            ResourcePath::parse_edge("default/pod/"),
            Err(PathError::EmptySegment { index: 2, .. })
        ));
        assert!(matches!(
            ResourcePath::parse_edge("default/pod/we b"),
            Err(PathError::BadSegment { .. })
        ));
        assert!(matches!(
            ResourcePath::parse_edge("default/pod/a\u{0}b"),
            Err(PathError::BadSegment { .. })
        ));
        assert!(matches!(
            ResourcePath::parse_edge("../pod/x"),
            Err(PathError::BadSegment { .. })
        ));
        assert!(matches!(
            ResourcePath::parse_edge(&"a/".repeat(2000)),
            Err(PathError::TooLong(_))
        ));
        assert!(matches!(
            ResourcePath::parse_edge(&format!("default/pod/{}", "x".repeat(300))),
            Err(PathError::BadSegment { .. })
        ));
        assert!(matches!(
            ResourcePath::parse_cloud("default/pod/web"),
            Err(PathError::MissingNodePrefix(_))
        ));
        assert!(matches!(
            ResourcePath::parse_cloud("node"),
            Err(PathError::MissingNodePrefix(_))
        ));
        assert!(matches!(
            ResourcePath::parse_cloud("node/Edge_1/default/pod/web"),
            Err(PathError::BadNodeName { .. })
        ));
        assert!(matches!(
            ResourcePath::parse_cloud("node/-a/default/pod"),
            Err(PathError::BadNodeName { .. })
        ));
        assert!(matches!(
            ResourcePath::parse_cloud("node/n1"),
            Err(PathError::NothingAfterNode(_))
        ));
        let edge = ResourcePath::parse_edge("default/pod/web").unwrap();
        assert!(matches!(
            edge.with_node("BAD"),
            Err(PathError::BadNodeName { .. })
        ));
    }
}

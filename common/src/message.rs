//! The cloud–edge message envelope, as KubeEdge's beehive `model.Message` puts it on the wire.
//!
//! ```text
//! { "header":  { "msg_id", "parent_msg_id"?, "timestamp", "resourceversion"?, "sync"?, "type"? },
//!   "route":   { "source"?, "destination"?, "group"?, "operation"?, "resource"? },
//!   "content": <any JSON> }
//! ```
//! Field names and omission rules follow KubeEdge's Go struct tags exactly (`omitempty` fields are
//! left out when empty, `msg_id`, `timestamp`, `route` and `content` are always written), so a
//! KubeEdge peer reads what we write and we read what it writes.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::resource::{PathError, ResourcePath};

/// Largest message we accept by default (8 MiB), both as a JSON document and as a WebSocket frame.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// One message between cloud and edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub header: MessageHeader,
    /// Go writes the route struct even when all its fields are empty; so do we.
    #[serde(rename = "route", default)]
    pub route: MessageRoute,
    /// Usually a full Kubernetes object or a string ("OK", "ping"). Go writes `null` for nil.
    #[serde(default)]
    pub content: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageHeader {
    #[serde(rename = "msg_id")]
    pub id: String,
    #[serde(
        rename = "parent_msg_id",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub parent_id: String,
    /// Unix time in milliseconds.
    pub timestamp: i64,
    #[serde(
        rename = "resourceversion",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub resource_version: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub sync: bool,
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub message_type: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRoute {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub destination: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(default, skip_serializing_if = "Operation::is_empty")]
    pub operation: Operation,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource: String,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What a message asks for. Unknown operations (task-specific ones, or ones a newer peer invents)
/// are kept verbatim in [`Operation::Other`] so they survive a round trip.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum Operation {
    Insert,
    Update,
    Patch,
    Delete,
    Query,
    Upload,
    Response,
    Error,
    Keepalive,
    /// Any other non-empty value, kept verbatim.
    Other(String),
    /// No operation given (the field is absent or empty).
    #[default]
    Empty,
}

impl Operation {
    pub fn as_str(&self) -> &str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Patch => "patch",
            Operation::Delete => "delete",
            Operation::Query => "query",
            Operation::Upload => "upload",
            Operation::Response => "response",
            Operation::Error => "error",
            Operation::Keepalive => "keepalive",
            Operation::Other(s) => s,
            Operation::Empty => "",
        }
    }

    pub fn is_empty(&self) -> bool {
        self.as_str().is_empty()
    }
}

impl From<&str> for Operation {
    fn from(s: &str) -> Self {
        match s {
            "insert" => Operation::Insert,
            "update" => Operation::Update,
            "patch" => Operation::Patch,
            "delete" => Operation::Delete,
            "query" => Operation::Query,
            "upload" => Operation::Upload,
            "response" => Operation::Response,
            "error" => Operation::Error,
            "keepalive" => Operation::Keepalive,
            "" => Operation::Empty,
            other => Operation::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Operation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Operation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(Operation::from(s.as_ref()))
    }
}

/// Well-known route groups: they select the edge module a message is for.
pub mod group {
    pub const RESOURCE: &str = "resource";
    pub const TWIN: &str = "twin";
    pub const USER: &str = "user";
    pub const FUNC: &str = "func";
    pub const META: &str = "meta";
    pub const TASK_MANAGER: &str = "taskmanager";
}

/// Well-known module names used as route sources.
pub mod module {
    pub const EDGE_HUB: &str = "edgehub";
    pub const CLOUD_HUB: &str = "cloudhub";
    pub const EDGE_CONTROLLER: &str = "edgecontroller";
    pub const DEVICE_CONTROLLER: &str = "devicecontroller";
    pub const META_MANAGER: &str = "metaManager";
}

/// Errors from decoding a message. Every malformed input ends here; nothing panics.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("message is {size} bytes, larger than the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("message is not valid UTF-8 (first invalid byte at offset {valid_up_to})")]
    NotUtf8 { valid_up_to: usize },
    #[error("message is not well-formed JSON: {0}")]
    Syntax(#[source] serde_json::Error),
    #[error("message field `{path}` is invalid: {source}")]
    Invalid {
        /// Where in the document the problem is, e.g. `header.timestamp` (`.` for the top level).
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("message header has an empty msg_id")]
    EmptyId,
}

impl Message {
    /// A new message with a fresh id and the current time.
    pub fn new(
        source: &str,
        group: &str,
        operation: Operation,
        resource: impl Into<String>,
        content: Value,
    ) -> Self {
        Message {
            header: MessageHeader {
                id: new_id(),
                parent_id: String::new(),
                timestamp: now_millis(),
                resource_version: String::new(),
                sync: false,
                message_type: String::new(),
            },
            route: MessageRoute {
                source: source.to_owned(),
                destination: String::new(),
                group: group.to_owned(),
                operation,
                resource: resource.into(),
            },
            content,
        }
    }

    /// The response (ack) to `self`, as KubeEdge builds it: same group and resource, operation
    /// `response`, `parent_msg_id` = our id.
    pub fn response(&self, source: &str, content: Value) -> Message {
        let mut resp = Message::new(
            source,
            &self.route.group,
            Operation::Response,
            self.route.resource.clone(),
            content,
        );
        resp.header.parent_id = self.header.id.clone();
        resp.header.resource_version = self.header.resource_version.clone();
        resp
    }

    /// The edge's heartbeat, as KubeEdge v1.23's edge sends it (the captured session):
    /// `{source: websocket, group: resource, resource: node, operation: keepalive, content:
    /// "ping"}`.
    pub fn keepalive() -> Message {
        Message::new(
            "websocket",
            group::RESOURCE,
            Operation::Keepalive,
            "node",
            Value::String("ping".to_owned()),
        )
    }

    pub fn with_resource_version(mut self, rv: impl Into<String>) -> Self {
        self.header.resource_version = rv.into();
        self
    }

    pub fn is_response(&self) -> bool {
        !self.header.parent_id.is_empty()
            && matches!(self.route.operation, Operation::Response | Operation::Error)
    }

    /// Parses `route.resource` as an edge-side path (`<namespace>/<type>[/<name>]`).
    pub fn edge_resource(&self) -> Result<ResourcePath, PathError> {
        ResourcePath::parse_edge(&self.route.resource)
    }

    /// Decodes one message from bytes, refusing anything over `limit` bytes.
    pub fn from_slice(bytes: &[u8], limit: usize) -> Result<Message, MessageError> {
        if bytes.len() > limit {
            return Err(MessageError::TooLarge {
                size: bytes.len(),
                limit,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| MessageError::NotUtf8 {
            valid_up_to: e.valid_up_to(),
        })?;
        Message::from_str_limited(text, limit)
    }

    /// Decodes one message from a string, refusing anything over `limit` bytes.
    pub fn from_str_limited(text: &str, limit: usize) -> Result<Message, MessageError> {
        if text.len() > limit {
            return Err(MessageError::TooLarge {
                size: text.len(),
                limit,
            });
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let msg: Message = match serde_path_to_error::deserialize(&mut de) {
            Ok(m) => m,
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner();
                return Err(if inner.is_syntax() || inner.is_eof() {
                    MessageError::Syntax(inner)
                } else {
                    MessageError::Invalid {
                        path,
                        source: inner,
                    }
                });
            }
        };
        de.end().map_err(MessageError::Syntax)?;
        if msg.header.id.is_empty() {
            return Err(MessageError::EmptyId);
        }
        Ok(msg)
    }

    /// Encodes to JSON text. Serializing our own types cannot fail (all map keys are strings).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            // Unreachable with serde_json::Value content; keep a decodable fallback anyway.
            tracing::error!(error = %e, "failed to encode message");
            String::from("{}")
        })
    }
}

pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A new message or event id (a random UUID, as KubeEdge uses).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(s: &str) -> Result<Message, MessageError> {
        Message::from_str_limited(s, DEFAULT_MAX_MESSAGE_BYTES)
    }

    /// A pod insert as KubeEdge's cloudcore writes it (hand-written from its struct tags).
    const KUBEEDGE_POD_INSERT: &str = r#"{"header":{"msg_id":"4b5a3e7c-2f7a-4d0e-9d55-3b1f8a0c1e11","parent_msg_id":"","timestamp":1732330000123,"resourceversion":"4711"},"route":{"source":"edgecontroller","group":"resource","operation":"insert","resource":"default/pod/web"},"content":{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web","namespace":"default","uid":"2c4d","resourceVersion":"4711"},"spec":{"nodeName":"edge-1","containers":[{"name":"c","image":"busybox"}]}}}"#;

    #[test]
    fn pod_insert_fixture_parses_and_reencodes_with_kubeedge_omission_rules() {
        let msg = parse(KUBEEDGE_POD_INSERT).unwrap();
        assert_eq!(msg.header.id, "4b5a3e7c-2f7a-4d0e-9d55-3b1f8a0c1e11");
        assert_eq!(msg.header.timestamp, 1_732_330_000_123);
        assert_eq!(msg.header.resource_version, "4711");
        assert_eq!(msg.route.operation, Operation::Insert);
        assert_eq!(msg.route.group, group::RESOURCE);
        let path = msg.edge_resource().unwrap();
        assert_eq!(path.namespace(), Some("default"));
        assert_eq!(path.resource_type(), Some("pod"));
        assert_eq!(path.name(), Some("web"));
        // Go omits the empty parent_msg_id; everything else is written back byte for byte.
        let expected = KUBEEDGE_POD_INSERT.replace(r#""parent_msg_id":"","#, "");
        assert_eq!(msg.to_json(), expected);
    }

    #[test]
    fn ack_response_fixture_round_trips_byte_for_byte() {
        let ack = r#"{"header":{"msg_id":"9d3c","parent_msg_id":"4b5a","timestamp":1732330000200},"route":{"source":"metaManager","group":"resource","operation":"response","resource":"default/pod/web"},"content":"OK"}"#;
        let msg = parse(ack).unwrap();
        assert!(msg.is_response());
        assert_eq!(msg.header.parent_id, "4b5a");
        assert_eq!(msg.content, json!("OK"));
        assert_eq!(msg.to_json(), ack);
    }

    #[test]
    fn keepalive_fixture_round_trips_and_matches_ours() {
        let ka = r#"{"header":{"msg_id":"k1","timestamp":1732330000300},"route":{"source":"websocket","group":"resource","operation":"keepalive","resource":"node"},"content":"ping"}"#;
        let msg = parse(ka).unwrap();
        assert_eq!(msg.to_json(), ka);
        let mut ours = Message::keepalive();
        ours.header.id = "k1".into();
        ours.header.timestamp = 1_732_330_000_300;
        assert_eq!(ours, msg);
    }

    #[test]
    fn response_builder_sets_parent_and_keeps_route() {
        let req = parse(KUBEEDGE_POD_INSERT).unwrap();
        let ack = req.response(module::META_MANAGER, json!("OK"));
        assert_eq!(ack.header.parent_id, req.header.id);
        assert_ne!(ack.header.id, req.header.id);
        assert_eq!(ack.route.operation, Operation::Response);
        assert_eq!(ack.route.resource, req.route.resource);
        let v: Value = serde_json::from_str(&ack.to_json()).unwrap();
        assert_eq!(v["route"]["operation"], "response");
        assert_eq!(v["header"]["parent_msg_id"], req.header.id.as_str());
    }

    #[test]
    fn field_names_are_stable() {
        let mut m = Message::new("s", "g", Operation::Update, "ns/pod/x", json!({"a": 1}));
        m.header.id = "id".into();
        m.header.parent_id = "p".into();
        m.header.timestamp = 7;
        m.header.resource_version = "9".into();
        m.header.sync = true;
        m.header.message_type = "t".into();
        m.route.destination = "d".into();
        assert_eq!(
            m.to_json(),
            r#"{"header":{"msg_id":"id","parent_msg_id":"p","timestamp":7,"resourceversion":"9","sync":true,"type":"t"},"route":{"source":"s","destination":"d","group":"g","operation":"update","resource":"ns/pod/x"},"content":{"a":1}}"#
        );
    }

    #[test]
    fn empty_route_and_null_content_are_written_as_go_does() {
        let m = parse(r#"{"header":{"msg_id":"a","timestamp":1}}"#).unwrap();
        assert_eq!(
            m.to_json(),
            r#"{"header":{"msg_id":"a","timestamp":1},"route":{},"content":null}"#
        );
    }

    #[test]
    fn unknown_operations_round_trip() {
        for op in ["insert", "keepalive", "upgrade", "approve", "Response"] {
            let o = Operation::from(op);
            assert_eq!(o.as_str(), op);
            let j = serde_json::to_string(&o).unwrap();
            let back: Operation = serde_json::from_str(&j).unwrap();
            assert_eq!(back, o);
        }
        assert_eq!(
            Operation::from("upgrade"),
            Operation::Other("upgrade".into())
        );
    }

    #[test]
    fn missing_header_is_a_typed_error() {
        let e = parse(r#"{"route":{},"content":"x"}"#).unwrap_err();
        assert!(
            matches!(&e, MessageError::Invalid { source, .. } if source.to_string().contains("missing field `header`")),
            "{e}"
        );
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e =
            parse(r#"{"header":{"msg_id":"a","timestamp":"yesterday"},"route":{}}"#).unwrap_err();
        match e {
            MessageError::Invalid { path, .. } => assert_eq!(path, "header.timestamp"),
            other => panic!("unexpected {other}"),
        }
        let e = parse(r#"{"header":{"msg_id":"a","timestamp":1},"route":{"operation":5}}"#)
            .unwrap_err();
        assert!(matches!(e, MessageError::Invalid { ref path, .. } if path == "route.operation"));
        let e = parse(r#"{"header":{"msg_id":7,"timestamp":1}}"#).unwrap_err();
        assert!(matches!(e, MessageError::Invalid { ref path, .. } if path == "header.msg_id"));
        let e = parse(r#"[1,2]"#).unwrap_err();
        assert!(matches!(e, MessageError::Invalid { .. }));
    }

    #[test]
    fn truncated_and_trailing_garbage_are_syntax_errors() {
        let full = KUBEEDGE_POD_INSERT;
        for cut in [1, 10, full.len() / 2, full.len() - 1] {
            let e = parse(&full[..cut]).unwrap_err();
            assert!(matches!(e, MessageError::Syntax(_)), "cut at {cut}: {e}");
        }
        let e = parse(&format!("{full} x")).unwrap_err();
        assert!(matches!(e, MessageError::Syntax(_)));
        assert!(matches!(parse(""), Err(MessageError::Syntax(_))));
    }

    #[test]
    fn oversized_is_refused_before_parsing() {
        let e = Message::from_slice(KUBEEDGE_POD_INSERT.as_bytes(), 16).unwrap_err();
        assert!(matches!(e, MessageError::TooLarge { limit: 16, .. }));
    }

    #[test]
    fn non_utf8_is_a_typed_error() {
        let mut bytes = br#"{"header":{"msg_id":"a","#.to_vec();
        bytes.extend_from_slice(&[0xff, 0xfe]);
        let e = Message::from_slice(&bytes, 1024).unwrap_err();
        assert!(
            matches!(e, MessageError::NotUtf8 { valid_up_to: 24 }),
            "{e}"
        );
    }

    #[test]
    fn empty_id_is_refused() {
        assert!(matches!(
            parse(r#"{"header":{"msg_id":"","timestamp":1}}"#),
            Err(MessageError::EmptyId)
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: xorshift bytes, and mutations of a valid message.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let base = KUBEEDGE_POD_INSERT.as_bytes();
        for _ in 0..5_000 {
            let len = (next() % 300) as usize;
            let random: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = Message::from_slice(&random, 1024);
            let mut mutated = base.to_vec();
            for _ in 0..3 {
                let i = (next() as usize) % mutated.len();
                mutated[i] = next() as u8;
            }
            if let Ok(m) = Message::from_slice(&mutated, DEFAULT_MAX_MESSAGE_BYTES) {
                let _ = m.edge_resource();
                let _ = m.to_json();
            }
        }
    }
}

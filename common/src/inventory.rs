//! The edge's inventory: what a node actually holds, sent at the start of every session.
//!
//! Only the edge knows for certain what it stored. The cloud learns it from acks, but an ack can
//! be lost with a cut link or with a cloudcore that dies before recording it, and then the cloud
//! either never deletes an object the edge still holds (an orphan, served and run forever) or
//! skips sending one it wrongly believes the edge has. So a kedge edge tells the cloud, on every
//! connect, every live object it holds — kind, namespace, name, UID, resourceVersion — and the
//! cloud sends exactly the difference.
//!
//! Negotiation keeps KubeEdge peers working unchanged: the edge offers an inventory with the
//! WebSocket request header [`HEADER`]; a cloud that understands it answers with the same header
//! in its handshake response and holds everything it would send until the inventory is in. The
//! edge sends the inventory only to a cloud that accepted, as the first messages of the session.
//!
//! Wire form (operation [`OPERATION`], group `resource`, resource [`RESOURCE`]), chunked so that
//! every message stays under the link's size limit:
//!
//! ```text
//! {"index": 0, "last": false, "objects": [["pod","default","web","<uid>","1234"], …]}
//! ```
//! A cluster-scoped object has the namespace `""`. An edge that cannot produce its inventory
//! (its database failed) sends one chunk with `"error"` set; the cloud then falls back to what it
//! learnt from acks for that session.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::message::{Message, Operation, group, module};

/// WebSocket handshake header: in the request, the edge offers an inventory; in the response, the
/// cloud accepts it.
pub const HEADER: &str = "kedge-inventory";

/// Upgrade header our edgecore always sends: this session speaks kedge's conversation (durable
/// reports with acks, pushed references). Without it the peer is taken for a KubeEdge edgecore,
/// which asks for what it needs and waits for replies.
pub const PROTOCOL_HEADER: &str = "kedge-protocol";
pub const PROTOCOL_VERSION: &str = "1";
/// The inventory format version carried in [`HEADER`].
pub const VERSION: &str = "1";
/// The message operation of an inventory chunk.
pub const OPERATION: &str = "inventory";
/// The message resource of an inventory chunk.
pub const RESOURCE: &str = "inventory";

/// One object the edge holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InventoryItem {
    /// The wire type: `pod`, `configmap`, `secret`, `node`, …
    pub kind: String,
    /// `None` for cluster-scoped objects.
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
}

/// Compact wire form of an item: a five-element array.
#[derive(Serialize, Deserialize)]
struct ItemWire(String, String, String, String, String);

impl Serialize for InventoryItem {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ItemWire(
            self.kind.clone(),
            self.namespace.clone().unwrap_or_default(),
            self.name.clone(),
            self.uid.clone(),
            self.resource_version.clone(),
        )
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for InventoryItem {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let ItemWire(kind, namespace, name, uid, resource_version) = ItemWire::deserialize(d)?;
        Ok(InventoryItem {
            kind,
            namespace: (!namespace.is_empty()).then_some(namespace),
            name,
            uid,
            resource_version,
        })
    }
}

/// One message's worth of the inventory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InventoryChunk {
    /// 0, 1, 2, … within one session.
    pub index: u32,
    /// The final chunk: the inventory is complete.
    pub last: bool,
    /// Set when the edge cannot tell what it holds; `objects` is then meaningless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub objects: Vec<InventoryItem>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InventoryError {
    #[error(
        "an inventory entry of {size} bytes ({kind} {name}) does not fit a {limit}-byte message"
    )]
    EntryTooLarge {
        kind: String,
        name: String,
        size: usize,
        limit: usize,
    },
    #[error("inventory chunk is malformed: {0}")]
    Malformed(String),
    #[error("inventory chunk {got} arrived where chunk {expected} was expected")]
    OutOfOrder { expected: u32, got: u32 },
    #[error("inventory holds more than {limit} objects")]
    TooMany { limit: usize },
}

/// Whether a message is an inventory chunk.
pub fn is_inventory(msg: &Message) -> bool {
    msg.route.operation.as_str() == OPERATION
}

fn chunk_message(chunk: &InventoryChunk) -> Message {
    Message::new(
        module::EDGE_HUB,
        group::RESOURCE,
        Operation::Other(OPERATION.to_owned()),
        RESOURCE,
        serde_json::to_value(chunk).unwrap_or(Value::Null),
    )
}

/// Splits `items` into inventory messages, each of which encodes to at most `max_bytes` of JSON.
/// An empty inventory is one (last) chunk.
pub fn to_messages(
    items: &[InventoryItem],
    max_bytes: usize,
) -> Result<Vec<Message>, InventoryError> {
    // The envelope of a chunk without objects, at the widest index and flag, bounds the rest.
    let empty = chunk_message(&InventoryChunk {
        index: u32::MAX,
        last: false,
        error: None,
        objects: Vec::new(),
    });
    let overhead = empty.to_json().len();
    let mut out = Vec::new();
    let mut current: Vec<InventoryItem> = Vec::new();
    let mut size = overhead;
    let mut index = 0u32;
    for item in items {
        let item_len = serde_json::to_string(item).map_or(0, |s| s.len()) + 1;
        if overhead + item_len > max_bytes {
            return Err(InventoryError::EntryTooLarge {
                kind: item.kind.clone(),
                name: item.name.clone(),
                size: item_len,
                limit: max_bytes,
            });
        }
        if size + item_len > max_bytes {
            out.push(chunk_message(&InventoryChunk {
                index,
                last: false,
                error: None,
                objects: std::mem::take(&mut current),
            }));
            index += 1;
            size = overhead;
        }
        size += item_len;
        current.push(item.clone());
    }
    out.push(chunk_message(&InventoryChunk {
        index,
        last: true,
        error: None,
        objects: current,
    }));
    Ok(out)
}

/// The single message an edge sends when it cannot produce its inventory.
pub fn unavailable(reason: &str) -> Message {
    chunk_message(&InventoryChunk {
        index: 0,
        last: true,
        error: Some(reason.to_owned()),
        objects: Vec::new(),
    })
}

/// Decodes a chunk's content.
pub fn decode(msg: &Message) -> Result<InventoryChunk, InventoryError> {
    serde_json::from_value(msg.content.clone())
        .map_err(|e| InventoryError::Malformed(e.to_string()))
}

/// What an assembled inventory says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inventory {
    /// Every live object the edge holds.
    Complete(Vec<InventoryItem>),
    /// The edge could not read its store; the reason it gave.
    Unavailable(String),
}

/// Collects the chunks of one session's inventory, in order, up to a number of objects (a peer
/// cannot make the cloud buffer without bound).
#[derive(Debug)]
pub struct Assembler {
    next: u32,
    items: Vec<InventoryItem>,
    limit: usize,
}

impl Assembler {
    pub fn new(limit: usize) -> Self {
        Assembler {
            next: 0,
            items: Vec::new(),
            limit,
        }
    }

    /// Adds a chunk; returns the inventory once the last chunk is in. A chunk out of order is an
    /// error (the connection is broken or the peer is; the session should end).
    pub fn push(&mut self, chunk: InventoryChunk) -> Result<Option<Inventory>, InventoryError> {
        if chunk.index != self.next {
            return Err(InventoryError::OutOfOrder {
                expected: self.next,
                got: chunk.index,
            });
        }
        if let Some(reason) = chunk.error {
            *self = Assembler::new(self.limit);
            return Ok(Some(Inventory::Unavailable(reason)));
        }
        if self.items.len() + chunk.objects.len() > self.limit {
            return Err(InventoryError::TooMany { limit: self.limit });
        }
        self.next += 1;
        self.items.extend(chunk.objects);
        if chunk.last {
            let items = std::mem::take(&mut self.items);
            *self = Assembler::new(self.limit);
            return Ok(Some(Inventory::Complete(items)));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: usize) -> InventoryItem {
        InventoryItem {
            kind: "pod".into(),
            namespace: Some("default".into()),
            name: format!("pod-{i}"),
            uid: format!("{i:08}-aaaa-bbbb-cccc-dddddddddddd"),
            resource_version: (1000 + i).to_string(),
        }
    }

    #[test]
    fn items_round_trip_compactly_and_cluster_scope_is_empty() {
        let node = InventoryItem {
            kind: "node".into(),
            namespace: None,
            name: "edge-1".into(),
            uid: "u".into(),
            resource_version: "7".into(),
        };
        let text = serde_json::to_string(&node).unwrap();
        assert_eq!(text, r#"["node","","edge-1","u","7"]"#);
        assert_eq!(serde_json::from_str::<InventoryItem>(&text).unwrap(), node);
    }

    #[test]
    fn chunks_stay_under_the_limit_and_reassemble_in_order() {
        let items: Vec<_> = (0..1000).map(item).collect();
        let limit = 8 * 1024;
        let msgs = to_messages(&items, limit).unwrap();
        assert!(msgs.len() > 5, "{} chunks", msgs.len());
        let mut asm = Assembler::new(1 << 20);
        let mut result = None;
        for (i, m) in msgs.iter().enumerate() {
            assert!(m.to_json().len() <= limit, "chunk {i} too large");
            assert!(is_inventory(m));
            let wire = Message::from_str_limited(&m.to_json(), limit).unwrap();
            let r = asm.push(decode(&wire).unwrap()).unwrap();
            assert_eq!(r.is_some(), i == msgs.len() - 1);
            result = r;
        }
        assert_eq!(result, Some(Inventory::Complete(items)));
    }

    #[test]
    fn empty_inventory_is_one_last_chunk() {
        let msgs = to_messages(&[], 1024).unwrap();
        assert_eq!(msgs.len(), 1);
        let c = decode(&msgs[0]).unwrap();
        assert!(c.last && c.objects.is_empty());
    }

    #[test]
    fn out_of_order_oversized_and_unavailable() {
        assert!(matches!(
            to_messages(&[item(1)], 200),
            Err(InventoryError::EntryTooLarge { .. })
        ));
        let msgs = to_messages(&(0..100).map(item).collect::<Vec<_>>(), 2048).unwrap();
        let mut asm = Assembler::new(1 << 20);
        assert_eq!(
            asm.push(decode(&msgs[1]).unwrap()),
            Err(InventoryError::OutOfOrder {
                expected: 0,
                got: 1
            })
        );
        let mut asm = Assembler::new(1 << 20);
        assert_eq!(
            asm.push(decode(&unavailable("disk gone")).unwrap()),
            Ok(Some(Inventory::Unavailable("disk gone".into())))
        );
        let mut small = Assembler::new(10);
        assert_eq!(
            small.push(decode(&msgs[0]).unwrap()),
            Err(InventoryError::TooMany { limit: 10 })
        );
        let bad = Message::new(
            "x",
            "resource",
            Operation::Other("inventory".into()),
            "inventory",
            serde_json::json!({"index": "zero"}),
        );
        assert!(matches!(decode(&bad), Err(InventoryError::Malformed(_))));
    }
}

//! The object store EdgeHub hands `resource` messages to. A message is acked only after
//! [`ObjectStore::apply`] returns `Ok`, i.e. after the store has it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use kedge_common::inventory::InventoryItem;
use kedge_common::{Message, Operation, ResourcePath};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("resource path: {0}")]
    Path(#[from] kedge_common::PathError),
    #[error("operation `{0}` is not something the store applies")]
    Unsupported(Operation),
    #[error("storage failed: {0}")]
    Storage(String),
}

/// What applying a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Stored,
    Deleted,
    /// The store already holds this or a newer version (duplicates and reordering are normal
    /// with at-least-once delivery); nothing changed, and the message is still acked.
    Stale,
}

/// An object as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredObject {
    pub resource_version: String,
    pub content: Value,
}

pub trait ObjectStore: Send + Sync + 'static {
    /// Applies an insert/update/patch/delete of the object at the message's edge resource path.
    ///
    /// The call itself fixes the order: messages are applied in the order `apply` is called,
    /// even when the returned futures are awaited concurrently (EdgeHub pipelines its acks).
    /// The future resolves once the result is durable.
    fn apply(
        &self,
        msg: &Message,
    ) -> impl Future<Output = Result<Applied, StoreError>> + Send + 'static + use<Self>;

    /// Every live object the store holds (tombstones excluded), for the cloud to diff against.
    ///
    /// Ordered after every `apply` called before it: a message applied earlier is in the
    /// inventory even if its commit was still in progress when this was called.
    fn inventory(
        &self,
    ) -> impl Future<Output = Result<Vec<InventoryItem>, StoreError>> + Send + 'static + use<Self>;
}

/// The inventory entry for a stored object at edge path `path`.
pub fn inventory_item(path: &str, object: &StoredObject) -> Result<InventoryItem, StoreError> {
    let p = ResourcePath::parse_edge(path)?;
    let (Some(kind), Some(name)) = (p.resource_type(), p.name()) else {
        return Err(StoreError::Storage(format!(
            "resource `{path}` does not name an object"
        )));
    };
    Ok(InventoryItem {
        kind: kind.to_owned(),
        namespace: p.namespace().map(str::to_owned),
        name: name.to_owned(),
        uid: object
            .content
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        resource_version: object.resource_version.clone(),
    })
}

/// The resourceVersion a message carries: the header's, else the object's own.
pub fn message_rv(msg: &Message) -> String {
    if !msg.header.resource_version.is_empty() {
        return msg.header.resource_version.clone();
    }
    msg.content
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// True when `candidate` is strictly newer than `stored` (numeric when both are numbers).
pub fn rv_newer(candidate: &str, stored: &str) -> bool {
    match (candidate.parse::<u64>(), stored.parse::<u64>()) {
        (Ok(a), Ok(b)) => a > b,
        _ => candidate != stored,
    }
}

/// Whether a message changes what the store holds: a newer version, or the same version
/// flipping between present and deleted (the cloud removes an object the node no longer needs at
/// the version the node holds, and may send that same version again when it is needed again).
pub fn supersedes(rv: &str, is_delete: bool, stored_rv: &str, stored_deleted: bool) -> bool {
    if rv.is_empty() || stored_rv.is_empty() {
        return true;
    }
    rv_newer(rv, stored_rv) || (rv == stored_rv && is_delete != stored_deleted)
}

/// In-memory store: correct semantics (newest version wins, deletes remembered as tombstones
/// so a late insert cannot resurrect an object) without durability.
#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug, Clone)]
enum Entry {
    Live(StoredObject),
    Deleted { resource_version: String },
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, path: &str) -> Option<StoredObject> {
        let objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        match objects.get(path) {
            Some(Entry::Live(o)) => Some(o.clone()),
            _ => None,
        }
    }

    /// All live objects by edge resource path.
    pub fn snapshot(&self) -> HashMap<String, StoredObject> {
        let objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        objects
            .iter()
            .filter_map(|(k, v)| match v {
                Entry::Live(o) => Some((k.clone(), o.clone())),
                Entry::Deleted { .. } => None,
            })
            .collect()
    }

    pub fn apply_now(&self, msg: &Message) -> Result<Applied, StoreError> {
        let path = ResourcePath::parse_edge(&msg.route.resource)?;
        let key = path.edge_str().to_owned();
        let rv = message_rv(msg);
        let mut objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        let stored = objects.get(&key).map(|e| match e {
            Entry::Live(o) => (o.resource_version.clone(), false),
            Entry::Deleted { resource_version } => (resource_version.clone(), true),
        });
        let is_delete = msg.route.operation == Operation::Delete;
        if let Some((stored_rv, stored_deleted)) = &stored
            && !supersedes(&rv, is_delete, stored_rv, *stored_deleted)
        {
            return Ok(Applied::Stale);
        }
        match msg.route.operation {
            Operation::Insert | Operation::Update | Operation::Patch => {
                objects.insert(
                    key,
                    Entry::Live(StoredObject {
                        resource_version: rv,
                        content: msg.content.clone(),
                    }),
                );
                Ok(Applied::Stored)
            }
            Operation::Delete => {
                objects.insert(
                    key,
                    Entry::Deleted {
                        resource_version: rv,
                    },
                );
                Ok(Applied::Deleted)
            }
            ref other => Err(StoreError::Unsupported(other.clone())),
        }
    }
}

impl ObjectStore for MemoryStore {
    fn apply(
        &self,
        msg: &Message,
    ) -> impl Future<Output = Result<Applied, StoreError>> + Send + 'static + use<> {
        std::future::ready(self.apply_now(msg))
    }

    fn inventory(
        &self,
    ) -> impl Future<Output = Result<Vec<InventoryItem>, StoreError>> + Send + 'static + use<> {
        let items = self
            .snapshot()
            .iter()
            .map(|(path, o)| inventory_item(path, o))
            .collect::<Result<Vec<_>, _>>();
        std::future::ready(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(op: Operation, rv: u64) -> Message {
        Message::new("cloud", "resource", op, "default/pod/web", json!({"v": rv}))
            .with_resource_version(rv.to_string())
    }

    #[tokio::test]
    async fn newest_version_wins_and_deletes_are_not_resurrected() {
        let s = MemoryStore::new();
        assert_eq!(
            s.apply(&m(Operation::Insert, 2)).await.unwrap(),
            Applied::Stored
        );
        assert_eq!(
            s.apply(&m(Operation::Update, 1)).await.unwrap(),
            Applied::Stale
        );
        assert_eq!(
            s.apply(&m(Operation::Update, 2)).await.unwrap(),
            Applied::Stale
        );
        assert_eq!(
            s.apply(&m(Operation::Update, 3)).await.unwrap(),
            Applied::Stored
        );
        assert_eq!(s.get("default/pod/web").unwrap().content, json!({"v": 3}));
        assert_eq!(
            s.apply(&m(Operation::Delete, 4)).await.unwrap(),
            Applied::Deleted
        );
        assert_eq!(
            s.apply(&m(Operation::Insert, 3)).await.unwrap(),
            Applied::Stale
        );
        assert!(s.get("default/pod/web").is_none());
        assert!(s.apply(&m(Operation::Query, 9)).await.is_err());
        // Removed at the version held, then needed again at that version.
        assert_eq!(
            s.apply(&m(Operation::Insert, 4)).await.unwrap(),
            Applied::Stored
        );
        assert_eq!(
            s.apply(&m(Operation::Insert, 4)).await.unwrap(),
            Applied::Stale
        );
    }
}

//! The durable upstream outbox: reports the edge produces (node status, pod status, twin
//! reports) wait here, latest state per object, until the cloud has acknowledged them. EdgeHub
//! drains it whenever the link is up. This is the part KubeEdge lacks: its reports made while
//! disconnected are lost. The in-memory implementation here keeps that promise for link outages;
//! the SQLite one (MetaManager issue) extends it across restarts.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use kedge_common::Message;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox storage failed: {0}")]
    Storage(String),
}

/// One pending report. `seq` orders entries; a newer report for the same key replaces the older
/// one and takes a new `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    pub key: String,
    pub seq: u64,
    pub message: Message,
}

pub trait Outbox: Send + Sync + 'static {
    /// Stores the latest report for `key`, replacing an older one; returns its sequence number.
    fn put(&self, key: &str, msg: Message)
    -> impl Future<Output = Result<u64, OutboxError>> + Send;
    /// Pending entries with `seq > after`, oldest first.
    fn pending_after(
        &self,
        after: u64,
    ) -> impl Future<Output = Result<Vec<OutboxEntry>, OutboxError>> + Send;
    /// Removes `key` if its entry is still `seq` (a newer report stays).
    fn remove(&self, key: &str, seq: u64) -> impl Future<Output = Result<(), OutboxError>> + Send;
    /// Changes whenever something is put; the value is the newest `seq`.
    fn subscribe(&self) -> watch::Receiver<u64>;
}

#[derive(Debug)]
pub struct MemoryOutbox {
    inner: Mutex<Inner>,
    latest: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    next_seq: u64,
    by_key: HashMap<String, u64>,
    by_seq: BTreeMap<u64, (String, Message)>,
}

impl Default for MemoryOutbox {
    fn default() -> Self {
        MemoryOutbox {
            inner: Mutex::new(Inner::default()),
            latest: watch::channel(0).0,
        }
    }
}

impl MemoryOutbox {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_seq
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Outbox for MemoryOutbox {
    async fn put(&self, key: &str, msg: Message) -> Result<u64, OutboxError> {
        let seq = {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            inner.next_seq += 1;
            let seq = inner.next_seq;
            if let Some(old) = inner.by_key.insert(key.to_owned(), seq) {
                inner.by_seq.remove(&old);
            }
            inner.by_seq.insert(seq, (key.to_owned(), msg));
            seq
        };
        self.latest.send_replace(seq);
        Ok(seq)
    }

    async fn pending_after(&self, after: u64) -> Result<Vec<OutboxEntry>, OutboxError> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(inner
            .by_seq
            .range(after.saturating_add(1)..)
            .map(|(seq, (key, message))| OutboxEntry {
                key: key.clone(),
                seq: *seq,
                message: message.clone(),
            })
            .collect())
    }

    async fn remove(&self, key: &str, seq: u64) -> Result<(), OutboxError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.by_key.get(key) == Some(&seq) {
            inner.by_key.remove(key);
            inner.by_seq.remove(&seq);
        }
        Ok(())
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(v: u64) -> Message {
        Message::new(
            "edged",
            "resource",
            kedge_common::Operation::Update,
            "default/podstatus/web",
            json!({"v": v}),
        )
    }

    #[tokio::test]
    async fn latest_per_key_in_order_and_remove_only_matching_seq() {
        let o = MemoryOutbox::new();
        let a1 = o.put("a", report(1)).await.unwrap();
        let _b = o.put("b", report(1)).await.unwrap();
        let a2 = o.put("a", report(2)).await.unwrap();
        let keys: Vec<_> = o
            .pending_after(0)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.key, e.message.content))
            .collect();
        assert_eq!(
            keys,
            [("b".into(), json!({"v": 1})), ("a".into(), json!({"v": 2}))]
        );
        o.remove("a", a1).await.unwrap();
        assert_eq!(o.len(), 2, "stale ack does not remove the newer report");
        o.remove("a", a2).await.unwrap();
        assert_eq!(o.len(), 1);
        assert_eq!(*o.subscribe().borrow(), a2);
    }
}

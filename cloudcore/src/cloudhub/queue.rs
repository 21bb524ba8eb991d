//! The per-node send queue. It outlives sessions: a node that reconnects (or a session that is
//! replaced) picks up exactly where the last one stopped.
//!
//! - Objects that need an ack are keyed by [`ObjectKey`]; only the newest version of an object is
//!   pending, and a version older than (or equal to) the last acknowledged one is never sent.
//! - A sent message stays in flight until the edge acks it (`response` with `parent_msg_id`);
//!   unacked messages are re-sent with exponential backoff, and all of them at once when a new
//!   session starts.
//! - Memory is bounded: at most `max_objects` keyed objects and `max_unkeyed` unkeyed messages
//!   per node. Beyond that [`NodeQueue::push`] refuses with [`QueueError::Full`] and the caller
//!   (the controllers) must retry later; nothing already queued is dropped. A keyed entry is
//!   forgotten once a delete of it is acked, so churn does not grow the queue.
//!
//! - A session whose edge sends an inventory starts [`Hold::AwaitingInventory`]: nothing keyed
//!   is sent until [`NodeQueue::apply_inventory`] has replaced what the queue believed about the
//!   node with what the node says it holds, so nothing the node already has is sent again.
//!
//! Time is passed in, so the logic is tested without sleeping.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use kedge_common::backoff::Backoff;
use kedge_common::{Message, Operation};

/// Identity of an object on a node: kind, namespace, name and UID (a re-created object with a new
/// UID is a different object).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
}

#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_objects: usize,
    pub max_unkeyed: usize,
    /// Messages sent but not yet acked; beyond this the queue waits for acks.
    pub max_in_flight: usize,
    pub ack_timeout: Duration,
    pub max_retry_interval: Duration,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            max_objects: 100_000,
            max_unkeyed: 1_000,
            max_in_flight: 512,
            ack_timeout: Duration::from_secs(5),
            max_retry_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("send queue for node {node} is full ({limit} {what})")]
    Full {
        node: String,
        limit: usize,
        what: &'static str,
    },
}

/// What happened to a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued (replacing an older pending version, if any).
    Queued,
    /// Dropped: the node already acked this or a newer version, or a newer one is queued.
    Stale,
    /// Not queued: the node is not connected to this cloudcore (it may be to another replica).
    /// What it must hold reaches it when it connects here (see `edgecontroller::resync`).
    NotHere,
}

/// An ack matched to what it acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    pub key: ObjectKey,
    pub resource_version: String,
    pub operation: Operation,
}

#[derive(Debug, Default)]
struct Entry {
    pending: Option<Message>,
    /// msg_id of the version in flight.
    in_flight: Option<String>,
    /// resourceVersion of the version in flight, and whether it is a delete.
    in_flight_rv: Option<(String, bool)>,
    /// The last version the node acknowledged (never a delete: acked deletes are forgotten).
    last_acked_rv: Option<String>,
}

#[derive(Debug)]
struct InFlight {
    key: ObjectKey,
    message: Message,
    due: Instant,
    backoff: Backoff,
    /// Send order, so messages taken back out of flight keep their order.
    sent_seq: u64,
}

/// Whether keyed messages may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Entered when a session starts that offered no inventory (or when an inventory was
    /// applied); left only when a session that offers one starts.
    Sending,
    /// Entered when a session starts whose edge will send its inventory: only unkeyed messages
    /// (report acks) go out, because what the queue believes the node holds may be wrong. Left
    /// by [`NodeQueue::apply_inventory`] or [`NodeQueue::release`].
    AwaitingInventory,
}

/// What [`NodeQueue::apply_inventory`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InventoryApplied {
    /// Pending or in-flight versions dropped because the node already holds them (or newer).
    pub already_held: usize,
    /// Versions that will be (re)sent because the node lacks them.
    pub to_send: usize,
    /// Objects the queue believed acked that the node does not hold.
    pub missing: usize,
}

/// Compares Kubernetes resourceVersions. They are opaque strings, but every API server in
/// practice uses integers (KubeEdge compares them as such); non-numeric ones count as newer when
/// they differ, so an update is never held back.
pub fn rv_is_newer(candidate: &str, than: &str) -> bool {
    match (candidate.parse::<u64>(), than.parse::<u64>()) {
        (Ok(a), Ok(b)) => a > b,
        _ => candidate != than,
    }
}

/// Whether a message supersedes a known state of the same object: a newer resourceVersion, or
/// the same version flipping between present and deleted (the cloud removes an object a node no
/// longer needs at the version it holds, and may send that version again later).
pub fn supersedes(rv: &str, is_delete: bool, known_rv: &str, known_delete: bool) -> bool {
    if rv.is_empty() || known_rv.is_empty() {
        return true;
    }
    rv_is_newer(rv, known_rv) || (rv == known_rv && is_delete != known_delete)
}

/// One step of a pod's way to its node, for `RUST_LOG=pod_path=debug` (README: "Reading one
/// pod's latency").
pub(crate) fn pod_path(node: &str, key: &ObjectKey, rv: &str, step: &'static str) {
    tracing::debug!(target: "pod_path", %node, pod = %format_args!("{}/{}", key.namespace.as_deref().unwrap_or_default(), key.name), uid = %key.uid, %rv, "{step}");
}

#[derive(Debug)]
pub struct NodeQueue {
    node: String,
    limits: QueueLimits,
    entries: HashMap<ObjectKey, Entry>,
    /// Keys with a pending version, in the order they became pending.
    order: VecDeque<ObjectKey>,
    unkeyed: VecDeque<Message>,
    in_flight: HashMap<String, InFlight>,
    /// `(due, msg_id)` of everything in flight, so finding due retries is not a scan.
    due: BTreeSet<(Instant, String)>,
    hold: Hold,
    sent_seq: u64,
}

impl NodeQueue {
    pub fn new(node: impl Into<String>, limits: QueueLimits) -> Self {
        NodeQueue {
            node: node.into(),
            limits,
            entries: HashMap::new(),
            order: VecDeque::new(),
            unkeyed: VecDeque::new(),
            in_flight: HashMap::new(),
            due: BTreeSet::new(),
            hold: Hold::Sending,
            sent_seq: 0,
        }
    }

    /// Queues `msg`. With a key it needs an ack and coalesces with older versions of that object;
    /// without a key it is sent once, in order.
    pub fn push(&mut self, key: Option<ObjectKey>, msg: Message) -> Result<Pushed, QueueError> {
        let Some(key) = key else {
            if self.unkeyed.len() >= self.limits.max_unkeyed {
                return Err(QueueError::Full {
                    node: self.node.clone(),
                    limit: self.limits.max_unkeyed,
                    what: "unkeyed messages",
                });
            }
            self.unkeyed.push_back(msg);
            return Ok(Pushed::Queued);
        };
        if !self.entries.contains_key(&key) && self.entries.len() >= self.limits.max_objects {
            return Err(QueueError::Full {
                node: self.node.clone(),
                limit: self.limits.max_objects,
                what: "objects",
            });
        }
        let rv = msg.header.resource_version.clone();
        let is_delete = msg.route.operation == Operation::Delete;
        let entry = self.entries.entry(key.clone()).or_default();
        let beats = |known: Option<(String, bool)>| match known {
            Some((krv, kdel)) => supersedes(&rv, is_delete, &krv, kdel),
            None => true,
        };
        let pending = entry.pending.as_ref().map(|m| {
            (
                m.header.resource_version.clone(),
                m.route.operation == Operation::Delete,
            )
        });
        // A delete not yet acknowledged (a ConfigMap released because no pod on the node needs
        // it) is about to remove the acknowledged version: an upsert at that same version (the
        // ConfigMap needed again) must then be sent, not dropped as already held.
        let delete_unacked = entry.in_flight_rv.as_ref().is_some_and(|(_, d)| *d)
            || pending.as_ref().is_some_and(|(_, d)| *d);
        let acked = entry
            .last_acked_rv
            .clone()
            .filter(|_| is_delete || !delete_unacked)
            .map(|r| (r, false));
        if !beats(acked) || !beats(entry.in_flight_rv.clone()) || !beats(pending) {
            return Ok(Pushed::Stale);
        }
        let was_pending = entry.pending.replace(msg).is_some();
        if !was_pending {
            self.order.push_back(key);
        }
        Ok(Pushed::Queued)
    }

    /// A new session started: everything in flight falls due at once (it may never have reached
    /// the edge), oldest retry first — or, when the edge will send its inventory, nothing keyed is
    /// sent until it has been applied.
    pub fn session_started(&mut self, now: Instant, expects_inventory: bool) {
        self.hold = if expects_inventory {
            Hold::AwaitingInventory
        } else {
            Hold::Sending
        };
        self.due.clear();
        for (id, f) in self.in_flight.iter_mut() {
            f.due = now;
            f.backoff.reset();
            self.due.insert((now, id.clone()));
        }
    }

    /// Moves an in-flight message to a new due time.
    fn reschedule(&mut self, id: &str, now: Instant) -> Option<&InFlight> {
        let f = self.in_flight.get_mut(id)?;
        self.due.remove(&(f.due, id.to_owned()));
        f.due = now + f.backoff.next_plain();
        self.due.insert((f.due, id.to_owned()));
        Some(f)
    }

    /// Takes a message out of flight.
    fn take_in_flight(&mut self, id: &str) -> Option<InFlight> {
        let f = self.in_flight.remove(id)?;
        self.due.remove(&(f.due, id.to_owned()));
        Some(f)
    }

    pub fn hold(&self) -> Hold {
        self.hold
    }

    /// Reorders what waits to be sent so that references go before the objects that use them:
    /// pod deletes first, then ConfigMaps, Secrets, the Node and device models, then devices and
    /// pods (stable otherwise). The controllers call it after they queued what an inventory said
    /// the node lacks: an update queued while the node was away must not reach it before the
    /// ConfigMap its pod mounts.
    pub fn order_references_first(&mut self) {
        let rank = |key: &ObjectKey, entries: &HashMap<ObjectKey, Entry>| {
            let delete = entries
                .get(key)
                .and_then(|e| e.pending.as_ref())
                .is_some_and(|m| m.route.operation == Operation::Delete);
            match (delete, key.kind.as_str()) {
                (true, "pod") => 0,
                (true, _) => 4,
                (false, "pod" | "device") => 2,
                (false, _) => 1,
            }
        };
        let entries = &self.entries;
        let mut order: Vec<ObjectKey> = self.order.drain(..).collect();
        order.sort_by_key(|k| rank(k, entries));
        self.order = order.into();
    }

    /// Sends again without an inventory (the edge could not produce one): the queue keeps what
    /// it learnt from acks.
    pub fn release(&mut self) {
        self.hold = Hold::Sending;
    }

    /// Replaces what the queue believes the node holds with what it says it holds (`held`: key →
    /// resourceVersion of every live object) and resumes sending:
    /// - every object's last acked version becomes the held one (or none);
    /// - pending and in-flight versions the node already holds (or holds newer) are dropped,
    ///   the rest are sent (again), in their original order;
    /// - objects the node holds that the queue never heard of are remembered as acked, so the
    ///   controllers can decide to delete them (see `edgecontroller`).
    pub fn apply_inventory(&mut self, held: &HashMap<ObjectKey, String>) -> InventoryApplied {
        let mut result = InventoryApplied::default();
        // Everything in flight was sent on an earlier session: take it back, oldest first.
        let mut taken: Vec<InFlight> = self.in_flight.drain().map(|(_, f)| f).collect();
        self.due.clear();
        taken.sort_by_key(|f| f.sent_seq);
        let mut requeued = Vec::new();
        for f in taken {
            let Some(entry) = self.entries.get_mut(&f.key) else {
                continue;
            };
            entry.in_flight = None;
            entry.in_flight_rv = None;
            // A pending version is newer than the one in flight (push guarantees it).
            if entry.pending.is_none() {
                entry.pending = Some(f.message);
                requeued.push(f.key);
            }
        }
        let mut remove = Vec::new();
        for (key, entry) in self.entries.iter_mut() {
            let held_rv = held.get(key);
            if entry.last_acked_rv.is_some() && held_rv.is_none() {
                result.missing += 1;
            }
            entry.last_acked_rv = held_rv.cloned();
            if let Some(m) = &entry.pending {
                let rv = &m.header.resource_version;
                let is_delete = m.route.operation == Operation::Delete;
                let needed = match held_rv {
                    Some(h) => supersedes(rv, is_delete, h, false),
                    // Deleting what the node does not hold changes nothing.
                    None => !is_delete,
                };
                if needed {
                    result.to_send += 1;
                } else {
                    entry.pending = None;
                    result.already_held += 1;
                }
            }
            if entry.pending.is_none() && entry.last_acked_rv.is_none() {
                remove.push(key.clone());
            }
        }
        for key in remove {
            self.entries.remove(&key);
        }
        for (key, rv) in held {
            self.entries.entry(key.clone()).or_insert_with(|| Entry {
                last_acked_rv: Some(rv.clone()),
                ..Entry::default()
            });
        }
        // Taken-back messages first (they were sent before anything now pending), then the rest
        // in the order they became pending; each key once, only if still pending.
        let mut seen = HashSet::new();
        let order: VecDeque<ObjectKey> = requeued
            .into_iter()
            .chain(std::mem::take(&mut self.order))
            .filter(|k| {
                self.entries.get(k).is_some_and(|e| e.pending.is_some()) && seen.insert(k.clone())
            })
            .collect();
        self.order = order;
        self.hold = Hold::Sending;
        result
    }

    /// The next message to write to the session, if any is due now.
    pub fn next_to_send(&mut self, now: Instant) -> Option<Message> {
        if self.hold == Hold::AwaitingInventory {
            // Only unkeyed messages (report acks) until the inventory is applied.
            return self.unkeyed.pop_front();
        }
        // 1. Retries that are due (keeping their msg_id, so a late ack still matches).
        if let Some((when, id)) = self.due.first().cloned()
            && when <= now
        {
            return self.reschedule(&id, now).map(|f| f.message.clone());
        }
        // 2. Unkeyed messages, in order.
        if let Some(m) = self.unkeyed.pop_front() {
            return Some(m);
        }
        // 3. Pending object versions, if the in-flight window has room.
        if self.in_flight.len() >= self.limits.max_in_flight {
            return None;
        }
        while let Some(key) = self.order.pop_front() {
            let Some(entry) = self.entries.get_mut(&key) else {
                continue;
            };
            let Some(msg) = entry.pending.take() else {
                continue;
            };
            // A newer version supersedes the one in flight; a late ack of the old one is ignored.
            let superseded = entry.in_flight.take();
            entry.in_flight = Some(msg.header.id.clone());
            entry.in_flight_rv = Some((
                msg.header.resource_version.clone(),
                msg.route.operation == Operation::Delete,
            ));
            if let Some(old) = superseded {
                self.take_in_flight(&old);
            }
            let mut backoff = Backoff::new(self.limits.ack_timeout, self.limits.max_retry_interval);
            let due = now + backoff.next_plain();
            self.due.insert((due, msg.header.id.clone()));
            self.sent_seq += 1;
            if key.kind == "pod" {
                pod_path(
                    &self.node,
                    &key,
                    &msg.header.resource_version,
                    "2 sent to the node",
                );
            }
            self.in_flight.insert(
                msg.header.id.clone(),
                InFlight {
                    key,
                    message: msg.clone(),
                    due,
                    backoff,
                    sent_seq: self.sent_seq,
                },
            );
            return Some(msg);
        }
        None
    }

    /// Records an ack for `parent_id`. Returns what was acknowledged, or `None` for an unknown or
    /// superseded message id.
    pub fn ack(&mut self, parent_id: &str) -> Option<Acked> {
        let f = self.take_in_flight(parent_id)?;
        let rv = f.message.header.resource_version.clone();
        let operation = f.message.route.operation.clone();
        if let Some(entry) = self.entries.get_mut(&f.key) {
            if entry.in_flight.as_deref() == Some(parent_id) {
                entry.in_flight = None;
                entry.in_flight_rv = None;
            }
            if operation == Operation::Delete {
                // The node holds nothing now.
                entry.last_acked_rv = None;
            } else {
                let newer = match &entry.last_acked_rv {
                    Some(old) => rv.is_empty() || rv_is_newer(&rv, old),
                    None => true,
                };
                if newer {
                    entry.last_acked_rv = Some(rv.clone());
                }
            }
            if operation == Operation::Delete
                && entry.pending.is_none()
                && entry.in_flight.is_none()
            {
                self.entries.remove(&f.key);
            }
        }
        Some(Acked {
            key: f.key,
            resource_version: rv,
            operation,
        })
    }

    /// The edge refused a message (`error` response): retry it later with backoff.
    pub fn nack(&mut self, parent_id: &str, now: Instant) {
        self.reschedule(parent_id, now);
    }

    /// When the next retry falls due, if anything is in flight (and may be sent).
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.hold == Hold::AwaitingInventory {
            return None;
        }
        self.due.first().map(|(when, _)| *when)
    }

    /// Messages waiting to be sent or acked.
    pub fn outstanding(&self) -> usize {
        self.unkeyed.len()
            + self.in_flight.len()
            + self
                .entries
                .values()
                .filter(|e| e.pending.is_some())
                .count()
    }

    /// Test set-up: the queue believes the node holds `key` at `rv`, so pushing that version
    /// again is [`Pushed::Stale`]. (Sessions learn this from inventories and ack records.)
    #[cfg(test)]
    pub fn seed_acked(&mut self, key: ObjectKey, rv: String) {
        let entry = self.entries.entry(key).or_default();
        let newer = entry
            .last_acked_rv
            .as_ref()
            .is_none_or(|old| rv_is_newer(&rv, old));
        if newer {
            entry.last_acked_rv = Some(rv);
        }
    }

    pub fn last_acked(&self, key: &ObjectKey) -> Option<&str> {
        self.entries
            .get(key)
            .and_then(|e| e.last_acked_rv.as_deref())
    }

    /// Number of objects tracked (pending, in flight or remembered as acked).
    pub fn tracked_objects(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            kind: "pod".into(),
            namespace: Some("default".into()),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    fn msg(name: &str, rv: u64) -> Message {
        Message::new(
            "edgecontroller",
            "resource",
            Operation::Update,
            format!("default/pod/{name}"),
            json!({"rv": rv}),
        )
        .with_resource_version(rv.to_string())
    }

    fn limits() -> QueueLimits {
        QueueLimits {
            max_objects: 3,
            max_unkeyed: 2,
            max_in_flight: 2,
            ack_timeout: Duration::from_secs(5),
            max_retry_interval: Duration::from_secs(20),
        }
    }

    #[test]
    fn only_the_newest_pending_version_is_sent() {
        let mut q = NodeQueue::new("n1", limits());
        let t = Instant::now();
        q.push(Some(key("a")), msg("a", 1)).unwrap();
        q.push(Some(key("a")), msg("a", 3)).unwrap();
        assert_eq!(q.push(Some(key("a")), msg("a", 2)).unwrap(), Pushed::Stale);
        let sent = q.next_to_send(t).unwrap();
        assert_eq!(sent.header.resource_version, "3");
        assert!(q.next_to_send(t).is_none());
    }

    #[test]
    fn acked_or_older_versions_are_never_sent_again() {
        let mut q = NodeQueue::new("n1", limits());
        let t = Instant::now();
        q.push(Some(key("a")), msg("a", 5)).unwrap();
        let sent = q.next_to_send(t).unwrap();
        let acked = q.ack(&sent.header.id).unwrap();
        assert_eq!(acked.resource_version, "5");
        assert_eq!(q.last_acked(&key("a")), Some("5"));
        assert_eq!(q.push(Some(key("a")), msg("a", 4)).unwrap(), Pushed::Stale);
        assert_eq!(q.push(Some(key("a")), msg("a", 5)).unwrap(), Pushed::Stale);
        assert_eq!(q.push(Some(key("a")), msg("a", 6)).unwrap(), Pushed::Queued);
    }

    #[test]
    fn unacked_messages_are_retried_with_backoff_and_on_new_session() {
        let mut q = NodeQueue::new("n1", limits());
        let t0 = Instant::now();
        q.push(Some(key("a")), msg("a", 1)).unwrap();
        let first = q.next_to_send(t0).unwrap();
        assert!(q.next_to_send(t0 + Duration::from_secs(4)).is_none());
        let retry = q.next_to_send(t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(retry.header.id, first.header.id, "retries keep the msg_id");
        // Next retry 10 s later.
        assert!(q.next_to_send(t0 + Duration::from_secs(14)).is_none());
        assert!(q.next_to_send(t0 + Duration::from_secs(15)).is_some());
        // A new session re-sends immediately.
        q.session_started(t0 + Duration::from_secs(16), false);
        assert!(q.next_to_send(t0 + Duration::from_secs(16)).is_some());
        assert!(q.ack(&first.header.id).is_some());
        assert_eq!(q.next_deadline(), None);
    }

    #[test]
    fn newer_version_supersedes_the_one_in_flight() {
        let mut q = NodeQueue::new("n1", limits());
        let t = Instant::now();
        q.push(Some(key("a")), msg("a", 1)).unwrap();
        let old = q.next_to_send(t).unwrap();
        q.push(Some(key("a")), msg("a", 2)).unwrap();
        let new = q.next_to_send(t).unwrap();
        assert_eq!(new.header.resource_version, "2");
        assert!(q.ack(&old.header.id).is_none(), "superseded ack ignored");
        assert_eq!(q.ack(&new.header.id).unwrap().resource_version, "2");
    }

    #[test]
    fn an_object_released_and_needed_again_before_the_delete_is_acked_is_sent_again() {
        let t = Instant::now();
        // The delete still pending, or already in flight: either way the node must end up
        // holding version 1.
        for delete_sent in [false, true] {
            let mut q = NodeQueue::new("n1", limits());
            q.push(Some(key("cm")), msg("cm", 1)).unwrap();
            let first = q.next_to_send(t).unwrap();
            q.ack(&first.header.id).unwrap();
            q.push(Some(key("cm")), del("cm", 1)).unwrap();
            if delete_sent {
                let d = q.next_to_send(t).unwrap();
                assert_eq!(d.route.operation, Operation::Delete);
            }
            assert_eq!(
                q.push(Some(key("cm")), msg("cm", 1)).unwrap(),
                Pushed::Queued,
                "delete sent: {delete_sent}"
            );
            let last = std::iter::from_fn(|| q.next_to_send(t)).last().unwrap();
            assert_eq!(last.route.operation, Operation::Update);
            assert_eq!(last.header.resource_version, "1");
        }
        // Without a delete in the way, the held version is not sent again.
        let mut q = NodeQueue::new("n1", limits());
        q.push(Some(key("cm")), msg("cm", 1)).unwrap();
        let first = q.next_to_send(t).unwrap();
        q.ack(&first.header.id).unwrap();
        assert_eq!(
            q.push(Some(key("cm")), msg("cm", 1)).unwrap(),
            Pushed::Stale
        );
    }

    #[test]
    fn in_flight_window_and_limits() {
        let mut q = NodeQueue::new("n1", limits());
        let t = Instant::now();
        for n in ["a", "b", "c"] {
            q.push(Some(key(n)), msg(n, 1)).unwrap();
        }
        assert!(matches!(
            q.push(Some(key("d")), msg("d", 1)),
            Err(QueueError::Full {
                what: "objects",
                ..
            })
        ));
        let a = q.next_to_send(t).unwrap();
        let _b = q.next_to_send(t).unwrap();
        assert!(q.next_to_send(t).is_none(), "window of 2 is full");
        q.ack(&a.header.id);
        assert_eq!(q.next_to_send(t).unwrap().route.resource, "default/pod/c");
        q.push(None, msg("x", 0)).unwrap();
        q.push(None, msg("y", 0)).unwrap();
        assert!(matches!(
            q.push(None, msg("z", 0)),
            Err(QueueError::Full {
                what: "unkeyed messages",
                ..
            })
        ));
    }

    #[test]
    fn acked_deletes_are_forgotten() {
        let mut q = NodeQueue::new("n1", limits());
        let t = Instant::now();
        let mut del = msg("a", 9);
        del.route.operation = Operation::Delete;
        q.push(Some(key("a")), del).unwrap();
        let sent = q.next_to_send(t).unwrap();
        assert_eq!(q.tracked_objects(), 1);
        let acked = q.ack(&sent.header.id).unwrap();
        assert_eq!(acked.operation, Operation::Delete);
        assert_eq!(q.tracked_objects(), 0);
    }

    #[test]
    fn the_same_version_may_flip_between_present_and_deleted() {
        let mut q = NodeQueue::new("n1", limits());
        let t = Instant::now();
        q.push(Some(key("a")), msg("a", 5)).unwrap();
        let sent = q.next_to_send(t).unwrap();
        q.ack(&sent.header.id);
        let mut del = msg("a", 5);
        del.route.operation = Operation::Delete;
        assert_eq!(q.push(Some(key("a")), del.clone()).unwrap(), Pushed::Queued);
        assert_eq!(q.push(Some(key("a")), del).unwrap(), Pushed::Stale);
        let sent = q.next_to_send(t).unwrap();
        q.ack(&sent.header.id);
        // Needed again at the same version: sent again.
        assert_eq!(q.push(Some(key("a")), msg("a", 5)).unwrap(), Pushed::Queued);
    }

    fn del(name: &str, rv: u64) -> Message {
        let mut m = msg(name, rv);
        m.route.operation = Operation::Delete;
        m
    }

    #[test]
    fn nothing_keyed_is_sent_until_the_inventory_is_applied() {
        let mut q = NodeQueue::new("n1", limits());
        let t = Instant::now();
        q.session_started(t, true);
        q.push(Some(key("a")), msg("a", 1)).unwrap();
        q.push(None, msg("ack", 0)).unwrap();
        assert_eq!(q.next_to_send(t).unwrap().route.resource, "default/pod/ack");
        assert!(q.next_to_send(t).is_none(), "keyed messages wait");
        assert_eq!(q.next_deadline(), None);
        // The node already holds a@1: nothing to send.
        let held = HashMap::from([(key("a"), "1".to_owned())]);
        let r = q.apply_inventory(&held);
        assert_eq!(r.already_held, 1);
        assert_eq!(q.hold(), Hold::Sending);
        assert!(q.next_to_send(t).is_none());
        assert_eq!(q.last_acked(&key("a")), Some("1"));
    }

    #[test]
    fn the_inventory_replaces_what_acks_said() {
        let limits = QueueLimits {
            max_objects: 100,
            max_in_flight: 100,
            ..limits()
        };
        let mut q = NodeQueue::new("n1", limits);
        let t = Instant::now();
        // a: believed acked at 5 (an ack recorded before a crash), but the node lost it.
        q.seed_acked(key("a"), "5".into());
        // b, c: in flight when the link broke; the node stored b, not c.
        q.push(Some(key("b")), msg("b", 3)).unwrap();
        q.push(Some(key("c")), msg("c", 4)).unwrap();
        // d: a delete of something the node does not hold.
        q.push(Some(key("d")), del("d", 9)).unwrap();
        let b = q.next_to_send(t).unwrap();
        let c = q.next_to_send(t).unwrap();
        let _d = q.next_to_send(t).unwrap();
        q.session_started(t, true);
        // e: held by the node, never heard of here. f: held older than pending.
        q.push(Some(key("f")), msg("f", 8)).unwrap();
        let held = HashMap::from([
            (key("b"), "3".to_owned()),
            (key("e"), "7".to_owned()),
            (key("f"), "2".to_owned()),
        ]);
        let r = q.apply_inventory(&held);
        assert_eq!(
            r,
            InventoryApplied {
                already_held: 2,
                to_send: 2,
                missing: 1
            }
        );
        let sent: Vec<String> = std::iter::from_fn(|| q.next_to_send(t))
            .map(|m| format!("{} {}", m.route.resource, m.header.resource_version))
            .collect();
        assert_eq!(
            sent,
            ["default/pod/c 4", "default/pod/f 8"],
            "c re-sent first, then f"
        );
        assert!(q.ack(&b.header.id).is_none(), "b was taken out of flight");
        assert!(q.ack(&c.header.id).is_some(), "c keeps its msg_id");
        // a is missing at the node: sending it again is no longer stale.
        assert_eq!(q.push(Some(key("a")), msg("a", 5)).unwrap(), Pushed::Queued);
        // e is known as held, so a delete of it at the held version goes out, once.
        assert_eq!(q.push(Some(key("e")), del("e", 7)).unwrap(), Pushed::Queued);
        assert_eq!(q.push(Some(key("e")), del("e", 7)).unwrap(), Pushed::Stale);
        assert_eq!(q.push(Some(key("b")), msg("b", 3)).unwrap(), Pushed::Stale);
    }

    #[test]
    fn references_go_before_the_pods_that_use_them() {
        let limits = QueueLimits {
            max_in_flight: 100,
            ..limits()
        };
        let mut q = NodeQueue::new("n1", limits);
        let t = Instant::now();
        let cm = ObjectKey {
            kind: "configmap".into(),
            ..key("cfg")
        };
        // A pod update queued while the node was away, then its ConfigMap and a deleted pod.
        q.push(Some(key("web")), msg("web", 21)).unwrap();
        q.push(Some(cm.clone()), msg("cfg", 19)).unwrap();
        q.push(Some(key("old")), del("old", 22)).unwrap();
        q.order_references_first();
        let sent: Vec<String> = std::iter::from_fn(|| q.next_to_send(t))
            .map(|m| m.header.resource_version)
            .collect();
        assert_eq!(
            sent,
            ["22", "19", "21"],
            "pod delete, ConfigMap, then the pod"
        );
    }

    #[test]
    fn release_without_inventory_keeps_what_acks_said() {
        let mut q = NodeQueue::new("n1", limits());
        let t = Instant::now();
        q.push(Some(key("a")), msg("a", 1)).unwrap();
        q.session_started(t, true);
        assert!(q.next_to_send(t).is_none());
        q.release();
        assert_eq!(q.next_to_send(t).unwrap().header.resource_version, "1");
    }

    #[test]
    fn rv_comparison() {
        assert!(rv_is_newer("10", "9"));
        assert!(!rv_is_newer("9", "10"));
        assert!(!rv_is_newer("9", "9"));
        assert!(rv_is_newer("abc", "abd"));
        assert!(!rv_is_newer("abc", "abc"));
    }
}

//! MetaManager's SQLite database: every object the node holds, the durable upstream outbox, and
//! a change feed.
//!
//! - One file (WAL mode, `synchronous = FULL`): a message is acked only after the transaction
//!   holding it has committed, so an acked object survives `kill -9` and power loss.
//! - Writes go through one writer task that commits whatever has queued up in one transaction
//!   (group commit), so throughput does not collapse to one fsync per message. The order of
//!   application is the order of [`ObjectStore::apply`] calls.
//! - An update older than what is stored is ignored (duplicates and reordering are normal with
//!   at-least-once delivery); deletes leave tombstones so late messages cannot resurrect objects.
//! - Every committed change gets a local sequence number and is published on a broadcast feed;
//!   [`SqliteStore::follow`] gives a consistent snapshot plus the changes after it, which is how
//!   edged, devicetwin and the MetaServer start (also after a restart).
//! - A row that cannot be decoded is reported with its key and skipped, never fatal.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kedge_common::inventory::InventoryItem;
use kedge_common::{Message, Operation, ResourcePath};
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Row, SqliteConnection, SqlitePool};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::store::{Applied, ObjectStore, StoreError, StoredObject, message_rv, supersedes};
use crate::edgehub::outbox::{Outbox, OutboxEntry, OutboxError};

/// How many queued writes one transaction takes at most.
const MAX_BATCH: usize = 1024;
/// Changes kept in memory for watches to resume from: at most this many...
const HISTORY: usize = 10_000;
/// ...and at most this much JSON text (object and previous object). Kept as text: a decoded pod
/// takes several times its JSON, and ten thousand decoded pods held for a watch that may never
/// resume was most of edgecore's heap. A watch asking for an older version gets 410 Gone and
/// relists, as against an API server whose watch cache moved on.
const HISTORY_BYTES: usize = 1 << 20;
/// Changes buffered for subscribers that have not read them yet (slots are preallocated; a
/// subscriber that falls this far behind re-reads the store or, for a watch, resumes).
const FEED_CAPACITY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot create the database directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make {path} private to edgecore's user (0600): {source}")]
    Permissions {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot migrate the database {path}: {source}")]
    Migrate {
        path: PathBuf,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
}

/// One committed change, as published on the feed.
#[derive(Debug, Clone)]
pub struct Change {
    pub seq: u64,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub deleted: bool,
    pub object: Value,
    /// The object before the change, if there was a live one, as stored (JSON). Left encoded:
    /// only a watch with selectors needs it decoded, and the history shares it.
    pub old: Option<Arc<str>>,
}

/// A live object read from the database.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectRow {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub object: StoredObject,
}

#[derive(Debug, Default)]
pub struct StoreStats {
    pub transactions: AtomicU64,
    pub messages: AtomicU64,
    pub corrupt_rows: AtomicU64,
}

type Reply = oneshot::Sender<Result<Applied, StoreError>>;
type InventoryReply = oneshot::Sender<Result<Vec<InventoryItem>, StoreError>>;

/// What the writer task is asked to do, in call order.
enum WriterOp {
    Apply(Box<Message>, Reply),
    /// Read the inventory once everything queued before it has committed.
    Inventory(InventoryReply),
    /// An outbox write (put or remove). SQLite has one writer at a time: every write goes
    /// through this connection, so concurrent reporters never meet `SQLITE_BUSY` and outbox
    /// writes share the store's group commits.
    Outbox(OutboxWrite, oneshot::Sender<Result<(), StoreError>>),
}

enum OutboxWrite {
    Put { key: String, seq: u64, text: String },
    Remove { key: String, seq: u64 },
}

/// One queued write of a batch.
enum BatchOp {
    Apply(Box<Message>, Reply),
    Outbox(OutboxWrite, oneshot::Sender<Result<(), StoreError>>),
}

struct Shared {
    seq: AtomicU64,
    changes: broadcast::Sender<Arc<Change>>,
    history: Mutex<History>,
    stats: StoreStats,
}

/// A committed change as the history keeps it: JSON text, decoded again only for a watch that
/// resumes. The writer publishes it as a [`Change`] with the message's own object.
#[derive(Clone)]
struct Recorded {
    seq: u64,
    kind: String,
    namespace: String,
    name: String,
    deleted: bool,
    object: Arc<str>,
    old: Option<Arc<str>>,
}

impl Recorded {
    fn bytes(&self) -> usize {
        self.object.len() + self.old.as_ref().map_or(0, |o| o.len())
    }

    fn decode(&self) -> Result<Change, serde_json::Error> {
        Ok(self.change(serde_json::from_str(&self.object)?))
    }

    fn change(&self, object: Value) -> Change {
        Change {
            seq: self.seq,
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            deleted: self.deleted,
            object,
            old: self.old.clone(),
        }
    }
}

/// The newest changes within [`HISTORY`] entries and [`HISTORY_BYTES`].
#[derive(Default)]
struct History {
    entries: VecDeque<Recorded>,
    bytes: usize,
}

impl History {
    fn push(&mut self, r: Recorded) {
        self.bytes += r.bytes();
        self.entries.push_back(r);
        while self.entries.len() > HISTORY || (self.bytes > HISTORY_BYTES && self.entries.len() > 1)
        {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= old.bytes();
            }
        }
    }
}

/// The SQLite object store. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    writer: mpsc::UnboundedSender<WriterOp>,
    shared: Arc<Shared>,
    path: PathBuf,
}

/// `<path><suffix>`, as SQLite names its -wal and -shm files.
fn sidecar(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}

fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, runs migrations and starts the writer.
    pub async fn open(path: &Path) -> Result<Self, OpenError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| OpenError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        }
        // It holds the node's Secrets: readable by edgecore's user only, and so are the -wal and
        // -shm files SQLite makes beside it (it copies the database file's permissions).
        for f in [
            path.to_owned(),
            sidecar(path, "-wal"),
            sidecar(path, "-shm"),
        ] {
            if f == path || f.exists() {
                kedge_common::files::ensure_private_file(&f).map_err(|source| {
                    OpenError::Permissions {
                        path: f.clone(),
                        source,
                    }
                })?;
            }
        }
        let open_err = |source| OpenError::Open {
            path: path.to_owned(),
            source,
        };
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .map_err(open_err)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.clone())
            .await
            .map_err(open_err)?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|source| OpenError::Migrate {
                path: path.to_owned(),
                source,
            })?;
        let max_seq: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM objects")
            .fetch_one(&pool)
            .await
            .map_err(open_err)?;
        let conn = SqliteConnection::connect_with(&opts)
            .await
            .map_err(open_err)?;
        let shared = Arc::new(Shared {
            seq: AtomicU64::new(max_seq.max(0) as u64),
            changes: broadcast::channel(FEED_CAPACITY).0,
            history: Mutex::new(History::default()),
            stats: StoreStats::default(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(conn, rx, shared.clone()));
        Ok(SqliteStore {
            pool,
            writer: tx,
            shared,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub fn stats(&self) -> &StoreStats {
        &self.shared.stats
    }

    /// The newest committed change sequence.
    pub fn seq(&self) -> u64 {
        self.shared.seq.load(Ordering::Acquire)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.shared.changes.subscribe()
    }

    /// Changes after `seq` still in memory, or `None` when some have been forgotten (the caller
    /// must re-read the store: a watch answers 410 Gone).
    pub fn changes_since(&self, seq: u64) -> Option<Vec<Arc<Change>>> {
        // Copied out under the lock (the texts are shared), decoded after it: the writer takes
        // this lock for every commit.
        let recorded: Vec<Recorded> = {
            let h = self
                .shared
                .history
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let oldest = h.entries.front().map_or(self.seq() + 1, |c| c.seq);
            if seq + 1 < oldest {
                return None;
            }
            h.entries.iter().filter(|c| c.seq > seq).cloned().collect()
        };
        let mut out = Vec::with_capacity(recorded.len());
        for r in &recorded {
            match r.decode() {
                Ok(c) => out.push(Arc::new(c)),
                Err(e) => {
                    // Cannot happen (the text was written from a value); if it did, the watch
                    // relists rather than missing a change.
                    tracing::error!(seq = r.seq, kind = %r.kind, namespace = %r.namespace, name = %r.name, error = %e, "a remembered change does not decode");
                    return None;
                }
            }
        }
        Some(out)
    }

    /// Live rows (kind, namespace, name, resource_version, content) from one read transaction,
    /// with the sequence they are consistent with.
    async fn read_rows(
        &self,
        kind: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<(Vec<sqlx::sqlite::SqliteRow>, u64), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(storage)?;
        let mut tx = conn.begin().await.map_err(storage)?;
        let seq: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM objects")
            .fetch_one(&mut *tx)
            .await
            .map_err(storage)?;
        let rows = sqlx::query(
            "SELECT kind, namespace, name, resource_version, content FROM objects \
             WHERE deleted = 0 AND (?1 IS NULL OR kind = ?1) AND (?2 IS NULL OR namespace = ?2) \
             ORDER BY kind, namespace, name",
        )
        .bind(kind)
        .bind(namespace)
        .fetch_all(&mut *tx)
        .await
        .map_err(storage)?;
        tx.commit().await.map_err(storage)?;
        Ok((rows, seq.max(0) as u64))
    }

    /// Live objects by kind, and pods by `status.phase` (`Pending` when unset; rows that are not
    /// JSON count as `Unknown`), counted by SQLite without decoding any object (`/metrics`).
    pub async fn counts(
        &self,
    ) -> Result<(BTreeMap<String, u64>, BTreeMap<String, u64>), StoreError> {
        let by_kind: Vec<(String, i64)> =
            sqlx::query_as("SELECT kind, COUNT(*) FROM objects WHERE deleted = 0 GROUP BY kind")
                .fetch_all(&self.pool)
                .await
                .map_err(storage)?;
        let by_phase: Vec<(String, i64)> = sqlx::query_as(
            "SELECT CASE WHEN json_valid(content) \
                 THEN COALESCE(json_extract(content, '$.status.phase'), 'Pending') \
                 ELSE 'Unknown' END AS phase, COUNT(*) \
             FROM objects WHERE deleted = 0 AND kind = 'pod' GROUP BY phase",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(storage)?;
        let collect = |rows: Vec<(String, i64)>| {
            rows.into_iter()
                .map(|(k, n)| (k, u64::try_from(n).unwrap_or(0)))
                .collect()
        };
        Ok((collect(by_kind), collect(by_phase)))
    }

    fn report_corrupt(&self, row: &sqlx::sqlite::SqliteRow, error: &serde_json::Error) {
        let (kind, namespace, name): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        self.shared
            .stats
            .corrupt_rows
            .fetch_add(1, Ordering::Relaxed);
        tracing::error!(%kind, %namespace, %name, %error, "corrupt object row skipped");
    }

    /// Live objects of `kind` (all kinds with `None`), with the sequence they are consistent
    /// with. Corrupt rows are reported and skipped.
    pub async fn list(
        &self,
        kind: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<(Vec<ObjectRow>, u64), StoreError> {
        let (rows, seq) = self.read_rows(kind, namespace).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let text: String = r.get(4);
            match serde_json::from_str::<Value>(&text) {
                Ok(content) => out.push(ObjectRow {
                    kind: r.get(0),
                    namespace: r.get(1),
                    name: r.get(2),
                    object: StoredObject {
                        resource_version: r.get(3),
                        content,
                    },
                }),
                Err(e) => self.report_corrupt(&r, &e),
            }
        }
        Ok((out, seq))
    }

    /// Live objects as stored JSON text, checked to be well-formed but not decoded (the fast path
    /// for serving lists). Corrupt rows are reported and skipped.
    pub async fn list_raw(
        &self,
        kind: &str,
        namespace: Option<&str>,
    ) -> Result<(Vec<Box<serde_json::value::RawValue>>, u64), StoreError> {
        let (rows, seq) = self.read_rows(Some(kind), namespace).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let text: String = r.get(4);
            match serde_json::value::RawValue::from_string(text) {
                Ok(raw) => out.push(raw),
                Err(e) => self.report_corrupt(&r, &e),
            }
        }
        Ok((out, seq))
    }

    /// One live object.
    pub async fn get(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<StoredObject>, StoreError> {
        let row = sqlx::query(
            "SELECT resource_version, content FROM objects WHERE kind = ? AND namespace = ? AND name = ? AND deleted = 0",
        )
        .bind(kind)
        .bind(namespace)
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(storage)?;
        let Some(r) = row else { return Ok(None) };
        let text: String = r.get(1);
        match serde_json::from_str(&text) {
            Ok(content) => Ok(Some(StoredObject {
                resource_version: r.get(0),
                content,
            })),
            Err(e) => {
                self.shared
                    .stats
                    .corrupt_rows
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(%kind, %namespace, %name, error = %e, "corrupt object row skipped");
                Ok(None)
            }
        }
    }

    /// A consistent start for a module that follows the store: the live objects of `kind`, the
    /// sequence they reflect, and a receiver for every change after it (changes with a lower or
    /// equal sequence in the receiver are already in the snapshot).
    pub async fn follow(
        &self,
        kind: Option<&str>,
    ) -> Result<(Vec<ObjectRow>, u64, broadcast::Receiver<Arc<Change>>), StoreError> {
        let rx = self.subscribe();
        let (rows, seq) = self.list(kind, None).await?;
        Ok((rows, seq, rx))
    }
}

impl ObjectStore for SqliteStore {
    fn apply(
        &self,
        msg: &Message,
    ) -> impl Future<Output = Result<Applied, StoreError>> + Send + 'static + use<> {
        let (tx, rx) = oneshot::channel();
        let queued = self.writer.send(WriterOp::Apply(Box::new(msg.clone()), tx));
        async move {
            queued.map_err(|_| StoreError::Storage("the database writer has stopped".into()))?;
            rx.await
                .map_err(|_| StoreError::Storage("the database writer has stopped".into()))?
        }
    }

    fn inventory(
        &self,
    ) -> impl Future<Output = Result<Vec<InventoryItem>, StoreError>> + Send + 'static + use<> {
        let (tx, rx) = oneshot::channel();
        let queued = self.writer.send(WriterOp::Inventory(tx));
        async move {
            queued.map_err(|_| StoreError::Storage("the database writer has stopped".into()))?;
            rx.await
                .map_err(|_| StoreError::Storage("the database writer has stopped".into()))?
        }
    }
}

async fn writer(
    mut conn: SqliteConnection,
    mut rx: mpsc::UnboundedReceiver<WriterOp>,
    shared: Arc<Shared>,
) {
    // An inventory request that ended the previous batch, served once that batch committed.
    let mut barrier: Option<InventoryReply> = None;
    loop {
        if let Some(reply) = barrier.take() {
            let _ = reply.send(read_inventory(&mut conn).await);
        }
        let Some(first) = rx.recv().await else { break };
        let first = match first {
            WriterOp::Apply(msg, reply) => BatchOp::Apply(msg, reply),
            WriterOp::Outbox(w, reply) => BatchOp::Outbox(w, reply),
            WriterOp::Inventory(reply) => {
                barrier = Some(reply);
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(WriterOp::Apply(msg, reply)) => batch.push(BatchOp::Apply(msg, reply)),
                Ok(WriterOp::Outbox(w, reply)) => batch.push(BatchOp::Outbox(w, reply)),
                Ok(WriterOp::Inventory(reply)) => {
                    barrier = Some(reply);
                    break;
                }
                Err(_) => break,
            }
        }
        let mut results: Vec<Result<(Applied, Option<Recorded>), StoreError>> =
            Vec::with_capacity(batch.len());
        let outcome: Result<(), StoreError> = async {
            let mut tx = conn.begin().await.map_err(storage)?;
            let mut seq = shared.seq.load(Ordering::Acquire);
            for op in &batch {
                let r = match op {
                    BatchOp::Apply(msg, _) => apply_one(&mut tx, msg, seq + 1).await,
                    BatchOp::Outbox(w, _) => outbox_write(&mut tx, w)
                        .await
                        .map(|()| (Applied::Stored, None)),
                };
                if let Ok((_, Some(_))) = &r {
                    seq += 1;
                }
                results.push(r);
            }
            tx.commit().await.map_err(storage)?;
            Ok(())
        }
        .await;
        shared.stats.transactions.fetch_add(1, Ordering::Relaxed);
        shared
            .stats
            .messages
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                let mut history = shared.history.lock().unwrap_or_else(|p| p.into_inner());
                for (op, r) in batch.into_iter().zip(results) {
                    let (msg, reply) = match op {
                        BatchOp::Apply(msg, reply) => (msg, reply),
                        BatchOp::Outbox(_, reply) => {
                            let _ = reply.send(r.map(|_| ()));
                            continue;
                        }
                    };
                    let r = r.map(|(applied, recorded)| {
                        if let Some(rec) = recorded {
                            let seq = rec.seq;
                            let change = rec.change(msg.content);
                            history.push(rec);
                            let _ = shared.changes.send(Arc::new(change));
                            // Visible only after it was published: whoever reads `seq` and then
                            // drains the feed has seen every change up to it.
                            shared.seq.store(seq, Ordering::Release);
                        }
                        applied
                    });
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, messages = batch.len(), "database transaction failed; nothing acked");
                for op in batch {
                    let err = StoreError::Storage(e.to_string());
                    match op {
                        BatchOp::Apply(_, reply) => {
                            let _ = reply.send(Err(err));
                        }
                        BatchOp::Outbox(_, reply) => {
                            let _ = reply.send(Err(err));
                        }
                    }
                }
            }
        }
    }
}

async fn outbox_write(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    w: &OutboxWrite,
) -> Result<(), StoreError> {
    match w {
        OutboxWrite::Put { key, seq, text } => sqlx::query(
            "INSERT INTO outbox (key, seq, message) VALUES (?, ?, ?) \
             ON CONFLICT (key) DO UPDATE SET seq = excluded.seq, message = excluded.message",
        )
        .bind(key)
        .bind(*seq as i64)
        .bind(text)
        .execute(&mut **tx)
        .await
        .map(|_| ())
        .map_err(storage),
        OutboxWrite::Remove { key, seq } => {
            sqlx::query("DELETE FROM outbox WHERE key = ? AND seq = ?")
                .bind(key)
                .bind(*seq as i64)
                .execute(&mut **tx)
                .await
                .map(|_| ())
                .map_err(storage)
        }
    }
}

/// Every live object's identity and version, read on the writer's connection (so after every
/// write queued before the request).
async fn read_inventory(conn: &mut SqliteConnection) -> Result<Vec<InventoryItem>, StoreError> {
    let rows = sqlx::query(
        "SELECT kind, namespace, name, uid, resource_version FROM objects WHERE deleted = 0",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(storage)?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let namespace: String = r.get(1);
            InventoryItem {
                kind: r.get(0),
                namespace: (namespace != kedge_common::resource::CLUSTER_SCOPE)
                    .then_some(namespace),
                name: r.get(2),
                uid: r.get(3),
                resource_version: r.get(4),
            }
        })
        .collect())
}

async fn apply_one(
    tx: &mut SqliteConnection,
    msg: &Message,
    seq: u64,
) -> Result<(Applied, Option<Recorded>), StoreError> {
    let path = ResourcePath::parse_edge(&msg.route.resource)?;
    let (Some(namespace), Some(kind), Some(name)) =
        (path.namespace_segment(), path.resource_type(), path.name())
    else {
        return Err(StoreError::Storage(format!(
            "resource `{}` does not name an object (<namespace>/<type>/<name>)",
            msg.route.resource
        )));
    };
    let is_delete = match msg.route.operation {
        Operation::Insert | Operation::Update | Operation::Patch => false,
        Operation::Delete => true,
        ref other => return Err(StoreError::Unsupported(other.clone())),
    };
    let rv = message_rv(msg);
    let existing = sqlx::query("SELECT resource_version, deleted, content FROM objects WHERE kind = ? AND namespace = ? AND name = ?")
        .bind(kind)
        .bind(namespace)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(storage)?;
    let mut old = None;
    if let Some(row) = &existing {
        let stored_rv: String = row.get(0);
        let stored_deleted: i64 = row.get(1);
        if !supersedes(&rv, is_delete, &stored_rv, stored_deleted != 0) {
            return Ok((Applied::Stale, None));
        }
        if stored_deleted == 0 {
            let text: String = row.get(2);
            old = Some(Arc::from(text));
        }
    }
    let uid = msg
        .content
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    // Objects from informers may lack apiVersion/kind (Go clears TypeMeta): store them complete,
    // so the MetaServer can serve rows as they are.
    let content = match (&msg.content, kedge_common::resource::api_type_of(kind)) {
        (Value::Object(m), Some((api_version, k)))
            if m.get("apiVersion").and_then(Value::as_str) != Some(api_version)
                || m.get("kind").and_then(Value::as_str) != Some(k) =>
        {
            let mut c = msg.content.clone();
            c["apiVersion"] = Value::String(api_version.to_owned());
            c["kind"] = Value::String(k.to_owned());
            serde_json::to_string(&c).map_err(storage)?
        }
        _ => serde_json::to_string(&msg.content).map_err(storage)?,
    };
    sqlx::query(
        "INSERT INTO objects (kind, namespace, name, uid, resource_version, deleted, content, seq) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (kind, namespace, name) DO UPDATE SET uid = excluded.uid, \
         resource_version = excluded.resource_version, deleted = excluded.deleted, \
         content = excluded.content, seq = excluded.seq",
    )
    .bind(kind)
    .bind(namespace)
    .bind(name)
    .bind(uid)
    .bind(&rv)
    .bind(i64::from(is_delete))
    .bind(content.as_str())
    .bind(seq as i64)
    .execute(&mut *tx)
    .await
    .map_err(storage)?;
    let change = Recorded {
        seq,
        kind: kind.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        deleted: is_delete,
        object: Arc::from(content),
        old,
    };
    Ok((
        if is_delete {
            Applied::Deleted
        } else {
            Applied::Stored
        },
        Some(change),
    ))
}

// ---------------------------------------------------------------------------------------------
// The durable outbox

/// The outbox in the same database file.
pub struct SqliteOutbox {
    pool: SqlitePool,
    writer: mpsc::UnboundedSender<WriterOp>,
    next: AtomicU64,
    /// Held while a report takes its sequence number and is queued to the writer, so that
    /// reports are committed in sequence order (see [`Outbox::put`]).
    put_order: std::sync::Mutex<()>,
    latest: watch::Sender<u64>,
}

fn outbox_err(e: impl std::fmt::Display) -> OutboxError {
    OutboxError::Storage(e.to_string())
}

impl SqliteOutbox {
    pub async fn new(store: &SqliteStore) -> Result<Self, OutboxError> {
        let max: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM outbox")
            .fetch_one(&store.pool)
            .await
            .map_err(outbox_err)?;
        Ok(SqliteOutbox {
            pool: store.pool.clone(),
            writer: store.writer.clone(),
            next: AtomicU64::new(max.max(0) as u64),
            put_order: std::sync::Mutex::new(()),
            latest: watch::channel(max.max(0) as u64).0,
        })
    }

    /// Hands a write to the store's single writer and waits for its commit.
    async fn write(&self, w: OutboxWrite) -> Result<(), OutboxError> {
        let committed = self.queue_write(w)?;
        Self::committed(committed).await
    }

    /// Hands `w` to the writer (which commits in queue order); the receiver answers once it is
    /// committed.
    fn queue_write(
        &self,
        w: OutboxWrite,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(WriterOp::Outbox(w, tx))
            .map_err(|_| OutboxError::Storage("the database writer stopped".into()))?;
        Ok(rx)
    }

    async fn committed(rx: oneshot::Receiver<Result<(), StoreError>>) -> Result<(), OutboxError> {
        rx.await
            .map_err(|_| OutboxError::Storage("the database writer stopped".into()))?
            .map_err(outbox_err)
    }

    /// Reports waiting for the cloud.
    pub async fn pending_count(&self) -> Result<usize, OutboxError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
            .fetch_one(&self.pool)
            .await
            .map_err(outbox_err)?;
        Ok(n.max(0) as usize)
    }
}

impl Outbox for SqliteOutbox {
    async fn put(&self, key: &str, msg: Message) -> Result<u64, OutboxError> {
        let text = serde_json::to_string(&msg).map_err(outbox_err)?;
        // Sequence number and place in the writer's queue under one lock: the writer commits in
        // queue order, so no reader ever sees report N+1 committed while N is still on its way.
        // (EdgeHub reads everything after the last sequence it sent; a report committed behind a
        // later one was skipped for the whole session — a pod whose Running status never reached
        // the cloud.)
        let (seq, committed) = {
            let _order = self.put_order.lock().unwrap_or_else(|p| p.into_inner());
            let seq = self.next.fetch_add(1, Ordering::AcqRel) + 1;
            let committed = self.queue_write(OutboxWrite::Put {
                key: key.to_owned(),
                seq,
                text,
            })?;
            (seq, committed)
        };
        Self::committed(committed).await?;
        self.latest.send_modify(|l| *l = (*l).max(seq));
        Ok(seq)
    }

    async fn pending_after(&self, after: u64) -> Result<Vec<OutboxEntry>, OutboxError> {
        let rows = sqlx::query("SELECT key, seq, message FROM outbox WHERE seq > ? ORDER BY seq")
            .bind(after as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(outbox_err)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let key: String = r.get(0);
            let seq: i64 = r.get(1);
            let text: String = r.get(2);
            match Message::from_str_limited(&text, usize::MAX) {
                Ok(message) => out.push(OutboxEntry {
                    key,
                    seq: seq.max(0) as u64,
                    message,
                }),
                Err(e) => {
                    tracing::error!(%key, seq, error = %e, "corrupt outbox row skipped (left in place for inspection)")
                }
            }
        }
        Ok(out)
    }

    async fn remove(&self, key: &str, seq: u64) -> Result<(), OutboxError> {
        self.write(OutboxWrite::Remove {
            key: key.to_owned(),
            seq,
        })
        .await
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(op: Operation, name: &str, rv: u64) -> Message {
        Message::new(
            "cloud",
            "resource",
            op,
            format!("default/pod/{name}"),
            json!({"metadata": {"name": name, "uid": format!("u-{name}"), "resourceVersion": rv.to_string()}, "v": rv}),
        )
        .with_resource_version(rv.to_string())
    }

    async fn open(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(&dir.path().join("edge.db"))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn duplicates_and_out_of_order_messages_leave_the_newest_version() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir).await;
        let results: Vec<Applied> = futures_util::future::join_all(
            [3, 1, 3, 5, 4, 5]
                .into_iter()
                .map(|rv| s.apply(&m(Operation::Update, "web", rv))),
        )
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        use Applied::*;
        assert_eq!(results, [Stored, Stale, Stale, Stored, Stale, Stale]);
        let o = s.get("pod", "default", "web").await.unwrap().unwrap();
        assert_eq!(o.resource_version, "5");
        assert_eq!(
            s.apply(&m(Operation::Delete, "web", 6)).await.unwrap(),
            Deleted
        );
        assert_eq!(
            s.apply(&m(Operation::Insert, "web", 5)).await.unwrap(),
            Stale,
            "no resurrection"
        );
        assert!(s.get("pod", "default", "web").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn inventory_lists_live_objects_after_every_earlier_write() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir).await;
        let node = Message::new(
            "cloud",
            "resource",
            Operation::Update,
            "null/node/edge-1",
            json!({"metadata": {"name": "edge-1", "uid": "u-node"}}),
        )
        .with_resource_version("9");
        // Queued, not awaited: the inventory still sees them (it is ordered after them).
        let writes: Vec<_> = (0..300)
            .map(|i| s.apply(&m(Operation::Insert, &format!("p{i}"), 10 + i)))
            .chain([s.apply(&m(Operation::Delete, "p7", 400)), s.apply(&node)])
            .collect();
        let mut inv = s.inventory().await.unwrap();
        futures_util::future::join_all(writes).await;
        inv.sort();
        assert_eq!(
            inv.len(),
            300,
            "299 pods + the node; the tombstone is left out"
        );
        assert!(!inv.iter().any(|i| i.name == "p7"));
        let n = inv.iter().find(|i| i.kind == "node").unwrap();
        assert_eq!(
            (
                n.namespace.as_deref(),
                n.uid.as_str(),
                n.resource_version.as_str()
            ),
            (None, "u-node", "9")
        );
        let p = inv.iter().find(|i| i.name == "p3").unwrap();
        assert_eq!(
            (
                p.namespace.as_deref(),
                p.uid.as_str(),
                p.resource_version.as_str()
            ),
            (Some("default"), "u-p3", "13")
        );
    }

    #[tokio::test]
    async fn queued_writes_are_group_committed_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir).await;
        let futs: Vec<_> = (0..2000)
            .map(|i| s.apply(&m(Operation::Insert, &format!("p{i}"), i + 1)))
            .collect();
        for f in futs {
            assert_eq!(f.await.unwrap(), Applied::Stored);
        }
        let tx = s.stats().transactions.load(Ordering::Relaxed);
        assert!(tx < 100, "2000 writes took {tx} transactions");
        drop(s);
        let again = open(&dir).await;
        let (rows, seq) = again.list(Some("pod"), None).await.unwrap();
        assert_eq!(rows.len(), 2000);
        assert_eq!(seq, 2000);
        assert_eq!(again.seq(), 2000);
    }

    /// Reports become visible in sequence order, whoever puts them: a reader that takes
    /// everything after the last sequence it saw (as EdgeHub does) never finds a gap that fills
    /// in later — the report in that gap would be skipped for the whole session.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn reports_are_committed_in_sequence_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir).await;
        let outbox = Arc::new(SqliteOutbox::new(&s).await.unwrap());
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let outbox = outbox.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..100u64 {
                    let name = format!("w{w}-{i}");
                    // Reports of different sizes take different times to encode.
                    let mut msg = m(Operation::Update, &name, 1);
                    msg.content = serde_json::json!({"pad": "x".repeat(((w * 37 + i * 11) % 64) as usize * 64)});
                    outbox.put(&format!("podstatus/{name}"), msg).await.unwrap();
                }
            }));
        }
        let reader = {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                let mut seen = 0u64;
                while seen < 800 {
                    for e in outbox.pending_after(seen).await.unwrap() {
                        assert_eq!(
                            e.seq,
                            seen + 1,
                            "report {} became visible after {}",
                            seen + 1,
                            e.seq
                        );
                        seen = e.seq;
                    }
                    tokio::task::yield_now().await;
                }
            })
        };
        for t in tasks {
            t.await.unwrap();
        }
        tokio::time::timeout(std::time::Duration::from_secs(30), reader)
            .await
            .unwrap()
            .unwrap();
    }

    /// Many reporters and the store's writes at once (20 pod workers starting together): no
    /// write ever meets `database is locked`, since every write goes through one connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reports_and_store_writes_never_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir).await;
        let outbox = Arc::new(SqliteOutbox::new(&s).await.unwrap());
        let mut tasks = Vec::new();
        for w in 0..20u64 {
            let (s, outbox) = (s.clone(), outbox.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..25u64 {
                    let name = format!("w{w}-{i}");
                    s.apply(&m(Operation::Insert, &name, w * 100 + i + 1))
                        .await
                        .unwrap();
                    let seq = outbox
                        .put(&format!("podstatus/{name}"), m(Operation::Update, &name, 1))
                        .await
                        .unwrap();
                    if i % 2 == 0 {
                        outbox
                            .remove(&format!("podstatus/{name}"), seq)
                            .await
                            .unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(outbox.pending_count().await.unwrap(), 20 * 12);
        assert_eq!(s.list(Some("pod"), None).await.unwrap().0.len(), 500);
    }

    #[tokio::test]
    async fn corrupt_rows_are_reported_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir).await;
        s.apply(&m(Operation::Insert, "good", 1)).await.unwrap();
        s.apply(&m(Operation::Insert, "bad", 2)).await.unwrap();
        sqlx::query("UPDATE objects SET content = '{not json' WHERE name = 'bad'")
            .execute(s.pool())
            .await
            .unwrap();
        let (rows, _) = s.list(Some("pod"), None).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].name, "good");
        assert_eq!(s.stats().corrupt_rows.load(Ordering::Relaxed), 1);
        assert!(s.get("pod", "default", "bad").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn follow_gives_a_snapshot_then_every_later_change() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir).await;
        s.apply(&m(Operation::Insert, "a", 1)).await.unwrap();
        let (rows, seq, mut rx) = s.follow(Some("pod")).await.unwrap();
        assert_eq!(rows.len(), 1);
        s.apply(&m(Operation::Update, "a", 2)).await.unwrap();
        s.apply(&m(Operation::Delete, "a", 3)).await.unwrap();
        let c1 = rx.recv().await.unwrap();
        let c2 = rx.recv().await.unwrap();
        assert!(c1.seq > seq && !c1.deleted && c1.old.is_some());
        assert!(c2.deleted);
        assert_eq!(s.changes_since(seq).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn the_change_history_is_kept_as_text_within_its_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir).await;
        let start = s.seq();
        s.apply(&m(Operation::Insert, "a", 1)).await.unwrap();
        s.apply(&m(Operation::Update, "a", 2)).await.unwrap();
        // Replayed changes are the stored objects (apiVersion and kind completed) and carry the
        // previous object, as the live feed does.
        let replay = s.changes_since(start).unwrap();
        assert_eq!(replay.len(), 2);
        assert_eq!(replay[1].object["v"], 2);
        assert_eq!(replay[1].object["kind"], "Pod");
        let old: Value = serde_json::from_str(replay[1].old.as_deref().unwrap()).unwrap();
        assert_eq!(old["v"], 1);
        assert!(replay[0].old.is_none());
        // Big objects push the oldest changes out once the texts pass the budget: a watch from
        // before them must relist (None = 410 Gone), one from a recent version still resumes.
        let big = "x".repeat(HISTORY_BYTES / 8);
        for rv in 3..20u64 {
            let mut msg = m(Operation::Update, "a", rv);
            msg.content["pad"] = json!(big);
            s.apply(&msg).await.unwrap();
        }
        assert!(s.changes_since(start).is_none());
        let h = s.shared.history.lock().unwrap();
        assert!(h.bytes <= HISTORY_BYTES, "{} bytes kept", h.bytes);
        assert_eq!(
            h.bytes,
            h.entries.iter().map(Recorded::bytes).sum::<usize>()
        );
        let oldest = h.entries.front().unwrap().seq;
        drop(h);
        let recent = s.changes_since(oldest).unwrap();
        assert_eq!(recent.last().unwrap().object["v"], 19);
    }

    #[tokio::test]
    async fn bad_messages_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir).await;
        let mut no_name = m(Operation::Insert, "x", 1);
        no_name.route.resource = "default/podlist".into();
        assert!(s.apply(&no_name).await.is_err());
        let mut query = m(Operation::Query, "x", 1);
        query.route.operation = Operation::Query;
        assert!(matches!(
            s.apply(&query).await,
            Err(StoreError::Unsupported(_))
        ));
        // The writer is still fine.
        assert_eq!(
            s.apply(&m(Operation::Insert, "y", 1)).await.unwrap(),
            Applied::Stored
        );
    }

    #[tokio::test]
    async fn an_unopenable_database_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("is-a-dir.db");
        std::fs::create_dir(&path).unwrap();
        let e = SqliteStore::open(&path).await.err().unwrap();
        assert!(e.to_string().contains("is-a-dir.db"), "{e}");
    }

    #[tokio::test]
    async fn the_outbox_keeps_the_latest_report_per_key_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir).await;
        let o = SqliteOutbox::new(&s).await.unwrap();
        let r = |v: u64| {
            Message::new(
                "edged",
                "resource",
                Operation::Update,
                "default/podstatus/a",
                json!({"v": v}),
            )
        };
        let a1 = o.put("pod/a", r(1)).await.unwrap();
        o.put("pod/b", r(1)).await.unwrap();
        let a2 = o.put("pod/a", r(2)).await.unwrap();
        o.remove("pod/a", a1).await.unwrap();
        assert_eq!(o.pending_count().await.unwrap(), 2);
        drop(o);
        drop(s);
        let s = open(&dir).await;
        let o = SqliteOutbox::new(&s).await.unwrap();
        let pending = o.pending_after(0).await.unwrap();
        let got: Vec<(String, Value)> = pending
            .iter()
            .map(|e| (e.key.clone(), e.message.content.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("pod/b".to_owned(), json!({"v": 1})),
                ("pod/a".to_owned(), json!({"v": 2}))
            ]
        );
        assert_eq!(pending[1].seq, a2);
        // New entries continue the sequence.
        assert!(o.put("pod/c", r(1)).await.unwrap() > a2);
    }
}

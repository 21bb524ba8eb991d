//! CloudHub: the cloud end of the cloud–edge link.
//!
//! - `wss://<host>:10000/<project>/<node>/events` with mutual TLS. The node is the one named in
//!   the client certificate (`CN=system:node:<node>`); a URL or `node_id` header naming another
//!   node is refused during the handshake.
//! - One session per node: a new connection replaces the old one, which is closed; the node's
//!   [`queue::NodeQueue`] outlives both, so nothing queued or in flight is lost.
//! - Upstream messages are re-tagged `node/<node>/…` from the session and handed to the
//!   controllers over one bounded, typed channel ([`Upstream`]), together with acks and
//!   connect/disconnect events. A node can only ever speak for itself.
//! - An edge that offers an inventory (handshake header `kedge-inventory`, see
//!   [`kedge_common::inventory`]) gets it accepted in the handshake response; its queue sends
//!   nothing keyed until the inventory is in and applied, and the controllers get it
//!   ([`Upstream::Inventory`]) to delete what the node should no longer hold and send what it
//!   lacks. KubeEdge edges offer none and are served from what their acks said.
//! - The certificate must also be the node's *now*: its key must be one the node's ownership
//!   record lists ([`crate::nodeidentity`]), checked before the handshake is answered. When the
//!   record changes (revocation, Node deleted), a session with a key no longer listed is closed
//!   ([`CloudHubHandle::close_unless_key`]).
//! - Malformed frames close only the offending connection.

pub mod bootstrap;
pub mod certs;
pub mod queue;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use kedge_common::inventory;
use kedge_common::stream::{self, Mux, MuxError, Stream, StreamFrame, StreamRequest};
use kedge_common::wire::{Incoming, WireCodec, encode_stream};
use kedge_common::{Message, Operation, ResourcePath};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

use crate::nodeidentity::NodeIdentities;
pub use queue::{Acked, InventoryApplied, ObjectKey, Pushed, QueueError, QueueLimits};

/// What the hub hands to the controllers, in order, per node.
#[derive(Debug)]
pub enum Upstream {
    /// A node's session started; `inventory`: its edge will send an inventory; `kubeedge`: the
    /// edge is a KubeEdge edgecore (no `kedge-protocol` header), which registers its Node, renews
    /// its Lease and asks for what it needs itself.
    Connected {
        node: String,
        inventory: bool,
        kubeedge: bool,
    },
    /// The node's inventory: every live object it holds (key -> resourceVersion), already
    /// applied to its queue.
    Inventory {
        node: String,
        held: HashMap<ObjectKey, String>,
    },
    /// A node's session ended (and no newer one replaced it).
    Disconnected { node: String },
    /// A message from the node; its `route.resource` is in cloud form (`node/<node>/…`).
    /// `ack` tells the node whether the report was processed; see [`ReportAck`].
    Message {
        node: String,
        message: Box<Message>,
        ack: ReportAck,
    },
    /// The node acknowledged (durably stored) a keyed object version.
    Acked { node: String, acked: Acked },
}

/// The controllers' answer to a report the node wants acknowledged (`sync: true`, our edge's
/// durable outbox). The node deletes the report only on a positive ack, so a report whose
/// processing failed for a transient reason (API server down) is not lost: `retry_later` sends
/// an `error` response and the node sends it again later. Dropping it acknowledges: reports that
/// can never succeed (refused, malformed) must not be retried forever.
#[derive(Debug)]
pub struct ReportAck(Option<tokio::sync::oneshot::Sender<bool>>);

impl ReportAck {
    /// A report that asked for no acknowledgement.
    pub fn none() -> Self {
        ReportAck(None)
    }

    pub fn processed(mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(true);
        }
    }

    pub fn retry_later(mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(false);
        }
    }
}

impl Drop for ReportAck {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(true);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("message resource `{resource}` is not a cloud path `node/<node>/…`: {source}")]
    BadResource {
        resource: String,
        #[source]
        source: kedge_common::PathError,
    },
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Why a stream to a node could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenStreamError {
    #[error(
        "node {0} is not connected to this cloudcore (offline, or connected to another replica)"
    )]
    NotConnected(String),
    #[error("node {0} runs KubeEdge's edgecore, which serves no streams over this link")]
    NoStreams(String),
    #[error("node {node}: {source}")]
    Link {
        node: String,
        #[source]
        source: MuxError,
    },
}

#[derive(Debug, Clone)]
pub struct HubSettings {
    pub keepalive_timeout: Duration,
    pub node_limit: usize,
    pub codec: WireCodec,
    pub queue: QueueLimits,
    pub handshake_timeout: Duration,
    /// How long the queue of a node that left is kept. A node that comes back within it
    /// resumes from the queue; after it (the node went to another replica, or is down) the
    /// queue is dropped and the node's next session starts from its inventory or recorded acks
    /// (see `edgecontroller::resync`). Queues exist only for nodes connected to this replica, so
    /// a replica's memory follows the nodes it serves.
    pub queue_retention: Duration,
    /// A session without an inventory (a KubeEdge edge) also waits before sending anything
    /// keyed, until the controllers hand over what the node acknowledged as recorded in the
    /// cluster ([`CloudHubHandle::apply_ack_record`]). cloudcore always sets it; a hub on its
    /// own (tests, benchmarks) has nobody to hand a record over and leaves it off.
    pub await_ack_record: bool,
    /// The longest one write to a node may take (`modules.cloudHub.writeTimeout`, as
    /// KubeEdge's): a node that stopped reading — partitioned, its packets dropped — fills the
    /// socket buffer, and without a bound its session would stay "connected" (its Lease
    /// renewed, the Node Ready) until TCP gives up many minutes later.
    pub write_timeout: Duration,
}

impl Default for HubSettings {
    fn default() -> Self {
        HubSettings {
            keepalive_timeout: Duration::from_secs(30),
            node_limit: 10_000,
            codec: WireCodec::default(),
            queue: QueueLimits::default(),
            handshake_timeout: Duration::from_secs(10),
            queue_retention: Duration::from_secs(120),
            await_ack_record: false,
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// The session a node slot is served by.
struct CurrentSession {
    id: u64,
    cancel: CancellationToken,
    /// Key id of the certificate it connected with.
    key: String,
}

struct NodeSlot {
    queue: Mutex<queue::NodeQueue>,
    wake: Notify,
    session: Mutex<Option<CurrentSession>>,
    /// The current session's streams; `None` while disconnected or on a KubeEdge session.
    streams: Mutex<Option<Mux>>,
    /// When its last session ended; `None` while a session holds (or is about to hold) it.
    /// Changed only under the hub's `nodes` lock, so the sweep never drops a slot a session
    /// has just taken.
    left: Mutex<Option<Instant>>,
}

impl NodeSlot {
    fn queue(&self) -> MutexGuard<'_, queue::NodeQueue> {
        // A panic while holding the lock leaves the queue consistent (every method finishes its
        // bookkeeping before returning), so recover from poisoning instead of cascading panics.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn session(&self) -> MutexGuard<'_, Option<CurrentSession>> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn streams(&self) -> MutexGuard<'_, Option<Mux>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn left(&self) -> MutexGuard<'_, Option<Instant>> {
        self.left.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Hub {
    settings: HubSettings,
    identities: Arc<dyn NodeIdentities>,
    nodes: Mutex<HashMap<String, Arc<NodeSlot>>>,
    upstream: mpsc::Sender<Upstream>,
    next_session: std::sync::atomic::AtomicU64,
    connected: std::sync::atomic::AtomicUsize,
    /// Keyed messages nodes acknowledged / refused (for `/metrics`).
    acked: std::sync::atomic::AtomicU64,
    refused: std::sync::atomic::AtomicU64,
}

/// CloudHub's counters (see [`CloudHubHandle::counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubCounters {
    pub acked: u64,
    pub refused: u64,
    /// Sessions started since cloudcore started.
    pub sessions: u64,
}

impl Hub {
    /// The slot a session of `node` is about to use (made if it has none); not swept while the
    /// session lasts.
    fn take_slot(&self, node: &str) -> Arc<NodeSlot> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let slot = nodes
            .entry(node.to_owned())
            .or_insert_with(|| {
                Arc::new(NodeSlot {
                    queue: Mutex::new(queue::NodeQueue::new(node, self.settings.queue)),
                    wake: Notify::new(),
                    session: Mutex::new(None),
                    streams: Mutex::new(None),
                    left: Mutex::new(None),
                })
            })
            .clone();
        *slot.left() = None;
        slot
    }

    /// The slot of a node connected here (or recently), if any.
    fn existing_slot(&self, node: &str) -> Option<Arc<NodeSlot>> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.get(node).cloned()
    }

    /// `node` no longer uses its slot (its session ended, or its handshake failed) unless a
    /// session holds it.
    fn leave_slot(&self, node: &str, now: Instant) {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = nodes.get(node)
            && slot.session().is_none()
        {
            *slot.left() = Some(now);
        }
    }

    /// Drops the queues of nodes that left more than `queue_retention` ago.
    fn sweep(&self, now: Instant) -> usize {
        let retention = self.settings.queue_retention;
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let before = nodes.len();
        nodes.retain(|_, slot| {
            let left = *slot.left();
            left.is_none_or(|t| now.saturating_duration_since(t) < retention)
        });
        before - nodes.len()
    }
}

/// The controllers' handle on the hub: queue messages for nodes, ask who is connected.
#[derive(Clone)]
pub struct CloudHubHandle {
    hub: Arc<Hub>,
}

impl CloudHubHandle {
    /// Queues a message for the node named in its cloud-form resource (`node/<node>/…`). The
    /// prefix is stripped before sending. With a key the message needs an ack and coalesces with
    /// older versions of the same object.
    pub fn enqueue(&self, key: Option<ObjectKey>, mut msg: Message) -> Result<Pushed, HubError> {
        let path = ResourcePath::parse_cloud(&msg.route.resource).map_err(|source| {
            HubError::BadResource {
                resource: msg.route.resource.clone(),
                source,
            }
        })?;
        let node = path.node().unwrap_or_default().to_owned();
        msg.route.resource = path.edge_str().to_owned();
        let Some(slot) = self.hub.existing_slot(&node) else {
            return Ok(Pushed::NotHere);
        };
        let pushed = slot.queue().push(key, msg)?;
        if pushed == Pushed::Queued {
            slot.wake.notify_one();
        }
        Ok(pushed)
    }

    /// Opens a stream to `node` over its current session (kubectl logs/exec/attach/
    /// port-forward; see [`kedge_common::stream`]).
    pub async fn open_stream(
        &self,
        node: &str,
        request: &StreamRequest,
    ) -> Result<Stream, OpenStreamError> {
        let slot = {
            let nodes = self.hub.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes.get(node).cloned()
        };
        let Some(slot) = slot.filter(|s| s.session().is_some()) else {
            return Err(OpenStreamError::NotConnected(node.to_owned()));
        };
        let mux = slot.streams().clone();
        let Some(mux) = mux else {
            return Err(OpenStreamError::NoStreams(node.to_owned()));
        };
        mux.open(request)
            .await
            .map_err(|source| OpenStreamError::Link {
                node: node.to_owned(),
                source,
            })
    }

    /// Closes `node`'s session unless it connected with one of `keys` (its record changed:
    /// revoked, reset, Node deleted). Returns whether a session was closed.
    pub fn close_unless_key(&self, node: &str, keys: &[String]) -> bool {
        let slot = {
            let nodes = self.hub.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes.get(node).cloned()
        };
        let Some(slot) = slot else { return false };
        let session = slot.session();
        match session.as_ref() {
            Some(s) if !keys.contains(&s.key) => {
                tracing::warn!(%node, session = s.id, "closing the session: its certificate is no longer the node's");
                s.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    pub fn is_connected(&self, node: &str) -> bool {
        let nodes = self.hub.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.get(node).is_some_and(|s| s.session().is_some())
    }

    pub fn connected_count(&self) -> usize {
        self.hub
            .connected
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn counters(&self) -> HubCounters {
        use std::sync::atomic::Ordering::Relaxed;
        HubCounters {
            acked: self.hub.acked.load(Relaxed),
            refused: self.hub.refused.load(Relaxed),
            sessions: self.hub.next_session.load(Relaxed).saturating_sub(1),
        }
    }

    /// Messages waiting to be sent or acked, all nodes together.
    pub fn outstanding_total(&self) -> usize {
        let slots: Vec<Arc<NodeSlot>> = {
            let nodes = self.hub.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes.values().cloned().collect()
        };
        slots.iter().map(|s| s.queue().outstanding()).sum()
    }

    /// See [`queue::NodeQueue::order_references_first`].
    pub fn order_references_first(&self, node: &str) {
        let slot = {
            let nodes = self.hub.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes.get(node).cloned()
        };
        if let Some(slot) = slot {
            slot.queue().order_references_first();
            slot.wake.notify_one();
        }
    }

    /// Messages waiting to be sent or acked for `node`.
    pub fn outstanding(&self, node: &str) -> usize {
        let nodes = self.hub.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.get(node).map_or(0, |s| s.queue().outstanding())
    }

    /// Drops the queues of nodes gone longer than `queue_retention`, every quarter of it (at
    /// most every 30 s), until `shutdown`.
    pub async fn sweep_queues(self, shutdown: CancellationToken) {
        let every = (self.hub.settings.queue_retention / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let dropped = self.hub.sweep(Instant::now());
            if dropped > 0 {
                tracing::debug!(dropped, "queues of nodes that left dropped");
            }
        }
    }

    /// What a node without an inventory acknowledged, as recorded in the cluster, stands in for
    /// its inventory: the queue takes it as what the node holds and starts sending (see
    /// [`HubSettings::await_ack_record`]).
    pub fn apply_ack_record(&self, node: &str, held: &HashMap<ObjectKey, String>) {
        if let Some(slot) = self.hub.existing_slot(node) {
            let applied = slot.queue().apply_inventory(held);
            slot.wake.notify_one();
            tracing::info!(%node, objects = held.len(), already_held = applied.already_held, to_send = applied.to_send, "acknowledgement record applied");
        }
    }

    /// The resourceVersion `node` last acked for `key`, as far as this process has seen.
    pub fn last_acked(&self, node: &str, key: &ObjectKey) -> Option<String> {
        let nodes = self.hub.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes
            .get(node)
            .and_then(|s| s.queue().last_acked(key).map(str::to_owned))
    }
}

/// The WebSocket side of CloudHub. Create with [`CloudHub::new`], then [`CloudHub::serve`].
pub struct CloudHub {
    hub: Arc<Hub>,
}

impl CloudHub {
    /// A hub whose upstream traffic goes to the returned receiver (bounded: a slow controller
    /// slows the nodes' readers down, nothing is dropped).
    /// `identities` says which certificates are their node's.
    pub fn new(
        settings: HubSettings,
        upstream_capacity: usize,
        identities: Arc<dyn NodeIdentities>,
    ) -> (Self, mpsc::Receiver<Upstream>) {
        let (tx, rx) = mpsc::channel(upstream_capacity);
        let hub = Arc::new(Hub {
            settings,
            identities,
            nodes: Mutex::new(HashMap::new()),
            upstream: tx,
            next_session: std::sync::atomic::AtomicU64::new(1),
            connected: std::sync::atomic::AtomicUsize::new(0),
            acked: std::sync::atomic::AtomicU64::new(0),
            refused: std::sync::atomic::AtomicU64::new(0),
        });
        (CloudHub { hub }, rx)
    }

    pub fn handle(&self) -> CloudHubHandle {
        CloudHubHandle {
            hub: self.hub.clone(),
        }
    }

    /// Binds the WebSocket listener.
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HubError> {
        TcpListener::bind(addr)
            .await
            .map_err(|source| HubError::Bind { addr, source })
    }

    /// Accepts connections until `shutdown` is cancelled. `tls` must require client
    /// certificates signed by the cloud CA ([`kedge_common::tls::ClientAuth::Required`]).
    pub async fn serve(self, listener: TcpListener, tls: TlsAcceptor, shutdown: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let hub = self.hub.clone();
            let tls = tls.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                if let Err(reason) = handle_connection(hub, tcp, tls, shutdown).await {
                    tracing::info!(%peer, %reason, "connection refused or ended");
                }
            });
        }
    }
}

/// Where and how to run CloudHub's two listeners.
#[derive(Debug, Clone)]
pub struct CloudHubOptions {
    pub websocket_addr: SocketAddr,
    /// `None`: no bootstrap endpoint (certificates are provisioned some other way).
    pub bootstrap_addr: Option<SocketAddr>,
    pub settings: HubSettings,
    /// Validity of node certificates signed at bootstrap.
    pub node_cert_validity: Duration,
    pub upstream_capacity: usize,
}

/// A started CloudHub: the handle for the controllers, the upstream channel and the bound
/// addresses (useful with port 0).
pub struct RunningCloudHub {
    pub handle: CloudHubHandle,
    pub upstream: mpsc::Receiver<Upstream>,
    pub websocket_addr: SocketAddr,
    pub bootstrap_addr: Option<SocketAddr>,
    pub tasks: tokio::task::JoinSet<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(transparent)]
    Certs(#[from] certs::CertError),
}

/// Binds both listeners and serves until `shutdown` is cancelled.
pub async fn start(
    pki: Arc<certs::CloudPki>,
    opts: CloudHubOptions,
    identities: Arc<dyn NodeIdentities>,
    shutdown: CancellationToken,
) -> Result<RunningCloudHub, StartError> {
    let ws_listener = CloudHub::bind(opts.websocket_addr).await?;
    let websocket_addr = ws_listener.local_addr().map_err(|source| HubError::Bind {
        addr: opts.websocket_addr,
        source,
    })?;
    let (hub, upstream) = CloudHub::new(opts.settings, opts.upstream_capacity, identities.clone());
    let handle = hub.handle();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(handle.clone().sweep_queues(shutdown.clone()));
    let ws_tls = pki.websocket_acceptor()?;
    tasks.spawn(hub.serve(ws_listener, ws_tls, shutdown.clone()));
    let mut bootstrap_addr = None;
    if let Some(addr) = opts.bootstrap_addr {
        let listener = CloudHub::bind(addr).await?;
        bootstrap_addr = Some(
            listener
                .local_addr()
                .map_err(|source| HubError::Bind { addr, source })?,
        );
        let tls = pki.bootstrap_acceptor()?;
        let server = bootstrap::Bootstrap::new(pki.clone(), opts.node_cert_validity, identities);
        tasks.spawn(server.serve(listener, tls, shutdown.clone()));
    }
    Ok(RunningCloudHub {
        handle,
        upstream,
        websocket_addr,
        bootstrap_addr,
        tasks,
    })
}

/// Parses `/<project>/<node>/events`.
fn node_from_path(path: &str) -> Option<&str> {
    let mut parts = path.trim_start_matches('/').split('/');
    let (_project, node, events) = (parts.next()?, parts.next()?, parts.next()?);
    (events == "events" && parts.next().is_none()).then_some(node)
}

fn refuse(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(why.to_owned()));
    *r.status_mut() = status;
    r
}

async fn handle_connection(
    hub: Arc<Hub>,
    tcp: TcpStream,
    tls: TlsAcceptor,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let timeout = hub.settings.handshake_timeout;
    let tls_stream = tokio::time::timeout(timeout, tls.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_owned())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let (cert_node, key) = {
        let (_, conn) = tls_stream.get_ref();
        let der = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("no client certificate")?;
        let node = kedge_common::pki::node_name_from_cert(der)
            .map_err(|e| format!("client certificate does not name a node: {e}"))?;
        let key =
            kedge_common::pki::cert_key_id(der).map_err(|e| format!("client certificate: {e}"))?;
        (node, key)
    };
    if kedge_common::resource::validate_node_name(&cert_node).is_err() {
        return Err(format!("certificate names an invalid node `{cert_node}`"));
    }
    // Answered in the handshake, so the edge logs why.
    let admission = hub.identities.admit(&cert_node, &key).await;
    if let Err(refusal) = &admission {
        tracing::warn!(node = %cert_node, reason = %refusal, "connection refused");
    }
    let at_limit =
        hub.connected.load(std::sync::atomic::Ordering::Relaxed) >= hub.settings.node_limit;
    let expected = cert_node.clone();
    let offers_inventory = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let offered = offers_inventory.clone();
    let speaks_kedge = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kedge_peer = speaks_kedge.clone();
    let mut reserve = Some(hub.clone());
    // The callback's signature is tungstenite's; its error type is an HTTP response.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let Some(url_node) = node_from_path(req.uri().path()) else {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                "path must be /<project>/<node>/events",
            ));
        };
        if url_node != expected {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "URL node does not match the client certificate",
            ));
        }
        if let Err(refusal) = &admission {
            let status =
                StatusCode::from_u16(refusal.status().as_u16()).unwrap_or(StatusCode::FORBIDDEN);
            return Err(refuse(status, &refusal.to_string()));
        }
        if let Some(h) = req.headers().get("node_id")
            && h.as_bytes() != expected.as_bytes()
        {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "node_id header does not match the client certificate",
            ));
        }
        if at_limit {
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "node limit reached",
            ));
        }
        // Before the edge learns it is connected, so that nothing queued for it from then on
        // is dropped as "not connected here".
        drop(reserve.take().map(|hub| hub.take_slot(&expected)));
        if req.headers().get(inventory::PROTOCOL_HEADER).is_some() {
            kedge_peer.store(true, std::sync::atomic::Ordering::Relaxed);
            // So our edge knows it talks to our cloud, not KubeEdge's.
            resp.headers_mut().insert(
                inventory::PROTOCOL_HEADER,
                tokio_tungstenite::tungstenite::http::HeaderValue::from_static(
                    inventory::PROTOCOL_VERSION,
                ),
            );
        }
        if req
            .headers()
            .get(inventory::HEADER)
            .is_some_and(|v| v.as_bytes() == inventory::VERSION.as_bytes())
        {
            resp.headers_mut().insert(
                inventory::HEADER,
                tokio_tungstenite::tungstenite::http::HeaderValue::from_static(inventory::VERSION),
            );
            offered.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(resp)
    };
    let ws = tokio::time::timeout(
        timeout,
        tokio_tungstenite::accept_hdr_async_with_config(
            tls_stream,
            callback,
            Some(hub.settings.codec.websocket_config()),
        ),
    )
    .await
    .map_err(|_| "WebSocket handshake timed out".to_owned())
    .and_then(|r| r.map_err(|e| format!("WebSocket handshake for {cert_node} refused: {e}")));
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            hub.leave_slot(&cert_node, Instant::now());
            return Err(e);
        }
    };

    let inventory = offers_inventory.load(std::sync::atomic::Ordering::Relaxed);
    let kubeedge = !speaks_kedge.load(std::sync::atomic::Ordering::Relaxed);
    run_session(hub, cert_node, key, ws, inventory, kubeedge, shutdown).await
}

async fn run_session<S>(
    hub: Arc<Hub>,
    node: String,
    key: String,
    ws: tokio_tungstenite::WebSocketStream<S>,
    inventory: bool,
    kubeedge: bool,
    shutdown: CancellationToken,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let slot = hub.take_slot(&node);
    let session_id = hub
        .next_session
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let cancel = shutdown.child_token();
    let replaced = slot.session().replace(CurrentSession {
        id: session_id,
        cancel: cancel.clone(),
        key,
    });
    match replaced {
        Some(old) => {
            tracing::info!(%node, old_session = old.id, session = session_id, "new connection replaces the old session");
            old.cancel.cancel();
        }
        None => {
            hub.connected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    slot.queue()
        .session_started(Instant::now(), inventory || hub.settings.await_ack_record);
    slot.wake.notify_one();
    // Tell the controllers; await so that Connected is ordered before this node's messages.
    let _ = hub
        .upstream
        .send(Upstream::Connected {
            node: node.clone(),
            inventory,
            kubeedge,
        })
        .await;
    tracing::info!(%node, session = session_id, inventory, kubeedge, "edge node connected");

    // Only our edge serves streams (it announced kedge's protocol).
    let (mux, stream_out) = if kubeedge {
        (None, None)
    } else {
        let (mux, out) = Mux::new(stream::OUTGOING_QUEUE);
        *slot.streams() = Some(mux.clone());
        (Some(mux), Some(out))
    };
    let mut session = Session {
        id: session_id,
        inventory: inventory.then(|| inventory::Assembler::new(hub.settings.queue.max_objects)),
        inventory_started: None,
        mux: mux.clone(),
    };
    let result = session_loop(
        &hub,
        slot.clone(),
        &node,
        ws,
        &mut session,
        stream_out,
        &cancel,
    )
    .await;
    if let Some(mux) = &mux {
        mux.close(&format!("the link to node {node} closed"));
    }

    // Only the newest session unregisters; a replaced one just goes away.
    let was_current = {
        let mut current = slot.session();
        if current.as_ref().is_some_and(|s| s.id == session_id) {
            *current = None;
            *slot.streams() = None;
            true
        } else {
            false
        }
    };
    if was_current {
        hub.leave_slot(&node, Instant::now());
    }
    if was_current {
        hub.connected
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let _ = hub
            .upstream
            .send(Upstream::Disconnected { node: node.clone() })
            .await;
        tracing::info!(%node, session = session_id, "edge node disconnected");
    }
    result
}

/// Per-session state of the reading side.
struct Session {
    id: u64,
    /// Collects the inventory's chunks; `None` when the session negotiated none.
    inventory: Option<inventory::Assembler>,
    /// When the first chunk arrived (for the log line that says how long the exchange took).
    inventory_started: Option<Instant>,
    /// Streams of this session (kedge edges only).
    mux: Option<Mux>,
}

async fn session_loop<S>(
    hub: &Hub,
    slot: Arc<NodeSlot>,
    node: &str,
    ws: tokio_tungstenite::WebSocketStream<S>,
    session: &mut Session,
    mut stream_out: Option<mpsc::Receiver<StreamFrame>>,
    cancel: &CancellationToken,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let codec = hub.settings.codec;
    let keepalive = hub.settings.keepalive_timeout;
    let write_timeout = hub.settings.write_timeout;
    let mut last_heard = Instant::now();
    loop {
        // Write everything that is due now.
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let next = slot.queue().next_to_send(Instant::now());
            let Some(msg) = next else { break };
            let frame = match codec.encode(&msg) {
                Ok(f) => f,
                Err(e) => {
                    // Too big for the wire: say so loudly. It stays queued and is retried with
                    // backoff, so a newer (smaller) version replaces it; nothing is dropped.
                    tracing::error!(%node, resource = %msg.route.resource, error = %e, "message cannot be sent");
                    slot.queue().nack(&msg.header.id, Instant::now());
                    continue;
                }
            };
            within(write_timeout, node, sink.feed(frame)).await?;
        }
        within(write_timeout, node, sink.flush()).await?;

        let retry_at = slot.queue().next_deadline();
        let keepalive_deadline = last_heard + keepalive;
        let wake_at = retry_at.map_or(keepalive_deadline, |r| r.min(keepalive_deadline));
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = within(write_timeout, node, sink.send(close_frame(CloseCode::Away, "session replaced or server stopping"))).await;
                return Ok(());
            }
            _ = slot.wake.notified() => {}
            Some(frame) = stream::next_outgoing(&mut stream_out) => {
                // Object messages (written at the top of the loop) go first; streams get a
                // bounded turn, so a busy `logs -f` delays them by at most a few frames.
                let mut frame = Some(frame);
                let mut written = 0;
                while let Some(f) = frame.take() {
                    within(write_timeout, node, sink.feed(encode_stream(&f))).await?;
                    written += 1;
                    if written < stream::FRAMES_PER_TURN {
                        frame = stream_out.as_mut().and_then(|rx| rx.try_recv().ok());
                    }
                }
            }
            _ = tokio::time::sleep_until(wake_at.into()) => {
                if Instant::now() >= last_heard + keepalive {
                    let _ = within(write_timeout, node, sink.send(close_frame(CloseCode::Policy, "keepalive timeout"))).await;
                    return Err(format!("{node} sent nothing for {keepalive:?}"));
                }
            }
            frame = stream.next() => {
                let frame = match frame {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(format!("read from {node} failed: {e}")),
                    Some(Ok(f)) => f,
                };
                last_heard = Instant::now();
                match codec.decode(frame) {
                    Ok(Incoming::Message(msg)) if inventory::is_inventory(&msg) => {
                        if let Err(e) = handle_inventory(hub, &slot, node, session, &msg).await {
                            let _ = within(write_timeout, node, sink.send(close_frame(CloseCode::Invalid, "malformed inventory"))).await;
                            return Err(format!("inventory from {node}: {e}"));
                        }
                    }
                    Ok(Incoming::Message(msg)) => handle_incoming(hub, &slot, node, *msg).await?,
                    Ok(Incoming::Stream(frame)) => match &session.mux {
                        // The cloud opens streams, never the edge: one it tries is reset when
                        // the returned stream is dropped here.
                        Some(mux) => drop(mux.dispatch(frame)),
                        None => tracing::debug!(%node, "stream frame on a session without streams; ignored"),
                    },
                    Ok(Incoming::Control) => {}
                    Ok(Incoming::Close(_)) => return Ok(()),
                    Err(e) => {
                        let _ = within(write_timeout, node, sink.send(close_frame(CloseCode::Invalid, "malformed message"))).await;
                        return Err(format!("malformed frame from {node}: {e}"));
                    }
                }
            }
        }
    }
}

/// One write to a node, within `timeout` (see [`HubSettings::write_timeout`]).
async fn within<F>(timeout: Duration, node: &str, write: F) -> Result<(), String>
where
    F: std::future::Future<Output = Result<(), tokio_tungstenite::tungstenite::Error>>,
{
    match tokio::time::timeout(timeout, write).await {
        Ok(result) => result.map_err(|e| format!("write to {node} failed: {e}")),
        Err(_) => Err(format!(
            "a write to {node} took longer than {timeout:?} (writeTimeout); the node stopped reading"
        )),
    }
}

fn close_frame(code: CloseCode, reason: &'static str) -> tokio_tungstenite::tungstenite::Message {
    tokio_tungstenite::tungstenite::Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// Adds one inventory chunk; once complete, applies it to the node's queue (which resumes
/// sending exactly what the node lacks) and hands it to the controllers.
async fn handle_inventory(
    hub: &Hub,
    slot: &Arc<NodeSlot>,
    node: &str,
    session: &mut Session,
    msg: &Message,
) -> Result<(), inventory::InventoryError> {
    let Some(assembler) = session.inventory.as_mut() else {
        tracing::warn!(%node, "inventory chunk on a session that negotiated none; ignored");
        return Ok(());
    };
    let started = *session.inventory_started.get_or_insert_with(Instant::now);
    let chunk = inventory::decode(msg)?;
    let assembled = assembler.push(chunk)?;
    // A session that was replaced meanwhile must not release the new one's hold: the new
    // session's edge sends its own inventory.
    let current = slot.session().as_ref().is_some_and(|s| s.id == session.id);
    if assembled.is_some() && !current {
        tracing::debug!(%node, "inventory of a replaced session ignored");
        return Ok(());
    }
    match assembled {
        None => {}
        Some(inventory::Inventory::Unavailable(reason)) => {
            tracing::warn!(%node, %reason, "the edge cannot tell what it holds; sending from what its acks said");
            slot.queue().release();
            slot.wake.notify_one();
            session.inventory_started = None;
        }
        Some(inventory::Inventory::Complete(objects)) => {
            let count = objects.len();
            let held: HashMap<ObjectKey, String> = objects
                .into_iter()
                .map(|i| {
                    (
                        ObjectKey {
                            kind: i.kind,
                            namespace: i.namespace,
                            name: i.name,
                            uid: i.uid,
                        },
                        i.resource_version,
                    )
                })
                .collect();
            let applied = slot.queue().apply_inventory(&held);
            slot.wake.notify_one();
            tracing::info!(%node, objects = count, already_held = applied.already_held,
                to_send = applied.to_send, missing = applied.missing,
                elapsed = ?started.elapsed(), "inventory applied");
            session.inventory_started = None;
            let _ = hub
                .upstream
                .send(Upstream::Inventory {
                    node: node.to_owned(),
                    held,
                })
                .await;
        }
    }
    Ok(())
}

async fn handle_incoming(
    hub: &Hub,
    slot: &Arc<NodeSlot>,
    node: &str,
    mut msg: Message,
) -> Result<(), String> {
    if msg.route.operation == Operation::Keepalive {
        return Ok(());
    }
    if !msg.header.parent_id.is_empty() {
        match msg.route.operation {
            Operation::Response => {
                let acked = slot.queue().ack(&msg.header.parent_id);
                if let Some(acked) = acked {
                    if acked.key.kind == "pod" {
                        queue::pod_path(
                            node,
                            &acked.key,
                            &acked.resource_version,
                            "3 acked by the node",
                        );
                    }
                    hub.acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    slot.wake.notify_one();
                    let _ = hub
                        .upstream
                        .send(Upstream::Acked {
                            node: node.to_owned(),
                            acked,
                        })
                        .await;
                }
                return Ok(());
            }
            Operation::Error => {
                tracing::warn!(%node, parent = %msg.header.parent_id, content = %msg.content, "edge refused a message");
                hub.refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                slot.queue().nack(&msg.header.parent_id, Instant::now());
                return Ok(());
            }
            _ => {}
        }
    }
    // A sync message (our edge's durable outbox) is acked once the controllers processed it.
    let (ack, answer) = if msg.header.sync {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (ReportAck(Some(tx)), Some(rx))
    } else {
        (ReportAck::none(), None)
    };
    let response = answer
        .as_ref()
        .map(|_| msg.response(kedge_common::message::module::CLOUD_HUB, "OK".into()));
    // Everything else goes up, tagged with the session's node: the edge cannot name another.
    let path = msg
        .edge_resource()
        .map_err(|e| format!("bad resource from {node}: {e}"))?;
    let cloud = path
        .with_node(node)
        .map_err(|e| format!("bad node name {node}: {e}"))?;
    msg.route.resource = cloud.to_string();
    hub.upstream
        .send(Upstream::Message {
            node: node.to_owned(),
            message: Box::new(msg),
            ack,
        })
        .await
        .map_err(|_| "controllers stopped".to_owned())?;
    if let (Some(rx), Some(mut response)) = (answer, response) {
        let slot = slot.clone();
        let node = node.to_owned();
        tokio::spawn(async move {
            if !rx.await.unwrap_or(true) {
                response.route.operation = Operation::Error;
                response.content = "not processed; send it again later".into();
            }
            if let Err(e) = slot.queue().push(None, response) {
                tracing::warn!(%node, error = %e, "cannot queue a report ack; the edge will send it again");
            }
            slot.wake.notify_one();
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_from_path_accepts_only_the_events_path() {
        assert_eq!(
            node_from_path("/e632aba927ea4ac2b575ec1603d56f10/edge-1/events"),
            Some("edge-1")
        );
        assert_eq!(node_from_path("/p/edge-1/events/x"), None);
        assert_eq!(node_from_path("/p/edge-1"), None);
        assert_eq!(node_from_path("/p/edge-1/other"), None);
    }
}

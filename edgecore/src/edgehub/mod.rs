//! EdgeHub: the edge end of the cloud–edge link.
//!
//! - Connects to `wss://<server>/<project>/<node>/events` with the node's certificate, sends a
//!   keepalive every heartbeat, and reconnects with exponential backoff and jitter capped at
//!   2 s, so a node is back within about 2 s of the cloud becoming reachable (KubeEdge's edgecore
//!   waits for two heartbeats after five failures, 16–17 s here). A cloud that refuses the node
//!   (HTTP 4xx in the handshake: certificate revoked, Node deleted) is asked again from 5 s up
//!   to a minute, and the reason is logged once as a warning.
//! - `resource` messages go to the [`ObjectStore`]; the ack (`response`, content "OK") is sent
//!   only after the store has them.
//! - Upstream reports wait in the [`Outbox`] and are sent in order whenever the link is up, each
//!   with `sync: true`, and removed only when the cloud acknowledges them.
//! - Link changes are published on a `watch` channel ([`LinkState`]) for the other modules.
//! - A session starts with the node's inventory (every live object it holds; see
//!   [`kedge_common::inventory`]) when the cloud accepts one, so the cloud sends exactly what is
//!   missing or stale and deletes what the node should no longer hold — acks lost in a crash or a
//!   cut cannot leave orphans behind.
//! - Requests that need the cloud's answer (a service account token) go through a
//!   [`CloudRequester`]: sent at once while connected, answered by the cloud's `response` with the
//!   request's id as `parent_msg_id`. They are not kept across disconnects: an offline caller gets
//!   an error at once and decides what to keep using (the last token, until it expires).

pub mod credentials;
pub mod outbox;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use kedge_common::backoff::Backoff;
use kedge_common::inventory;
use kedge_common::message::{group, module};
use kedge_common::stream::{self, Mux, Stream, StreamRequest};
use kedge_common::wire::{Incoming, WireCodec, encode_stream};
use kedge_common::{Message, Operation};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util::sync::CancellationToken;

use crate::metamanager::store::ObjectStore;
use credentials::NodeCredentials;
use outbox::Outbox;

/// Whether the cloud link is up (KubeEdge's `cloud_connected` / `cloud_disconnected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Connected,
    Disconnected,
}

/// Which cloudcore the link talks to, learnt at each connect (docs/kubeedge-protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudKind {
    /// Ours: it answered the `kedge-protocol` header.
    Kedge,
    /// KubeEdge's (or anything else that did not answer it): the edge registers its Node and
    /// renews its Lease itself.
    KubeEdge,
}

#[derive(Debug, Clone)]
pub struct EdgeHubSettings {
    /// `host:port` of cloudcore's WebSocket listener.
    pub server: String,
    pub project_id: String,
    pub node: String,
    pub heartbeat: Duration,
    /// How long after a keepalive is due the cloud may stay silent before the link counts as
    /// dead (`edgeHub.websocket.readDeadline`).
    pub read_deadline: Duration,
    /// The longest one write to the link may take (`edgeHub.websocket.writeDeadline`).
    pub write_deadline: Duration,
    pub codec: WireCodec,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Offer the cloud an inventory at the start of each session (off only to behave like a
    /// KubeEdge edge in tests).
    pub inventory: bool,
    /// Announce kedge's conversation (`kedge-protocol` header). `false` makes this edge look
    /// like a KubeEdge edgecore to our cloud (the KubeEdge side of interop tests).
    pub announce_protocol: bool,
}

impl EdgeHubSettings {
    pub fn new(server: impl Into<String>, node: impl Into<String>) -> Self {
        EdgeHubSettings {
            server: server.into(),
            project_id: crate::config::DEFAULT_PROJECT_ID.to_owned(),
            node: node.into(),
            heartbeat: Duration::from_secs(15),
            read_deadline: Duration::from_secs(20),
            write_deadline: Duration::from_secs(15),
            codec: WireCodec::default(),
            connect_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(2),
            inventory: true,
            announce_protocol: true,
        }
    }
}

/// Inventory chunks stay this small although a frame may be larger: each write to the link
/// must finish within `writeDeadline`, and 256 KiB does on a link of 140 kbit/s.
const INVENTORY_CHUNK_BYTES: usize = 256 * 1024;

/// Back-off after the cloud refused this node: from 5 s up to a minute.
const REFUSED_BACKOFF_INITIAL: Duration = Duration::from_secs(5);
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connecting to {server}: {reason}")]
    Connect { server: String, reason: String },
    /// The cloud answered the handshake with a 4xx: it will not take this node as it is (its
    /// certificate revoked, its Node deleted, …) until an administrator acts.
    #[error("the cloud at {server} refused this node (HTTP {status}): {reason}")]
    Refused {
        server: String,
        status: u16,
        reason: String,
    },
    #[error("link lost: {0}")]
    Lost(String),
    #[error("cloud sent a malformed frame: {0}")]
    Malformed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the cloud is not connected")]
    Offline,
    #[error("the cloud link closed before the cloud answered")]
    LinkLost,
    #[error("the cloud did not answer within {0:?}")]
    Timeout(Duration),
}

/// A request waiting to be sent, with where its answer goes.
struct PendingRequest {
    message: Message,
    reply: oneshot::Sender<Message>,
}

/// Sends requests to the cloud and waits for their answers (see the module docs).
#[derive(Clone)]
pub struct CloudRequester {
    tx: mpsc::Sender<PendingRequest>,
    link: watch::Receiver<LinkState>,
}

impl CloudRequester {
    /// Sends `message` and returns the cloud's answer (a `response` or `error` message).
    pub async fn request(
        &self,
        message: Message,
        timeout: Duration,
    ) -> Result<Message, RequestError> {
        if *self.link.borrow() != LinkState::Connected {
            return Err(RequestError::Offline);
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(PendingRequest { message, reply })
            .await
            .map_err(|_| RequestError::LinkLost)?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(_)) => Err(RequestError::LinkLost),
            Err(_) => Err(RequestError::Timeout(timeout)),
        }
    }
}

pub struct EdgeHub<S: ObjectStore, O: Outbox> {
    settings: EdgeHubSettings,
    credentials: Arc<RwLock<NodeCredentials>>,
    store: Arc<S>,
    outbox: Arc<O>,
    link: watch::Sender<LinkState>,
    cloud: watch::Sender<CloudKind>,
    request_tx: mpsc::Sender<PendingRequest>,
    requests: std::sync::Mutex<Option<mpsc::Receiver<PendingRequest>>>,
    /// Modules other than MetaManager, by message group (`twin`, `user` → DeviceTwin/EventBus).
    groups: HashMap<String, mpsc::Sender<Message>>,
    /// Where streams the cloud opens go (edged's stream server); `None`: they are refused.
    streams: Option<mpsc::Sender<(Stream, StreamRequest)>>,
}

impl<S: ObjectStore, O: Outbox> EdgeHub<S, O> {
    pub fn new(
        settings: EdgeHubSettings,
        credentials: Arc<RwLock<NodeCredentials>>,
        store: Arc<S>,
        outbox: Arc<O>,
    ) -> Self {
        let (request_tx, requests) = mpsc::channel(64);
        EdgeHub {
            settings,
            credentials,
            store,
            outbox,
            link: watch::channel(LinkState::Disconnected).0,
            cloud: watch::channel(CloudKind::Kedge).0,
            request_tx,
            requests: std::sync::Mutex::new(Some(requests)),
            groups: HashMap::new(),
            streams: None,
        }
    }

    /// Follow link changes.
    pub fn link_state(&self) -> watch::Receiver<LinkState> {
        self.link.subscribe()
    }

    /// Which cloudcore the current (or last) connection talks to; set before the link state
    /// turns `Connected`.
    pub fn cloud_kind(&self) -> watch::Receiver<CloudKind> {
        self.cloud.subscribe()
    }

    /// Hands cloud messages of `group` to another module instead of MetaManager.
    pub fn with_group(mut self, group: &str, tx: mpsc::Sender<Message>) -> Self {
        self.groups.insert(group.to_owned(), tx);
        self
    }

    /// Hands streams the cloud opens (kubectl logs/exec/attach/port-forward) to `tx`.
    pub fn with_streams(mut self, tx: mpsc::Sender<(Stream, StreamRequest)>) -> Self {
        self.streams = Some(tx);
        self
    }

    /// A handle for requests that wait for the cloud's answer.
    pub fn requester(&self) -> CloudRequester {
        CloudRequester {
            tx: self.request_tx.clone(),
            link: self.link.subscribe(),
        }
    }

    /// Keeps the link up until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let taken = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // `run` consumes the hub, so this is its only call.
        let Some(mut requests) = taken else {
            return;
        };
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        // A refusal stands until an administrator acts (`cloudcore node reset`, a new join):
        // asking again every 2 s would only load the cloud, so refusals back off to a minute.
        let mut refused_backoff = Backoff::new(REFUSED_BACKOFF_INITIAL, REFUSED_BACKOFF_MAX);
        // The last failure logged as a warning; repeats go to debug, so a node that cannot
        // reach the cloud says so once, not every 2 s.
        let mut last_failure: Option<String> = None;
        while !shutdown.is_cancelled() {
            let mut refused = false;
            match self.connect().await {
                Ok((ws, inventory, kind)) => {
                    backoff.reset();
                    refused_backoff.reset();
                    last_failure = None;
                    self.cloud.send_replace(kind);
                    self.link.send_replace(LinkState::Connected);
                    tracing::info!(server = %self.settings.server, node = %self.settings.node, inventory, "connected to the cloud");
                    let result = self
                        .session(ws, inventory, kind, &mut requests, &shutdown)
                        .await;
                    self.link.send_replace(LinkState::Disconnected);
                    match result {
                        Ok(()) => tracing::info!("cloud link closed"),
                        Err(e) => tracing::warn!(error = %e, "cloud link lost"),
                    }
                }
                Err(e) => {
                    refused = matches!(e, LinkError::Refused { .. });
                    let text = e.to_string();
                    if last_failure.as_deref() == Some(text.as_str()) {
                        tracing::debug!(error = %text, "cannot connect to the cloud");
                    } else {
                        tracing::warn!(error = %text, "cannot connect to the cloud; retrying");
                        last_failure = Some(text);
                    }
                }
            }
            let delay = if refused {
                refused_backoff.next_delay()
            } else {
                refused_backoff.reset();
                backoff.next_delay()
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn connect(
        &self,
    ) -> Result<
        (
            tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>,
            bool,
            CloudKind,
        ),
        LinkError,
    > {
        let s = &self.settings;
        let fail = |reason: String| LinkError::Connect {
            server: s.server.clone(),
            reason,
        };
        let tls_config = {
            let creds = self.credentials.read().unwrap_or_else(|p| p.into_inner());
            creds.client_config().map_err(|e| fail(e.to_string()))?
        };
        let (host, _port) = s
            .server
            .rsplit_once(':')
            .ok_or_else(|| fail("server is not host:port".into()))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tcp = tokio::time::timeout(s.connect_timeout, TcpStream::connect(&s.server))
            .await
            .map_err(|_| {
                fail(format!(
                    "TCP connect timed out after {:?}",
                    s.connect_timeout
                ))
            })?
            .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(host).map_err(|e| fail(e.to_string()))?;
        let handshake = async {
            let tls = tokio_rustls::TlsConnector::from(tls_config)
                .connect(name, tcp)
                .await
                .map_err(|e| fail(format!("TLS: {e}")))?;
            let url = format!("wss://{}/{}/{}/events", s.server, s.project_id, s.node);
            let mut req = url.into_client_request().map_err(|e| fail(e.to_string()))?;
            let headers = req.headers_mut();
            for (k, v) in [("node_id", &s.node), ("project_id", &s.project_id)] {
                headers.insert(
                    k,
                    HeaderValue::from_str(v).map_err(|e| fail(e.to_string()))?,
                );
            }
            // KubeEdge's cloudhub reads no frame from a connection without `ConnectionUse: msg`;
            // ours learns from `kedge-protocol` that this edge speaks kedge's conversation.
            headers.insert("connectionuse", HeaderValue::from_static("msg"));
            if s.announce_protocol {
                headers.insert(
                    inventory::PROTOCOL_HEADER,
                    HeaderValue::from_static(inventory::PROTOCOL_VERSION),
                );
            }
            if s.inventory {
                headers.insert(
                    inventory::HEADER,
                    HeaderValue::from_static(inventory::VERSION),
                );
            }
            let (ws, resp) = tokio_tungstenite::client_async_with_config(
                req,
                tls,
                Some(s.codec.websocket_config()),
            )
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(resp)
                    if resp.status().is_client_error() =>
                {
                    LinkError::Refused {
                        server: s.server.clone(),
                        status: resp.status().as_u16(),
                        reason: resp
                            .body()
                            .as_deref()
                            .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                            .unwrap_or_default(),
                    }
                }
                other => fail(format!("WebSocket: {other}")),
            })?;
            let kind = if resp.headers().get(inventory::PROTOCOL_HEADER).is_some() {
                CloudKind::Kedge
            } else {
                // KubeEdge's cloudcore: the edge registers its Node, renews its Lease, asks for
                // what its pods use and reports as KubeEdge's edge does
                // (docs/kubeedge-protocol.md).
                tracing::info!(server = %s.server, "the cloud is not a kedge cloudcore (no kedge-protocol header): \
                    speaking KubeEdge's conversation");
                CloudKind::KubeEdge
            };
            // A cloud that does not answer the offer (KubeEdge's) gets no inventory.
            let accepted = s.inventory
                && resp
                    .headers()
                    .get(inventory::HEADER)
                    .is_some_and(|v| v.as_bytes() == inventory::VERSION.as_bytes());
            Ok((ws, accepted, kind))
        };
        tokio::time::timeout(s.handshake_timeout, handshake)
            .await
            .map_err(|_| fail("handshake timed out".into()))?
    }

    async fn session<T>(
        &self,
        ws: tokio_tungstenite::WebSocketStream<T>,
        send_inventory: bool,
        cloud: CloudKind,
        requests: &mut mpsc::Receiver<PendingRequest>,
        shutdown: &CancellationToken,
    ) -> Result<(), LinkError>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let codec = self.settings.codec;
        let heartbeat = self.settings.heartbeat;
        let write_deadline = self.settings.write_deadline;
        // The cloud answers our pings at once; nothing heard for `readDeadline` after a
        // keepalive was due means the link is dead.
        let silence_limit = heartbeat + self.settings.read_deadline;
        let (mut sink, mut stream) = ws.split();
        let mut ticker = tokio::time::interval(heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut outbox_changes = self.outbox.subscribe();
        // msg_id -> (outbox key, seq) of reports waiting for the cloud's ack.
        let mut reports = Reports::default();
        let mut last_heard = Instant::now();
        // Acks waiting for the store to commit. Stores apply in call order, so awaiting many at
        // once keeps the order and lets the store group-commit.
        let mut pending_acks: FuturesUnordered<PendingAck> = FuturesUnordered::new();
        // Read the outbox at the start of a session and whenever something was put, not on
        // every frame (it is a database query).
        let mut outbox_dirty = true;
        // Requests sent on this session, by msg_id; dropped (callers see `LinkLost`) when it ends.
        let mut awaiting_replies: HashMap<String, oneshot::Sender<Message>> = HashMap::new();
        // Streams exist only with our cloud; they end with the session.
        let (mux, mut stream_out) = match cloud {
            CloudKind::Kedge => {
                let (mux, out) = Mux::new(stream::OUTGOING_QUEUE);
                (Some(mux), Some(out))
            }
            CloudKind::KubeEdge => (None, None),
        };
        let _close_streams = CloseStreams(mux.clone());

        if send_inventory {
            // First, before anything this session delivers: the cloud holds what it would send
            // until it has this.
            for msg in self.inventory_messages().await {
                let frame = codec
                    .encode(&msg)
                    .map_err(|e| LinkError::Lost(e.to_string()))?;
                within(write_deadline, sink.feed(frame)).await?;
            }
            within(write_deadline, sink.flush()).await?;
        }

        loop {
            // Send outbox entries not yet sent on this session, oldest first.
            let pending = if outbox_dirty {
                outbox_dirty = false;
                self.outbox
                    .pending_after(reports.sent_up_to)
                    .await
                    .map_err(|e| LinkError::Lost(format!("outbox: {e}")))?
            } else {
                Vec::new()
            };
            if !pending.is_empty() {
                for entry in pending {
                    let msg = match cloud {
                        CloudKind::Kedge => {
                            let mut msg = entry.message;
                            msg.header.sync = true;
                            msg
                        }
                        // KubeEdge's cloud answers every request it handles; that answer is
                        // the report's ack.
                        CloudKind::KubeEdge => as_kubeedge_report(entry.message),
                    };
                    let frame = match codec.encode(&msg) {
                        Ok(f) => f,
                        Err(e) => {
                            // It can never be sent; ending the session would only repeat this
                            // forever. It stays in the outbox (a newer report replaces it).
                            tracing::error!(key = %entry.key, error = %e, "report too large to send; kept in the outbox");
                            reports.skipped(entry.seq);
                            continue;
                        }
                    };
                    reports.sent(msg.header.id.clone(), entry.key, entry.seq);
                    within(write_deadline, sink.feed(frame)).await?;
                }
                within(write_deadline, sink.flush()).await?;
            }

            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = within(write_deadline, sink.close()).await;
                    return Ok(());
                }
                _ = ticker.tick() => {
                    awaiting_replies.retain(|_, r| !r.is_closed());
                    if reports.due(Instant::now(), REPORT_ACK_TIMEOUT) {
                        outbox_dirty = true;
                    }
                    if last_heard.elapsed() > silence_limit {
                        return Err(LinkError::Lost(format!("nothing from the cloud for {silence_limit:?}")));
                    }
                    let ka = codec.encode(&Message::keepalive()).map_err(|e| LinkError::Lost(e.to_string()))?;
                    within(write_deadline, sink.feed(ka)).await?;
                    within(write_deadline, sink.send(tokio_tungstenite::tungstenite::Message::Ping(Default::default()))).await?;
                }
                changed = outbox_changes.changed() => {
                    if changed.is_err() {
                        return Err(LinkError::Lost("outbox closed".into()));
                    }
                    outbox_dirty = true;
                }
                Some(frame) = stream::next_outgoing(&mut stream_out) => {
                    // Reports (written at the top of the loop) and acks go first; streams get
                    // a bounded turn.
                    let mut frame = Some(frame);
                    let mut written = 0;
                    while let Some(f) = frame.take() {
                        within(write_deadline, sink.feed(encode_stream(&f))).await?;
                        written += 1;
                        if written < stream::FRAMES_PER_TURN {
                            frame = stream_out.as_mut().and_then(|rx| rx.try_recv().ok());
                        }
                    }
                    within(write_deadline, sink.flush()).await?;
                }
                Some(req) = requests.recv() => {
                    // A caller that gave up while the link was down is not asked for again.
                    if req.reply.is_closed() {
                        continue;
                    }
                    let frame = match codec.encode(&req.message) {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::error!(resource = %req.message.route.resource, error = %e, "cannot encode a request");
                            continue;
                        }
                    };
                    awaiting_replies.insert(req.message.header.id.clone(), req.reply);
                    within(write_deadline, sink.send(frame)).await?;
                }
                Some(ack) = pending_acks.next(), if !pending_acks.is_empty() => {
                    // One group commit completes many acks at once: write them in one flush.
                    let mut ready = vec![ack];
                    while let Some(Some(more)) = pending_acks.next().now_or_never() {
                        ready.push(more);
                    }
                    for ack in ready {
                        let frame = codec.encode(&ack).map_err(|e| LinkError::Lost(e.to_string()))?;
                        within(write_deadline, sink.feed(frame)).await?;
                    }
                    within(write_deadline, sink.flush()).await?;
                }
                frame = stream.next(), if pending_acks.len() < MAX_PENDING_ACKS => {
                    let frame = match frame {
                        None => return Ok(()),
                        Some(Err(e)) => return Err(LinkError::Lost(e.to_string())),
                        Some(Ok(f)) => f,
                    };
                    last_heard = Instant::now();
                    let msg = match codec.decode(frame) {
                        Ok(Incoming::Message(m)) => *m,
                        Ok(Incoming::Stream(f)) => {
                            let opened = mux.as_ref().and_then(|m| m.dispatch(f));
                            if let Some((stream, request)) = opened {
                                // Dropping a stream resets it: the cloud answers its caller.
                                match &self.streams {
                                    Some(tx) => {
                                        if let Err(e) = tx.try_send((stream, request)) {
                                            tracing::warn!(error = %e, "stream refused: the stream server is busy or stopped");
                                        }
                                    }
                                    None => tracing::warn!(target = %request.target, "stream refused: this edge serves none"),
                                }
                            }
                            continue;
                        }
                        Ok(Incoming::Control) => continue,
                        Ok(Incoming::Close(_)) => return Ok(()),
                        Err(e) => return Err(LinkError::Malformed(e.to_string())),
                    };
                    if let Some(reply) = awaiting_replies.remove(&msg.header.parent_id) {
                        let _ = reply.send(msg);
                        continue;
                    }
                    match self.handle_downstream(msg, &mut reports).await {
                        Downstream::Done => {}
                        Downstream::Reply(reply) => {
                            let frame = codec.encode(&reply).map_err(|e| LinkError::Lost(e.to_string()))?;
                            within(write_deadline, sink.send(frame)).await?;
                        }
                        Downstream::Pending(ack) => pending_acks.push(ack),
                    }
                }
            }
        }
    }

    /// The node's inventory as messages under the size limit; if the store cannot say what it
    /// holds, one message saying so (the cloud then relies on what it knows from acks).
    async fn inventory_messages(&self) -> Vec<Message> {
        let started = Instant::now();
        let limit = self
            .settings
            .codec
            .max_frame_bytes()
            .min(INVENTORY_CHUNK_BYTES);
        let built = match self.store.inventory().await {
            Ok(items) => inventory::to_messages(&items, limit)
                .map(|msgs| (items.len(), msgs))
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match built {
            Ok((objects, msgs)) => {
                tracing::info!(objects, chunks = msgs.len(), elapsed = ?started.elapsed(), "sending inventory");
                msgs
            }
            Err(reason) => {
                tracing::error!(%reason, "cannot build the inventory; the cloud falls back to what it knows");
                vec![inventory::unavailable(&reason)]
            }
        }
    }

    /// Handles one message from the cloud.
    async fn handle_downstream(&self, msg: Message, reports: &mut Reports) -> Downstream {
        if !msg.header.parent_id.is_empty()
            && matches!(msg.route.operation, Operation::Response | Operation::Error)
        {
            // The cloud acknowledged one of our reports.
            if let Some((key, seq, _)) = reports.awaiting.remove(&msg.header.parent_id) {
                if msg.route.operation == Operation::Response {
                    if let Err(e) = self.outbox.remove(&key, seq).await {
                        tracing::warn!(%key, error = %e, "cannot remove an acknowledged report; it will be re-sent");
                    }
                } else {
                    tracing::warn!(%key, content = %msg.content, "cloud could not process a report; it stays queued and is sent again");
                    reports.retry_from(seq, Instant::now() + REPORT_RETRY_DELAY);
                }
            }
            return Downstream::Done;
        }
        if let Some(module) = self.groups.get(&msg.route.group) {
            // Not acknowledged: these messages are not keyed objects (KubeEdge does not answer
            // them either).
            let (group, resource) = (msg.route.group.clone(), msg.route.resource.clone());
            if let Err(e) = module.try_send(msg) {
                tracing::warn!(%group, %resource, error = %e, "cloud message dropped: its module's queue is full or gone");
            }
            return Downstream::Done;
        }
        if msg.route.group != group::RESOURCE {
            return Downstream::Reply(Box::new(error_reply(
                &msg,
                format!("no module for group `{}` on this node", msg.route.group),
            )));
        }
        // Queued in the store now (order fixed); acked when it has committed.
        let stored = self.store.apply(&msg);
        Downstream::Pending(Box::pin(async move {
            match stored.await {
                Ok(applied) => {
                    tracing::debug!(resource = %msg.route.resource, operation = %msg.route.operation,
                        resource_version = %msg.header.resource_version, ?applied, "stored; acking");
                    // Parsing the path costs on every stored message: only when the step is logged.
                    if tracing::enabled!(target: "pod_path", tracing::Level::DEBUG)
                        && let Ok(p) = kedge_common::ResourcePath::parse_edge(&msg.route.resource)
                        && p.resource_type() == Some("pod")
                    {
                        tracing::debug!(target: "pod_path", pod = %format_args!("{}/{}", p.namespace().unwrap_or_default(), p.name().unwrap_or_default()),
                            rv = %msg.header.resource_version, operation = %msg.route.operation, "4 stored on the edge");
                    }
                    msg.response(module::META_MANAGER, "OK".into())
                }
                Err(e) => {
                    tracing::warn!(resource = %msg.route.resource, error = %e, "cannot store message");
                    error_reply(&msg, e.to_string())
                }
            }
        }))
    }
}

/// A report the cloud could not process is sent again after this.
const REPORT_RETRY_DELAY: Duration = Duration::from_secs(5);
/// A report unanswered this long is sent again (its ack may have been lost).
const REPORT_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// A report in the form KubeEdge's cloudcore takes: pod status as `edged/meta/patch
/// <ns>/podpatch/<pod>` with `{"metadata": {"uid"}, "status"}` as a JSON string (its reply acks
/// the report: same msg_id). Other reports (device twins) are KubeEdge's already.
pub fn as_kubeedge_report(msg: Message) -> Message {
    let path = kedge_common::ResourcePath::parse_edge(&msg.route.resource);
    let Ok(path) = path else { return msg };
    if path.resource_type() != Some("podstatus") {
        return msg;
    }
    let ns = path.namespace().unwrap_or("default");
    let name = path.name().unwrap_or_default();
    let patch = serde_json::json!({
        "metadata": {"uid": msg.content.get("uid").cloned().unwrap_or_default()},
        "status": msg.content.get("status").cloned().unwrap_or_default(),
    });
    let mut out = Message::new(
        "edged",
        "meta",
        Operation::Patch,
        format!("{ns}/podpatch/{name}"),
        serde_json::Value::String(patch.to_string()),
    );
    out.header.id = msg.header.id;
    out.header.timestamp = msg.header.timestamp;
    out
}

/// A session's bookkeeping of outbox reports: what was sent, what awaits an ack, what to resend.
#[derive(Default)]
struct Reports {
    /// Outbox entries up to this sequence have been sent on this session.
    sent_up_to: u64,
    /// msg_id → (outbox key, seq, sent at).
    awaiting: HashMap<String, (String, u64, Instant)>,
    /// Resend everything from this sequence on, once due.
    retry: Option<(u64, Instant)>,
}

impl Reports {
    fn sent(&mut self, msg_id: String, key: String, seq: u64) {
        self.sent_up_to = self.sent_up_to.max(seq);
        self.awaiting.insert(msg_id, (key, seq, Instant::now()));
    }

    /// An entry that cannot be sent: not awaited, not sent again on this session.
    fn skipped(&mut self, seq: u64) {
        self.sent_up_to = self.sent_up_to.max(seq);
    }

    fn retry_from(&mut self, seq: u64, at: Instant) {
        self.retry = Some(match self.retry {
            Some((s, t)) => (s.min(seq), t.min(at)),
            None => (seq, at),
        });
    }

    /// On each heartbeat: reports unanswered for `timeout` are scheduled again; true when the
    /// outbox must be re-read from an earlier sequence (entries still there are unacked).
    fn due(&mut self, now: Instant, timeout: Duration) -> bool {
        let expired: Vec<String> = self
            .awaiting
            .iter()
            .filter(|(_, (_, _, at))| now.duration_since(*at) >= timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some((_, seq, _)) = self.awaiting.remove(&id) {
                self.retry_from(seq, now);
            }
        }
        match self.retry {
            Some((seq, at)) if at <= now => {
                self.retry = None;
                self.sent_up_to = self.sent_up_to.min(seq.saturating_sub(1));
                true
            }
            _ => false,
        }
    }
}

/// Most store writes awaiting their commit at once; beyond this EdgeHub stops reading.
const MAX_PENDING_ACKS: usize = 4096;

type PendingAck = std::pin::Pin<Box<dyn std::future::Future<Output = Message> + Send>>;

enum Downstream {
    Done,
    Reply(Box<Message>),
    Pending(PendingAck),
}

/// Resets the session's streams however the session ends (error, shutdown, close).
struct CloseStreams(Option<Mux>);

impl Drop for CloseStreams {
    fn drop(&mut self) {
        if let Some(m) = &self.0 {
            m.close("the link to the cloud closed");
        }
    }
}

fn error_reply(msg: &Message, why: String) -> Message {
    let mut r = msg.response(module::META_MANAGER, why.into());
    r.route.operation = Operation::Error;
    r
}

/// Every write to the link finishes within `deadline` or ends the session: a peer that stopped
/// reading (a partition that drops packets fills the socket buffer) would otherwise block the
/// session — and with it the silence check and shutdown — until TCP gives up, many minutes
/// later.
async fn within<F>(deadline: Duration, write: F) -> Result<(), LinkError>
where
    F: std::future::Future<Output = Result<(), tokio_tungstenite::tungstenite::Error>>,
{
    match tokio::time::timeout(deadline, write).await {
        Ok(result) => result.map_err(|e| LinkError::Lost(e.to_string())),
        Err(_) => Err(LinkError::Lost(format!(
            "a write to the cloud took longer than {deadline:?} (writeDeadline)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our pod status report, turned into what KubeEdge's edge sends (line 41 of the capture).
    #[test]
    fn pod_status_goes_to_kubeedge_s_cloud_as_a_podpatch() {
        let report = Message::new(
            "edged",
            "resource",
            Operation::Update,
            "default/podstatus/kcap-pod",
            serde_json::json!({"uid": "u-1", "name": "kcap-pod", "status": {"phase": "Running"}}),
        );
        let id = report.header.id.clone();
        let out = as_kubeedge_report(report);
        assert_eq!(
            out.header.id, id,
            "the cloud's reply must ack the outbox entry"
        );
        assert!(!out.header.sync);
        let ours = serde_json::to_value(&out).unwrap();
        crate::kubeedge_capture::assert_same_route(&ours, 41);
        let theirs = crate::kubeedge_capture::captured(41);
        let parse = |v: &serde_json::Value| -> serde_json::Value {
            serde_json::from_str(v.as_str().unwrap()).unwrap()
        };
        let (a, b) = (parse(&ours["content"]), parse(&theirs["content"]));
        assert_eq!(a["metadata"]["uid"], "u-1");
        assert!(b["metadata"]["uid"].is_string());
        assert_eq!(a["status"]["phase"], "Running");
        assert!(b["status"].is_object());
        // Device twin reports are KubeEdge's already.
        let twin = Message::new(
            "twin",
            "resource",
            Operation::Update,
            "device/default/d/twin/edge_updated",
            serde_json::json!({}),
        );
        assert_eq!(as_kubeedge_report(twin.clone()), twin);
    }

    #[test]
    fn unanswered_or_refused_reports_are_scheduled_again() {
        let t0 = Instant::now();
        let mut r = Reports::default();
        r.sent("m1".into(), "a".into(), 3);
        r.sent("m2".into(), "b".into(), 5);
        assert_eq!(r.sent_up_to, 5);
        assert!(!r.due(t0, Duration::from_secs(30)));
        // The cloud could not process report 5: resend from 5 once the delay passed.
        r.awaiting.remove("m2");
        r.retry_from(5, t0 + Duration::from_secs(5));
        assert!(!r.due(t0 + Duration::from_secs(1), Duration::from_secs(30)));
        assert!(r.due(t0 + Duration::from_secs(5), Duration::from_secs(30)));
        assert_eq!(r.sent_up_to, 4);
        // Report 3 never got an answer: after the timeout everything from 3 is sent again.
        assert!(r.due(t0 + Duration::from_secs(31), Duration::from_secs(30)));
        assert_eq!(r.sent_up_to, 2);
        assert!(r.awaiting.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_takes_ends_the_session_at_the_write_deadline() {
        let started = tokio::time::Instant::now();
        let blocked = std::future::pending::<Result<(), tokio_tungstenite::tungstenite::Error>>();
        match within(Duration::from_secs(5), blocked).await {
            Err(LinkError::Lost(why)) => assert!(why.contains("writeDeadline"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(
            within(Duration::from_secs(5), async { Ok(()) })
                .await
                .is_ok()
        );
    }
}

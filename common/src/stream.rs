//! Byte streams multiplexed over the cloud–edge WebSocket: how `kubectl logs`, `exec`, `attach`
//! and `port-forward` reach an edge pod without a second connection, a tunnel or iptables rules.
//!
//! Why it looks like this:
//! - Stream frames are **binary WebSocket frames whose first byte is 0**, which no JSON message
//!   starts with, so they share the link with object messages. Only sessions where both ends
//!   announced kedge's protocol carry them; a KubeEdge peer never sees one.
//! - **Credit-based flow control per stream**: a side may have at most [`WINDOW`] bytes of a
//!   stream in flight that the other side has not yet handed on; the receiver returns credit
//!   (`Window`) once its consumer took the bytes. A slow API-server client or a fast `logs -f`
//!   therefore fills only its own window, never the link's buffers, and a peer that ignores its
//!   window is reset. The session writers send object messages before stream frames, so object
//!   traffic waits at most for one stream frame ([`MAX_DATA`] bytes) on the socket.
//! - The cloud opens streams, the edge answers on them. `Fin` means "this side is done": its
//!   receiver flushes, shuts down its local write side and ends the stream. `Reset` aborts it. A
//!   link that drops resets every stream of its session, so nothing waits on a dead link.
//!
//! Frame layout: `[0x00][kind: u8][stream id: u32 big-endian][payload]`.
//! Written here rather than taken from a crate (yamux, h2): those need a byte stream of their
//! own, and ours must interleave with, and yield to, the JSON messages on the same WebSocket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

/// First byte of every stream frame.
pub const MARKER: u8 = 0;
/// Largest payload of one `Data` frame.
pub const MAX_DATA: usize = 32 * 1024;
/// Bytes of one stream a sender may have in flight before the receiver returns credit.
pub const WINDOW: usize = 256 * 1024;
/// Open streams per link; more are refused (the cloud answers 503).
pub const MAX_STREAMS: usize = 128;
const HEADER_LEN: usize = 6;
/// Outgoing stream frames a session queues for its writer.
pub const OUTGOING_QUEUE: usize = 64;
/// Stream frames a session writer sends per turn before its messages get theirs again.
pub const FRAMES_PER_TURN: usize = 16;

/// The next frame a session writer should send, or never when the session has no streams (for
/// a `select!` branch).
pub async fn next_outgoing(out: &mut Option<mpsc::Receiver<StreamFrame>>) -> Option<StreamFrame> {
    match out {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Cloud → edge: a new stream; the payload describes the request ([`StreamRequest`]).
    Open = 1,
    Data = 2,
    /// Credit: the payload is a big-endian `u32` of bytes the sender may send again.
    Window = 3,
    /// This side sends nothing more; the stream ends once the receiver handed everything on.
    Fin = 4,
    /// Abort the stream; the payload is a UTF-8 reason.
    Reset = 5,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamFrame {
    pub id: u32,
    pub kind: FrameKind,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamFrameError {
    #[error("stream frame of {0} bytes is shorter than its 6-byte header")]
    Short(usize),
    #[error("not a stream frame (first byte {0:#04x})")]
    NotStream(u8),
    #[error("unknown stream frame kind {0}")]
    UnknownKind(u8),
    #[error("window frame payload must be 4 bytes, not {0}")]
    BadWindow(usize),
}

impl StreamFrame {
    pub fn new(id: u32, kind: FrameKind, payload: impl Into<Bytes>) -> Self {
        StreamFrame {
            id,
            kind,
            payload: payload.into(),
        }
    }

    pub fn window(id: u32, credit: u32) -> Self {
        StreamFrame::new(id, FrameKind::Window, credit.to_be_bytes().to_vec())
    }

    pub fn reset(id: u32, reason: &str) -> Self {
        StreamFrame::new(id, FrameKind::Reset, reason.as_bytes().to_vec())
    }

    /// Whether a binary WebSocket payload is a stream frame rather than a JSON message.
    pub fn is_stream_frame(bytes: &[u8]) -> bool {
        bytes.first() == Some(&MARKER)
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER_LEN + self.payload.len());
        b.put_u8(MARKER);
        b.put_u8(self.kind as u8);
        b.put_u32(self.id);
        b.extend_from_slice(&self.payload);
        b.freeze()
    }

    pub fn decode(bytes: &[u8]) -> Result<StreamFrame, StreamFrameError> {
        if bytes.len() < HEADER_LEN {
            return Err(StreamFrameError::Short(bytes.len()));
        }
        if bytes[0] != MARKER {
            return Err(StreamFrameError::NotStream(bytes[0]));
        }
        let kind = match bytes[1] {
            1 => FrameKind::Open,
            2 => FrameKind::Data,
            3 => FrameKind::Window,
            4 => FrameKind::Fin,
            5 => FrameKind::Reset,
            k => return Err(StreamFrameError::UnknownKind(k)),
        };
        let id = u32::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
        let payload = Bytes::copy_from_slice(&bytes[HEADER_LEN..]);
        if kind == FrameKind::Window && payload.len() != 4 {
            return Err(StreamFrameError::BadWindow(payload.len()));
        }
        Ok(StreamFrame { id, kind, payload })
    }

    fn credit(&self) -> u32 {
        let p = &self.payload;
        if p.len() == 4 {
            u32::from_be_bytes([p[0], p[1], p[2], p[3]])
        } else {
            0
        }
    }
}

/// What the cloud asks the edge to serve on a stream: the kubelet HTTP request the API server
/// made, already authenticated and routed by cloudcore.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamRequest {
    pub method: String,
    /// Path and query, as the API server sent them (`/containerLogs/ns/pod/c?follow=true`).
    pub target: String,
    /// Request headers in order (the upgrade headers of exec/attach/port-forward among them).
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    #[error("the link is down: {0}")]
    Closed(String),
    #[error("too many open streams on this link ({0})")]
    TooMany(usize),
}

/// What a stream's reader gets from the peer.
#[derive(Debug)]
enum Inbound {
    Data(Bytes),
    Fin,
    Reset(String),
}

struct Entry {
    inbound: mpsc::UnboundedSender<Inbound>,
    /// Credit for what this side may still send.
    send_window: Arc<Semaphore>,
    /// Bytes received and not yet handed on (bounded by [`WINDOW`] for a well-behaved peer).
    buffered: Arc<AtomicUsize>,
}

struct MuxInner {
    streams: Mutex<HashMap<u32, Entry>>,
    out: mpsc::Sender<StreamFrame>,
    next_id: AtomicU32,
    /// Why the link closed, once it has.
    closed: Mutex<Option<String>>,
}

impl MuxInner {
    fn streams(&self) -> MutexGuard<'_, HashMap<u32, Entry>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The streams of one link session. The session's writer sends what the returned receiver
/// yields; its reader hands every stream frame to [`Mux::dispatch`]; when the session ends it
/// calls [`Mux::close`].
#[derive(Clone)]
pub struct Mux {
    inner: Arc<MuxInner>,
}

impl Mux {
    /// A mux whose outgoing frames queue in a channel of `capacity` frames.
    pub fn new(capacity: usize) -> (Mux, mpsc::Receiver<StreamFrame>) {
        let (out, rx) = mpsc::channel(capacity);
        let mux = Mux {
            inner: Arc::new(MuxInner {
                streams: Mutex::new(HashMap::new()),
                out,
                next_id: AtomicU32::new(1),
                closed: Mutex::new(None),
            }),
        };
        (mux, rx)
    }

    pub fn open_streams(&self) -> usize {
        self.inner.streams().len()
    }

    fn register(&self, id: u32) -> Result<Stream, MuxError> {
        let closed = self
            .inner
            .closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(reason) = closed {
            return Err(MuxError::Closed(reason));
        }
        let mut streams = self.inner.streams();
        if streams.len() >= MAX_STREAMS {
            return Err(MuxError::TooMany(MAX_STREAMS));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let send_window = Arc::new(Semaphore::new(WINDOW));
        let buffered = Arc::new(AtomicUsize::new(0));
        streams.insert(
            id,
            Entry {
                inbound: tx,
                send_window: send_window.clone(),
                buffered: buffered.clone(),
            },
        );
        Ok(Stream {
            id,
            mux: self.inner.clone(),
            inbound: rx,
            send_window,
            buffered,
            sent_fin: false,
            received_fin: false,
            done: false,
        })
    }

    /// Opens a stream (the cloud's side) with `request` as its `Open` payload.
    pub async fn open(&self, request: &StreamRequest) -> Result<Stream, MuxError> {
        let payload = serde_json::to_vec(request).map_err(|e| MuxError::Closed(e.to_string()))?;
        let mut stream = None;
        // Ids wrap after 4 billion streams; skip any still in use.
        for _ in 0..MAX_STREAMS + 1 {
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed).max(1);
            if self.inner.streams().contains_key(&id) {
                continue;
            }
            stream = Some(self.register(id)?);
            break;
        }
        let mut stream = stream.ok_or(MuxError::TooMany(MAX_STREAMS))?;
        if self
            .inner
            .out
            .send(StreamFrame::new(stream.id, FrameKind::Open, payload))
            .await
            .is_err()
        {
            stream.done = true;
            self.inner.streams().remove(&stream.id);
            return Err(MuxError::Closed("link writer stopped".into()));
        }
        Ok(stream)
    }

    /// Handles one frame from the peer. An `Open` (only ever sent by the cloud) returns the new
    /// stream and its request for the edge to serve; a malformed one is reset.
    pub fn dispatch(&self, frame: StreamFrame) -> Option<(Stream, StreamRequest)> {
        let id = frame.id;
        match frame.kind {
            FrameKind::Open => {
                if self.inner.streams().contains_key(&id) {
                    self.send_reset(id, "stream id already in use");
                    return None;
                }
                let request: StreamRequest = match serde_json::from_slice(&frame.payload) {
                    Ok(r) => r,
                    Err(e) => {
                        self.send_reset(id, &format!("malformed stream request: {e}"));
                        return None;
                    }
                };
                match self.register(id) {
                    Ok(s) => Some((s, request)),
                    Err(e) => {
                        self.send_reset(id, &e.to_string());
                        None
                    }
                }
            }
            FrameKind::Data => {
                let violated = {
                    let streams = self.inner.streams();
                    let Some(e) = streams.get(&id) else {
                        // Late data for a stream that ended here: the peer learns from our Reset.
                        return None;
                    };
                    let now = e.buffered.fetch_add(frame.payload.len(), Ordering::AcqRel)
                        + frame.payload.len();
                    if now > WINDOW {
                        true
                    } else {
                        let _ = e.inbound.send(Inbound::Data(frame.payload));
                        false
                    }
                };
                if violated {
                    self.abort(id, "peer exceeded the stream window");
                }
                None
            }
            FrameKind::Window => {
                if let Some(e) = self.inner.streams().get(&id) {
                    // A peer granting absurd credit only hurts itself; the cap keeps the
                    // semaphore within its limits.
                    let credit = (frame.credit() as usize).min(WINDOW);
                    if e.send_window.available_permits() + credit <= Semaphore::MAX_PERMITS {
                        e.send_window.add_permits(credit);
                    }
                }
                None
            }
            FrameKind::Fin => {
                if let Some(e) = self.inner.streams().get(&id) {
                    let _ = e.inbound.send(Inbound::Fin);
                }
                None
            }
            FrameKind::Reset => {
                let reason = String::from_utf8_lossy(&frame.payload).into_owned();
                if let Some(e) = self.inner.streams().remove(&id) {
                    let _ = e.inbound.send(Inbound::Reset(reason));
                    e.send_window.close();
                }
                None
            }
        }
    }

    /// The link is gone: every stream ends with `reason`.
    pub fn close(&self, reason: &str) {
        *self.inner.closed.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_owned());
        let drained: Vec<Entry> = self.inner.streams().drain().map(|(_, e)| e).collect();
        for e in drained {
            let _ = e.inbound.send(Inbound::Reset(reason.to_owned()));
            e.send_window.close();
        }
    }

    fn abort(&self, id: u32, reason: &str) {
        if let Some(e) = self.inner.streams().remove(&id) {
            let _ = e.inbound.send(Inbound::Reset(reason.to_owned()));
            e.send_window.close();
        }
        self.send_reset(id, reason);
    }

    fn send_reset(&self, id: u32, reason: &str) {
        // Best effort: a full writer queue means the link is overloaded or dying, and a dying
        // link resets the stream on the other side anyway.
        let _ = self.inner.out.try_send(StreamFrame::reset(id, reason));
    }
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipeOutcome {
    /// Bytes sent to the peer.
    pub sent: u64,
    /// Bytes received from the peer and written out.
    pub received: u64,
    /// `None`: the peer finished the stream; otherwise why it was aborted.
    pub aborted: Option<String>,
}

/// One end of a multiplexed stream. Dropping it before both sides finished resets the stream.
pub struct Stream {
    id: u32,
    mux: Arc<MuxInner>,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    send_window: Arc<Semaphore>,
    buffered: Arc<AtomicUsize>,
    sent_fin: bool,
    received_fin: bool,
    /// The peer reset the stream (or the link closed): nothing to tell it.
    done: bool,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("id", &self.id).finish()
    }
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Carries bytes between `io` and the peer until the peer finishes or either side aborts:
    /// `io`'s reads go to the peer (each within the stream's credit), the peer's data is written
    /// to `io`, whose write side is shut down when the peer finishes.
    pub async fn pipe<T>(mut self, io: T) -> PipeOutcome
    where
        T: AsyncRead + AsyncWrite + Send,
    {
        let (mut rd, mut wr) = tokio::io::split(io);
        let (id, out) = (self.id, self.mux.out.clone());
        let window = self.send_window.clone();
        let mut sent = 0u64;
        let mut received = 0u64;
        let mut local_eof = false;
        let mut buf = vec![0u8; MAX_DATA];
        let aborted = loop {
            tokio::select! {
                // Local → peer: read only what the credit allows, so a stalled peer stops the
                // reading here (and, through TCP, the producer).
                r = async {
                    // One unit of credit first, so a peer that stopped reading stops us here;
                    // the permit returns to the window if this read is cancelled.
                    let permit = window.acquire().await.map_err(|_| "stream reset".to_owned())?;
                    let n = rd.read(&mut buf).await.map_err(|e| format!("local read: {e}"))?;
                    Ok::<_, String>((permit, n))
                }, if !local_eof => {
                    let (permit, n) = match r {
                        Ok(x) => x,
                        Err(e) => break Some(self.reset_reason().unwrap_or(e)),
                    };
                    if n == 0 {
                        drop(permit);
                        tracing::debug!(stream = id, sent, received, "local end finished; sending Fin");
                        local_eof = true;
                        self.sent_fin = true;
                        if out.send(StreamFrame::new(id, FrameKind::Fin, Bytes::new())).await.is_err() {
                            break Some("link writer stopped".into());
                        }
                        continue;
                    }
                    permit.forget();
                    if n > 1 {
                        match window.acquire_many((n - 1) as u32).await {
                            Ok(p) => p.forget(),
                            Err(_) => break Some(self.reset_reason().unwrap_or_else(|| "stream reset".into())),
                        }
                    }
                    sent += n as u64;
                    let frame = StreamFrame::new(id, FrameKind::Data, Bytes::copy_from_slice(&buf[..n]));
                    if out.send(frame).await.is_err() {
                        break Some("link writer stopped".into());
                    }
                }
                ev = self.inbound.recv() => match ev {
                    Some(Inbound::Data(b)) => {
                        let len = b.len();
                        if let Err(e) = wr.write_all(&b).await {
                            break Some(format!("local write: {e}"));
                        }
                        if let Err(e) = wr.flush().await {
                            break Some(format!("local write: {e}"));
                        }
                        received += len as u64;
                        self.buffered.fetch_sub(len, Ordering::AcqRel);
                        if out.send(StreamFrame::window(id, len as u32)).await.is_err() {
                            break Some("link writer stopped".into());
                        }
                    }
                    Some(Inbound::Fin) => {
                        tracing::debug!(stream = id, sent, received, local_eof, "peer finished");
                        self.received_fin = true;
                        let _ = wr.shutdown().await;
                        break None;
                    }
                    Some(Inbound::Reset(reason)) => {
                        self.done = true;
                        break Some(reason);
                    }
                    None => break Some("link closed".into()),
                }
            }
        };
        PipeOutcome {
            sent,
            received,
            aborted,
        }
    }
}

impl Stream {
    /// Why the stream was reset, once its credit was closed by a reset.
    fn reset_reason(&mut self) -> Option<String> {
        while let Ok(ev) = self.inbound.try_recv() {
            if let Inbound::Reset(reason) = ev {
                self.done = true;
                return Some(reason);
            }
        }
        None
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let removed = self.mux.streams().remove(&self.id).is_some();
        if !removed || self.done || (self.sent_fin && self.received_fin) {
            return;
        }
        // The peer finished and so are we: say so. Otherwise it still expects data or still
        // sends: reset, so its side ends too. (Best effort, as in `send_reset`.)
        let frame = if self.received_fin {
            StreamFrame::new(self.id, FrameKind::Fin, Bytes::new())
        } else {
            StreamFrame::reset(self.id, "stream closed")
        };
        let _ = self.mux.out.try_send(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn frames_round_trip_and_bad_ones_are_named() {
        for f in [
            StreamFrame::new(7, FrameKind::Data, b"hello".to_vec()),
            StreamFrame::window(u32::MAX, 1234),
            StreamFrame::reset(1, "gone"),
            StreamFrame::new(2, FrameKind::Fin, Bytes::new()),
        ] {
            let b = f.encode();
            assert!(StreamFrame::is_stream_frame(&b));
            assert_eq!(StreamFrame::decode(&b).unwrap(), f);
        }
        assert_eq!(
            StreamFrame::decode(&[0, 2, 0]),
            Err(StreamFrameError::Short(3))
        );
        assert_eq!(
            StreamFrame::decode(b"{\"header\""),
            Err(StreamFrameError::NotStream(b'{'))
        );
        assert_eq!(
            StreamFrame::decode(&[0, 9, 0, 0, 0, 1]),
            Err(StreamFrameError::UnknownKind(9))
        );
        assert_eq!(
            StreamFrame::decode(&[0, 3, 0, 0, 0, 1, 1]),
            Err(StreamFrameError::BadWindow(1))
        );
        assert!(!StreamFrame::is_stream_frame(b"{}"));
    }

    /// Two muxes wired back to back, as the cloud and edge sessions are; `stall_edge` stops the
    /// cloud → edge direction (a congested link) while it is set.
    fn link() -> (Mux, Mux, mpsc::UnboundedReceiver<(Stream, StreamRequest)>) {
        let (cloud, mut cloud_out) = Mux::new(64);
        let (edge, mut edge_out) = Mux::new(64);
        let (accepted_tx, accepted) = mpsc::unbounded_channel();
        let e = edge.clone();
        tokio::spawn(async move {
            while let Some(f) = cloud_out.recv().await {
                let f = StreamFrame::decode(&f.encode()).unwrap();
                if let Some(opened) = e.dispatch(f) {
                    let _ = accepted_tx.send(opened);
                }
            }
        });
        let c = cloud.clone();
        tokio::spawn(async move {
            while let Some(f) = edge_out.recv().await {
                c.dispatch(f);
            }
        });
        (cloud, edge, accepted)
    }

    fn request() -> StreamRequest {
        StreamRequest {
            method: "GET".into(),
            target: "/containerLogs/ns/p/c".into(),
            headers: vec![("Host".into(), "x".into())],
        }
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_fin_ends_the_stream() {
        let (cloud, _edge, mut accepted) = link();
        let stream = cloud.open(&request()).await.unwrap();
        let (edge_stream, req) = accepted.recv().await.unwrap();
        assert_eq!(req, request());
        // The edge answers 1 MiB (four windows' worth) and finishes.
        let body: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        let (edge_io, mut producer) = tokio::io::duplex(8192);
        let expected = body.clone();
        tokio::spawn(async move {
            producer.write_all(&body).await.unwrap();
            drop(producer);
        });
        let edge_task = tokio::spawn(edge_stream.pipe(edge_io));
        let (cloud_io, mut client) = tokio::io::duplex(8192);
        let cloud_task = tokio::spawn(stream.pipe(cloud_io));
        client.write_all(b"ping").await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected);
        let outcome = cloud_task.await.unwrap();
        assert_eq!(outcome.aborted, None);
        assert_eq!(outcome.received, expected.len() as u64);
        drop(client);
        let edge_outcome = tokio::time::timeout(Duration::from_secs(5), edge_task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(edge_outcome.sent, expected.len() as u64);
        assert_eq!(edge_outcome.received, 4);
        assert_eq!(cloud.open_streams(), 0);
    }

    #[tokio::test]
    async fn a_stalled_reader_holds_its_sender_to_one_window() {
        let (cloud, _edge, mut accepted) = link();
        let stream = cloud.open(&request()).await.unwrap();
        let (edge_stream, _) = accepted.recv().await.unwrap();
        let (edge_io, mut producer) = tokio::io::duplex(64 * 1024);
        let written = Arc::new(AtomicUsize::new(0));
        let w = written.clone();
        tokio::spawn(async move {
            let chunk = vec![b'x'; 4096];
            while producer.write_all(&chunk).await.is_ok() {
                w.fetch_add(chunk.len(), Ordering::Relaxed);
            }
        });
        tokio::spawn(edge_stream.pipe(edge_io));
        // The cloud side's consumer never reads: a tiny duplex fills at once.
        let (cloud_io, client) = tokio::io::duplex(1024);
        let cloud_task = tokio::spawn(stream.pipe(cloud_io));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let w1 = written.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let w2 = written.load(Ordering::Relaxed);
        assert_eq!(w1, w2, "the producer is stopped by flow control");
        // One window in flight plus what the local pipes buffer (duplexes, one frame each side).
        assert!(
            w2 <= WINDOW + 64 * 1024 + 1024 + 2 * MAX_DATA + 4096,
            "{w2} bytes left the producer"
        );
        drop(client);
        let outcome = tokio::time::timeout(Duration::from_secs(5), cloud_task)
            .await
            .unwrap()
            .unwrap();
        assert!(outcome.aborted.is_some());
    }

    #[tokio::test]
    async fn a_closed_link_resets_every_stream_and_refuses_new_ones() {
        let (cloud, edge, mut accepted) = link();
        let a = cloud.open(&request()).await.unwrap();
        let b = cloud.open(&request()).await.unwrap();
        assert_ne!(a.id(), b.id());
        let (ea, _) = accepted.recv().await.unwrap();
        let (io, _keep) = tokio::io::duplex(1024);
        let t = tokio::spawn(ea.pipe(io));
        edge.close("link to the cloud lost");
        let outcome = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(outcome.aborted.as_deref(), Some("link to the cloud lost"));
        cloud.close("node went away");
        assert!(matches!(
            cloud.open(&request()).await,
            Err(MuxError::Closed(r)) if r == "node went away"
        ));
        let (io, _keep) = tokio::io::duplex(1024);
        let outcome = a.pipe(io).await;
        assert_eq!(outcome.aborted.as_deref(), Some("node went away"));
    }

    #[tokio::test]
    async fn a_peer_that_ignores_its_window_is_reset() {
        let (mux, mut out) = Mux::new(64);
        let (stream, _) = mux
            .dispatch(StreamFrame::new(
                5,
                FrameKind::Open,
                serde_json::to_vec(&request()).unwrap(),
            ))
            .unwrap();
        for _ in 0..(WINDOW / MAX_DATA) + 1 {
            mux.dispatch(StreamFrame::new(5, FrameKind::Data, vec![0u8; MAX_DATA]));
        }
        let reset = out.recv().await.unwrap();
        assert_eq!(reset.kind, FrameKind::Reset);
        assert_eq!(reset.id, 5);
        let (io, _keep) = tokio::io::duplex(WINDOW * 2);
        let outcome = stream.pipe(io).await;
        assert_eq!(
            outcome.aborted.as_deref(),
            Some("peer exceeded the stream window")
        );
        // A malformed open is refused with a reset naming the problem.
        assert!(
            mux.dispatch(StreamFrame::new(6, FrameKind::Open, b"{".to_vec()))
                .is_none()
        );
        // (Credit for the data accepted before the violation may come first.)
        let mut reset = out.recv().await.unwrap();
        while reset.id == 5 {
            reset = out.recv().await.unwrap();
        }
        assert_eq!((reset.id, reset.kind), (6, FrameKind::Reset));
        assert!(String::from_utf8_lossy(&reset.payload).contains("malformed stream request"));
    }
}

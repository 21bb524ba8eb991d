//! WebSocket frames ⇄ [`Message`]s.
//!
//! KubeEdge writes its JSON sometimes as text and sometimes as binary frames, so we read both and
//! write text. Size limits are enforced twice: tungstenite refuses oversized frames while reading
//! (see [`WireCodec::websocket_config`]), and [`WireCodec::decode`] refuses oversized payloads
//! whatever the transport did.

use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;

use crate::message::{DEFAULT_MAX_MESSAGE_BYTES, Message, MessageError};
use crate::stream::{StreamFrame, StreamFrameError};

/// Initial read buffer per WebSocket connection.
const READ_BUFFER_BYTES: usize = 4 * 1024;
/// Frames are batched up to this many bytes before a write (the buffer grows only when used).
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// What one incoming frame turned out to be.
#[derive(Debug)]
pub enum Incoming {
    /// A decoded message.
    Message(Box<Message>),
    /// A frame of a multiplexed stream (see [`crate::stream`]).
    Stream(StreamFrame),
    /// Ping/pong or a raw frame fragment: nothing for the application; tungstenite answers pings.
    Control,
    /// The peer closed the connection, with its close frame if it sent one.
    Close(Option<CloseFrame>),
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{kind} frame of {size} bytes exceeds the {limit}-byte limit")]
    FrameTooLarge {
        kind: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("{kind} frame does not hold a valid message: {source}")]
    BadMessage {
        kind: &'static str,
        #[source]
        source: MessageError,
    },
    #[error("malformed stream frame: {0}")]
    BadStreamFrame(#[from] StreamFrameError),
}

/// Encodes and decodes messages on a WebSocket with a maximum frame size.
#[derive(Debug, Clone, Copy)]
pub struct WireCodec {
    max_frame_bytes: usize,
}

impl Default for WireCodec {
    fn default() -> Self {
        WireCodec {
            max_frame_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

impl WireCodec {
    pub fn new(max_frame_bytes: usize) -> Self {
        WireCodec { max_frame_bytes }
    }

    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// tungstenite settings that make the transport itself refuse frames and messages over the
    /// limit, before they are buffered whole. Buffers start small: cloudhub holds one connection
    /// per edge node, and tungstenite's default 128 KiB read and write buffers would cost about
    /// 256 KiB per idle node; they grow on demand for large messages.
    pub fn websocket_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .max_message_size(Some(self.max_frame_bytes))
            .max_frame_size(Some(self.max_frame_bytes))
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(WRITE_BUFFER_BYTES)
            // tungstenite requires room for a whole frame beyond the batching threshold.
            .max_write_buffer_size(
                self.max_frame_bytes
                    .saturating_mul(2)
                    .max(WRITE_BUFFER_BYTES.saturating_add(self.max_frame_bytes)),
            )
    }

    /// Turns one frame into a message, a control frame, or a close.
    pub fn decode(&self, frame: Frame) -> Result<Incoming, WireError> {
        let (kind, bytes): (&'static str, &[u8]) = match &frame {
            Frame::Text(t) => ("text", t.as_bytes()),
            Frame::Binary(b) => ("binary", b.as_ref()),
            Frame::Ping(_) | Frame::Pong(_) | Frame::Frame(_) => return Ok(Incoming::Control),
            Frame::Close(c) => return Ok(Incoming::Close(c.clone())),
        };
        if bytes.len() > self.max_frame_bytes {
            return Err(WireError::FrameTooLarge {
                kind,
                size: bytes.len(),
                limit: self.max_frame_bytes,
            });
        }
        if kind == "binary" && StreamFrame::is_stream_frame(bytes) {
            return Ok(Incoming::Stream(StreamFrame::decode(bytes)?));
        }
        Message::from_slice(bytes, self.max_frame_bytes)
            .map(|m| Incoming::Message(Box::new(m)))
            .map_err(|source| WireError::BadMessage { kind, source })
    }

    /// Encodes a message as a text frame, refusing one our own peer would refuse.
    pub fn encode(&self, msg: &Message) -> Result<Frame, WireError> {
        let json = msg.to_json();
        if json.len() > self.max_frame_bytes {
            return Err(WireError::FrameTooLarge {
                kind: "text",
                size: json.len(),
                limit: self.max_frame_bytes,
            });
        }
        Ok(Frame::text(json))
    }
}

/// A stream frame as a binary WebSocket frame.
pub fn encode_stream(frame: &StreamFrame) -> Frame {
    Frame::Binary(frame.encode())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Operation;
    use serde_json::json;
    use tokio_tungstenite::tungstenite::Bytes;

    fn sample() -> Message {
        Message::new(
            "edgecontroller",
            "resource",
            Operation::Insert,
            "default/configmap/cfg",
            json!({"data": {"k": "v"}}),
        )
    }

    #[test]
    fn text_and_binary_frames_both_decode() {
        let codec = WireCodec::default();
        let msg = sample();
        let text = codec.encode(&msg).unwrap();
        assert!(matches!(text, Frame::Text(_)));
        match codec.decode(text).unwrap() {
            Incoming::Message(m) => assert_eq!(*m, msg),
            other => panic!("unexpected {other:?}"),
        }
        let binary = Frame::Binary(Bytes::from(msg.to_json().into_bytes()));
        match codec.decode(binary).unwrap() {
            Incoming::Message(m) => assert_eq!(*m, msg),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn stream_frames_are_binary_frames_starting_with_zero() {
        let codec = WireCodec::default();
        let f = crate::stream::StreamFrame::window(3, 10);
        match codec.decode(encode_stream(&f)).unwrap() {
            Incoming::Stream(got) => assert_eq!(got, f),
            other => panic!("unexpected {other:?}"),
        }
        let e = codec
            .decode(Frame::Binary(Bytes::from_static(&[0, 1])))
            .unwrap_err();
        assert!(e.to_string().contains("malformed stream frame"), "{e}");
    }

    #[test]
    fn control_and_close_frames() {
        let codec = WireCodec::default();
        assert!(matches!(
            codec.decode(Frame::Ping(Bytes::new())).unwrap(),
            Incoming::Control
        ));
        assert!(matches!(
            codec.decode(Frame::Pong(Bytes::new())).unwrap(),
            Incoming::Control
        ));
        assert!(matches!(
            codec.decode(Frame::Close(None)).unwrap(),
            Incoming::Close(None)
        ));
    }

    #[test]
    fn oversized_frames_are_refused_both_ways() {
        let codec = WireCodec::new(64);
        let msg = sample();
        assert!(matches!(
            codec.encode(&msg),
            Err(WireError::FrameTooLarge { limit: 64, .. })
        ));
        let big = Frame::Binary(Bytes::from(vec![b' '; 65]));
        let e = codec.decode(big).unwrap_err();
        assert!(e.to_string().contains("binary frame of 65 bytes"), "{e}");
        let cfg = codec.websocket_config();
        assert_eq!(cfg.max_frame_size, Some(64));
        assert_eq!(cfg.max_message_size, Some(64));
        // Small limits give a configuration tungstenite accepts (it panics on invalid ones).
        assert!(cfg.max_write_buffer_size > cfg.write_buffer_size);
    }

    #[test]
    fn malformed_payloads_say_what_was_wrong() {
        let codec = WireCodec::default();
        let e = codec.decode(Frame::text("{\"header\":")).unwrap_err();
        assert!(matches!(
            e,
            WireError::BadMessage {
                kind: "text",
                source: MessageError::Syntax(_)
            }
        ));
        let e = codec
            .decode(Frame::Binary(Bytes::from_static(&[0x7b, 0xff, 0x00])))
            .unwrap_err();
        assert!(matches!(
            e,
            WireError::BadMessage {
                kind: "binary",
                source: MessageError::NotUtf8 { .. }
            }
        ));
        let e = codec
            .decode(Frame::text(r#"{"header":{"msg_id":"x","timestamp":true}}"#))
            .unwrap_err();
        assert!(e.to_string().contains("header.timestamp"), "{e}");
    }
}

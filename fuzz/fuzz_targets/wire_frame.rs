//! A WebSocket frame from a peer (text: a message; binary: a message or a stream frame):
//! decoding never panics, and whatever decodes re-encodes.
#![no_main]

use kedge_common::wire::{Incoming, WireCodec};
use libfuzzer_sys::fuzz_target;
use tokio_tungstenite::tungstenite::Message as Frame;

fuzz_target!(|data: &[u8]| {
    let codec = WireCodec::new(64 * 1024);
    let frame = match data.first() {
        Some(0) | None => Frame::Binary(data.to_vec().into()),
        Some(_) => match std::str::from_utf8(data) {
            Ok(t) => Frame::Text(t.into()),
            Err(_) => Frame::Binary(data.to_vec().into()),
        },
    };
    if let Ok(Incoming::Message(m)) = codec.decode(frame) {
        // A message we accepted is one we can send on.
        let _ = codec.encode(&m);
    }
});

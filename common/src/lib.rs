//! What cloudcore and edgecore share: the cloud–edge message envelope and resource paths, the
//! WebSocket wire codec, the custom resource types, and config/logging helpers.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod crd;
pub mod devices;
pub mod files;
pub mod http;
pub mod inventory;
pub mod labels;
pub mod logging;
pub mod message;
pub mod pki;
pub mod process;
pub mod refs;
pub mod resource;
pub mod selectors;
pub mod stream;
pub mod tls;
pub mod wire;

pub use message::{Message, MessageError, Operation};
pub use resource::{PathError, ResourcePath};

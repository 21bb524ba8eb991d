//! edgecore: the edge daemon. It keeps the cloud link (EdgeHub), stores what the node holds
//! (MetaManager), and, as later issues land, runs its pods (Edged) and devices (DeviceTwin).
// `deny`, not `forbid`: `memory::trim` is the one audited call into the C library.
#![deny(unsafe_code)]

pub mod config;
pub mod devicetwin;
pub mod edged;
pub mod edgehub;
pub mod eventbus;
#[cfg(test)]
mod kubeedge_capture;
pub mod memory;
pub mod metamanager;
pub mod observability;
pub mod unix_grpc;

//! cloudcore: attaches to a Kubernetes cluster and serves edge nodes over the cloud–edge link.
#![forbid(unsafe_code)]

pub mod cloudhub;
pub mod cloudstream;
pub mod config;
pub mod devicecontroller;
pub mod edgecontroller;
pub mod kubeclient;
pub mod leader;
pub mod node_refs;
pub mod nodeidentity;
pub mod observability;
pub mod server;
pub mod synccontroller;

//! Test support for kedge and its end-to-end scenarios. Nothing here ships: cloudcore and edgecore
//! never depend on this crate.
//!
//! What lives here as the issues land: the test Kubernetes API server (real list/watch
//! semantics, so cloudcore is tested through kube-rs exactly as against a real cluster), process
//! and fixture helpers (containerd, mosquitto, network namespaces) and the edge-node simulator.
#![forbid(unsafe_code)]

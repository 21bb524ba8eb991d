//! Edged: the trimmed kubelet. It reads pods only from the local store (MetaManager's `follow()`
//! feed), never from the cloud, so it behaves the same online, offline and after a reboot.
//!
//! What exists so far is the runtime boundary ([`runtime`]): the CRI calls edged needs, behind a
//! trait with a containerd implementation over gRPC and an in-memory one for unit tests of the pod
//! logic. Pod workers, volumes, probes and status are still to come (issue: edged).
pub mod runtime;

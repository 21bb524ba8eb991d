//! Edged: the trimmed kubelet. It reads pods only from the local store (MetaManager's `follow()`
//! feed), never from the cloud, so it behaves the same online, offline and after a reboot.
//!
//! What exists so far:
//! - [`runtime`]: the CRI calls edged needs, behind a trait with a containerd implementation over
//!   gRPC and an in-memory one for unit tests of the pod logic;
//! - [`cri_config`]: pods to CRI sandbox and container configs (DNS, namespaces, cgroups,
//!   resources, security context, labels), with [`env`] resolving environments and [`qos`] the
//!   QoS class;
//! - [`status`]: container states, pod phase and conditions from runtime state, as the kubelet
//!   computes them; [`backoff`]: the kubelet's restart back-off (time passed in);
//! - [`pod_actions`]: what a pod needs next (sandbox, init containers in order, restarts per
//!   policy and back-off), from the pod and what the runtime has for it.
//!
//! - [`sync`]: one sync of one pod against the runtime; [`worker`]: a task per pod with its own
//!   state and timers (syncs, probes, back-off, termination) that reports the pod's status;
//!   [`manager`]: follows the store, hands pods to their workers and relists the runtime;
//!   [`probes`]: probes and lifecycle hooks.
//!
//! - [`node_status`]: the node's capacity, nodeInfo, addresses and conditions, reported every
//!   10 s.
//!
//! - [`volumes`]: the pod's volumes on the host, written ones updated in place; [`tokens`]:
//!   service account tokens for them, asked of cloudcore and refreshed.
//!
//! - [`pull_secrets`]: registry credentials from `imagePullSecrets`.
pub mod backoff;
pub mod cri_config;
pub mod env;
pub mod hosts;
pub mod image_gc;
pub mod kubeedge_node;
pub mod kubeedge_objects;
pub mod manager;
pub mod node;
pub mod node_status;
pub mod pod_actions;
pub mod pressure;
pub mod probes;
pub mod pull_secrets;
pub mod qos;
pub mod quantity;
pub mod runtime;
pub mod status;
pub mod streaming;
pub mod sync;
pub mod tokens;
pub mod volumes;
pub mod worker;

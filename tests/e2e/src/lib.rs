//! Test support for kedge and its end-to-end scenarios. Nothing here ships: cloudcore and edgecore
//! never depend on this crate.
//!
//! - [`apiserver::TestApiServer`]: a test Kubernetes API server with real list/watch semantics.
//! - [`proxy::ChaosProxy`]: a loopback TCP proxy that can cut every connection or refuse new ones,
//!   to kill links mid-stream and simulate an unreachable cloud.
//! - [`cloud::TestCloud`]: cloudhub started in-process with a throw-away PKI on random ports.
//! - [`edge::TestEdge`]: a real EdgeHub with a [`edge::RecordingStore`].
//! - [`cloud::raw_connect`]: a bare WebSocket client with a node certificate, for protocol-level tests.
//! - [`containerd::TestContainerd`]: a private containerd (hack/containerd-up.sh) for CRI tests.
//! - [`daemons::Setup`]: the shipped binaries with their config files, killable and restartable.
//! - [`registry::TestRegistry`]: a real registry with basic auth (docker-registry), for pulls.
//! - [`edgerig::Rig`]: cloudcore + edgecore + containerd + test API server, for edged scenarios.
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod cloud;
pub mod containerd;
pub mod daemons;
pub mod edge;
pub mod edgerig;
pub mod kubelet;
pub mod netns;
pub mod procfs;
pub mod proxy;
pub mod registry;

/// Polls `cond` every 50 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: std::time::Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

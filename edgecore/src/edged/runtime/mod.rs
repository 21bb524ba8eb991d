//! The container runtime boundary: the CRI v1 calls edged makes, as a trait.
//!
//! [`CriRuntime`] speaks CRI over gRPC to containerd's unix socket; [`MemoryRuntime`] keeps
//! sandboxes and containers in memory with the same state transitions, so pod workers are
//! unit-tested without a runtime (as youki puts system calls behind a trait). The trait uses the
//! CRI message types themselves: edged builds real CRI requests either way, and the test double
//! sees exactly what containerd would.

mod cri;
mod memory;

use std::future::Future;

pub use cri::CriRuntime;
pub use kedge_proto::cri::v1 as api;
pub use memory::MemoryRuntime;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot connect to the container runtime at {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("{method} failed: {code}: {message}")]
    Call {
        method: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Invalid(String),
}

impl RuntimeError {
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            RuntimeError::NotFound { .. }
                | RuntimeError::Call {
                    code: tonic::Code::NotFound,
                    ..
                }
        )
    }
}

pub type Result<T> = std::result::Result<T, RuntimeError>;

/// The CRI calls edged needs. Every future is `Send`, so pod workers can run on any thread.
pub trait Runtime: Send + Sync + 'static {
    /// Runtime name and version (`containerd`, `v1.6.20`), for the node's `nodeInfo`.
    fn version(&self) -> impl Future<Output = Result<api::VersionResponse>> + Send;

    /// Creates and starts a pod sandbox; returns its id.
    fn run_pod_sandbox(
        &self,
        config: api::PodSandboxConfig,
    ) -> impl Future<Output = Result<String>> + Send;
    fn stop_pod_sandbox(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    fn remove_pod_sandbox(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    fn pod_sandbox_status(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<api::PodSandboxStatus>> + Send;
    fn list_pod_sandboxes(
        &self,
        filter: Option<api::PodSandboxFilter>,
    ) -> impl Future<Output = Result<Vec<api::PodSandbox>>> + Send;

    /// Creates a container in a sandbox; returns its id.
    fn create_container(
        &self,
        sandbox_id: &str,
        config: api::ContainerConfig,
        sandbox_config: api::PodSandboxConfig,
    ) -> impl Future<Output = Result<String>> + Send;
    fn start_container(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    /// Stops a container, killing it after `timeout_seconds`.
    fn stop_container(
        &self,
        id: &str,
        timeout_seconds: i64,
    ) -> impl Future<Output = Result<()>> + Send;
    fn remove_container(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    fn list_containers(
        &self,
        filter: Option<api::ContainerFilter>,
    ) -> impl Future<Output = Result<Vec<api::Container>>> + Send;
    fn container_status(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<api::ContainerStatus>> + Send;
    /// Runs a command in a running container and waits for it (probes, tests).
    fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout_seconds: i64,
    ) -> impl Future<Output = Result<api::ExecSyncResponse>> + Send;

    /// Prepares a streaming exec; returns the URL of the runtime's streaming server that
    /// serves it (kubectl exec's upgraded connection is proxied there).
    fn exec(&self, request: api::ExecRequest) -> impl Future<Output = Result<String>> + Send;
    /// Prepares an attach to a running container; returns the streaming URL.
    fn attach(&self, request: api::AttachRequest) -> impl Future<Output = Result<String>> + Send;
    /// Prepares a port-forward into a sandbox's network namespace; returns the streaming URL.
    fn port_forward(
        &self,
        request: api::PortForwardRequest,
    ) -> impl Future<Output = Result<String>> + Send;

    /// The image, if present on the node.
    fn image_status(&self, image: &str) -> impl Future<Output = Result<Option<api::Image>>> + Send;
    /// The image the runtime makes sandboxes from, if it says (containerd: `sandboxImage` in
    /// the config of a verbose `Status`). Image GC never removes it: an offline node could not
    /// pull it back, and no pod could start.
    fn sandbox_image(&self) -> impl Future<Output = Result<Option<String>>> + Send;
    /// Every image on the node (image garbage collection).
    fn list_images(&self) -> impl Future<Output = Result<Vec<api::Image>>> + Send;
    /// Removes an image by id.
    fn remove_image(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    /// The filesystems images are stored on, with what the images use of them.
    fn image_fs_info(&self) -> impl Future<Output = Result<Vec<api::FilesystemUsage>>> + Send;
    /// Pulls an image; returns the image reference the runtime resolved it to.
    fn pull_image(
        &self,
        image: &str,
        auth: Option<api::AuthConfig>,
        sandbox_config: Option<api::PodSandboxConfig>,
    ) -> impl Future<Output = Result<String>> + Send;
}

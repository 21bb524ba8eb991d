//! CRI v1 over gRPC on a unix socket (containerd's `/run/containerd/containerd.sock`).

use std::path::{Path, PathBuf};

use tonic::transport::Channel;

use super::api::image_service_client::ImageServiceClient;
use super::api::runtime_service_client::RuntimeServiceClient;
use super::{Result, Runtime, RuntimeError, api};

/// A CRI runtime reached over its unix socket. Cheap to clone; calls share one HTTP/2 connection.
#[derive(Clone)]
pub struct CriRuntime {
    socket: PathBuf,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

fn call_err(method: &'static str) -> impl FnOnce(tonic::Status) -> RuntimeError {
    move |s| RuntimeError::Call {
        method,
        code: s.code(),
        message: s.message().to_owned(),
    }
}

impl CriRuntime {
    /// Connects to the CRI socket and checks that it answers `Version`.
    pub async fn connect(socket: &Path) -> Result<CriRuntime> {
        let fail = |reason: String| RuntimeError::Connect {
            endpoint: socket.display().to_string(),
            reason,
        };
        let channel = crate::unix_grpc::channel(socket, None).await.map_err(|e| {
            fail(format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            ))
        })?;
        let rt = CriRuntime {
            socket: socket.to_owned(),
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        };
        rt.version().await.map_err(|e| fail(e.to_string()))?;
        Ok(rt)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Runtime for CriRuntime {
    async fn version(&self) -> Result<api::VersionResponse> {
        let r = self
            .runtime
            .clone()
            .version(api::VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(call_err("Version"))?;
        Ok(r.into_inner())
    }

    async fn run_pod_sandbox(&self, config: api::PodSandboxConfig) -> Result<String> {
        let r = self
            .runtime
            .clone()
            .run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .map_err(call_err("RunPodSandbox"))?;
        Ok(r.into_inner().pod_sandbox_id)
    }

    async fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        self.runtime
            .clone()
            .stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            })
            .await
            .map_err(call_err("StopPodSandbox"))?;
        Ok(())
    }

    async fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        self.runtime
            .clone()
            .remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            })
            .await
            .map_err(call_err("RemovePodSandbox"))?;
        Ok(())
    }

    async fn pod_sandbox_status(&self, id: &str) -> Result<api::PodSandboxStatus> {
        let r = self
            .runtime
            .clone()
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: false,
            })
            .await
            .map_err(call_err("PodSandboxStatus"))?;
        r.into_inner().status.ok_or_else(|| RuntimeError::NotFound {
            what: "sandbox",
            id: id.to_owned(),
        })
    }

    async fn list_pod_sandboxes(
        &self,
        filter: Option<api::PodSandboxFilter>,
    ) -> Result<Vec<api::PodSandbox>> {
        let r = self
            .runtime
            .clone()
            .list_pod_sandbox(api::ListPodSandboxRequest { filter })
            .await
            .map_err(call_err("ListPodSandbox"))?;
        Ok(r.into_inner().items)
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: api::ContainerConfig,
        sandbox_config: api::PodSandboxConfig,
    ) -> Result<String> {
        let r = self
            .runtime
            .clone()
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: sandbox_id.to_owned(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            })
            .await
            .map_err(call_err("CreateContainer"))?;
        Ok(r.into_inner().container_id)
    }

    async fn start_container(&self, id: &str) -> Result<()> {
        self.runtime
            .clone()
            .start_container(api::StartContainerRequest {
                container_id: id.to_owned(),
            })
            .await
            .map_err(call_err("StartContainer"))?;
        Ok(())
    }

    async fn stop_container(&self, id: &str, timeout_seconds: i64) -> Result<()> {
        self.runtime
            .clone()
            .stop_container(api::StopContainerRequest {
                container_id: id.to_owned(),
                timeout: timeout_seconds,
            })
            .await
            .map_err(call_err("StopContainer"))?;
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<()> {
        self.runtime
            .clone()
            .remove_container(api::RemoveContainerRequest {
                container_id: id.to_owned(),
            })
            .await
            .map_err(call_err("RemoveContainer"))?;
        Ok(())
    }

    async fn list_containers(
        &self,
        filter: Option<api::ContainerFilter>,
    ) -> Result<Vec<api::Container>> {
        let r = self
            .runtime
            .clone()
            .list_containers(api::ListContainersRequest { filter })
            .await
            .map_err(call_err("ListContainers"))?;
        Ok(r.into_inner().containers)
    }

    async fn container_status(&self, id: &str) -> Result<api::ContainerStatus> {
        let r = self
            .runtime
            .clone()
            .container_status(api::ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            })
            .await
            .map_err(call_err("ContainerStatus"))?;
        r.into_inner().status.ok_or_else(|| RuntimeError::NotFound {
            what: "container",
            id: id.to_owned(),
        })
    }

    async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout_seconds: i64,
    ) -> Result<api::ExecSyncResponse> {
        let r = self
            .runtime
            .clone()
            .exec_sync(api::ExecSyncRequest {
                container_id: id.to_owned(),
                cmd,
                timeout: timeout_seconds,
            })
            .await
            .map_err(call_err("ExecSync"))?;
        Ok(r.into_inner())
    }

    async fn exec(&self, request: api::ExecRequest) -> Result<String> {
        let r = self
            .runtime
            .clone()
            .exec(request)
            .await
            .map_err(call_err("Exec"))?;
        Ok(r.into_inner().url)
    }

    async fn attach(&self, request: api::AttachRequest) -> Result<String> {
        let r = self
            .runtime
            .clone()
            .attach(request)
            .await
            .map_err(call_err("Attach"))?;
        Ok(r.into_inner().url)
    }

    async fn port_forward(&self, request: api::PortForwardRequest) -> Result<String> {
        let r = self
            .runtime
            .clone()
            .port_forward(request)
            .await
            .map_err(call_err("PortForward"))?;
        Ok(r.into_inner().url)
    }

    async fn image_status(&self, image: &str) -> Result<Option<api::Image>> {
        let r = self
            .images
            .clone()
            .image_status(api::ImageStatusRequest {
                image: Some(api::ImageSpec {
                    image: image.to_owned(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .map_err(call_err("ImageStatus"))?;
        Ok(r.into_inner().image)
    }

    async fn sandbox_image(&self) -> Result<Option<String>> {
        let r = self
            .runtime
            .clone()
            .status(api::StatusRequest { verbose: true })
            .await
            .map_err(call_err("Status"))?;
        Ok(r.into_inner()
            .info
            .get("config")
            .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
            .and_then(|c| c.get("sandboxImage")?.as_str().map(str::to_owned)))
    }

    async fn list_images(&self) -> Result<Vec<api::Image>> {
        let r = self
            .images
            .clone()
            .list_images(api::ListImagesRequest { filter: None })
            .await
            .map_err(call_err("ListImages"))?;
        Ok(r.into_inner().images)
    }

    async fn remove_image(&self, id: &str) -> Result<()> {
        self.images
            .clone()
            .remove_image(api::RemoveImageRequest {
                image: Some(api::ImageSpec {
                    image: id.to_owned(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(call_err("RemoveImage"))?;
        Ok(())
    }

    async fn image_fs_info(&self) -> Result<Vec<api::FilesystemUsage>> {
        let r = self
            .images
            .clone()
            .image_fs_info(api::ImageFsInfoRequest {})
            .await
            .map_err(call_err("ImageFsInfo"))?;
        Ok(r.into_inner().image_filesystems)
    }

    async fn pull_image(
        &self,
        image: &str,
        auth: Option<api::AuthConfig>,
        sandbox_config: Option<api::PodSandboxConfig>,
    ) -> Result<String> {
        let r = self
            .images
            .clone()
            .pull_image(api::PullImageRequest {
                image: Some(api::ImageSpec {
                    image: image.to_owned(),
                    ..Default::default()
                }),
                auth,
                sandbox_config,
            })
            .await
            .map_err(call_err("PullImage"))?;
        Ok(r.into_inner().image_ref)
    }
}

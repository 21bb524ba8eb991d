//! An in-memory CRI runtime with containerd's state transitions, for unit tests of pod logic.
//!
//! Sandboxes are `Ready` until stopped; containers go `Created` → `Running` → `Exited`. Stopping a
//! sandbox kills its containers (exit code 137), removing it removes them; removals are
//! idempotent, as CRI requires. A container can only be created from an image the runtime has
//! ([`MemoryRuntime::add_image`], or pulled when [`MemoryRuntime::allow_pull`] allowed it). Time
//! is a fake clock ([`MemoryRuntime::set_time`]), so tests control timestamps, and a test makes
//! a container exit with [`MemoryRuntime::exit_container`].

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::{Result, Runtime, RuntimeError, api};

#[derive(Debug, Clone)]
struct SandboxEntry {
    config: api::PodSandboxConfig,
    ready: bool,
    created_at: i64,
    ip: String,
}

#[derive(Debug, Clone)]
struct ContainerEntry {
    sandbox_id: String,
    config: api::ContainerConfig,
    state: api::ContainerState,
    created_at: i64,
    started_at: i64,
    finished_at: i64,
    exit_code: i32,
    reason: String,
}

/// The size of an in-memory image unless set ([`MemoryRuntime::add_image_of_size`]).
pub const MEMORY_IMAGE_SIZE: u64 = 1 << 20;

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    now: i64,
    sandboxes: HashMap<String, SandboxEntry>,
    containers: HashMap<String, ContainerEntry>,
    images: HashSet<String>,
    /// What `sandbox_image` answers.
    sandbox_image: Option<String>,
    /// Sizes of images other than the default [`MEMORY_IMAGE_SIZE`].
    image_sizes: HashMap<String, u64>,
    pullable: HashSet<String>,
    /// Every call, in order (`"StartContainer <id>"`), for tests that check what edged did.
    calls: Vec<String>,
}

#[derive(Debug, Default)]
pub struct MemoryRuntime {
    state: Mutex<State>,
}

fn labels_match(selector: &HashMap<String, String>, labels: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn not_found(what: &'static str, id: &str) -> RuntimeError {
    RuntimeError::NotFound {
        what,
        id: id.to_owned(),
    }
}

impl MemoryRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `image` present, as if pulled earlier.
    pub fn add_image(&self, image: &str) {
        self.state().images.insert(image.to_owned());
    }

    /// Makes `image` present with a size, as if pulled earlier.
    pub fn add_image_of_size(&self, image: &str, bytes: u64) {
        let mut s = self.state();
        s.images.insert(image.to_owned());
        s.image_sizes.insert(image.to_owned(), bytes);
    }

    /// The image sandboxes are made from, as containerd's config would say.
    pub fn set_sandbox_image(&self, image: &str) {
        self.state().sandbox_image = Some(image.to_owned());
    }

    /// Whether `image` is present.
    pub fn has_image(&self, image: &str) -> bool {
        self.state().images.contains(image)
    }

    /// Lets `image` be pulled (any other pull fails with NotFound, as for a missing image).
    pub fn allow_pull(&self, image: &str) {
        self.state().pullable.insert(image.to_owned());
    }

    /// Sets the fake clock (nanoseconds since the epoch, as CRI timestamps are).
    pub fn set_time(&self, nanos: i64) {
        self.state().now = nanos;
    }

    /// A running container exits on its own with `code`.
    pub fn exit_container(&self, id: &str, code: i32) -> Result<()> {
        let mut s = self.state();
        let now = s.now;
        running(&s, id)?;
        let c = s
            .containers
            .get_mut(id)
            .ok_or_else(|| not_found("container", id))?;
        c.state = api::ContainerState::ContainerExited;
        c.exit_code = code;
        c.finished_at = now;
        c.reason = if code == 0 { "Completed" } else { "Error" }.into();
        Ok(())
    }

    /// The calls made so far, in order.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    fn record(s: &mut State, call: String) -> String {
        s.calls.push(call);
        s.next_id += 1;
        format!("{:064x}", s.next_id)
    }
}

/// The container exists and runs (what the runtime requires before exec, attach or an exit).
fn running(s: &State, id: &str) -> Result<()> {
    let c = s
        .containers
        .get(id)
        .ok_or_else(|| not_found("container", id))?;
    if c.state != api::ContainerState::ContainerRunning {
        return Err(RuntimeError::Invalid(format!(
            "container {id} is not running"
        )));
    }
    Ok(())
}

impl MemoryRuntime {
    /// A URL as containerd hands out (nothing serves it: the double has no streaming server),
    /// after the checks the runtime makes: the container must be running, the sandbox exist.
    fn streaming_url(&self, verb: &str, id: &str, container: bool) -> Result<String> {
        let s = self.state();
        if container {
            running(&s, id)?;
        } else if !s.sandboxes.contains_key(id) {
            return Err(not_found("sandbox", id));
        }
        Ok(format!("http://127.0.0.1:1/{verb}/{id}"))
    }
}

impl Runtime for MemoryRuntime {
    async fn version(&self) -> Result<api::VersionResponse> {
        Ok(api::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "memory".into(),
            runtime_version: "0".into(),
            runtime_api_version: "v1".into(),
        })
    }

    async fn run_pod_sandbox(&self, config: api::PodSandboxConfig) -> Result<String> {
        if config
            .metadata
            .as_ref()
            .is_none_or(|m| m.uid.is_empty() || m.name.is_empty())
        {
            return Err(RuntimeError::Invalid(
                "sandbox config needs metadata with a name and uid".into(),
            ));
        }
        let host_network = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref())
            .is_some_and(|n| n.network == api::NamespaceMode::Node as i32);
        let mut s = self.state();
        let id = Self::record(&mut s, "RunPodSandbox".into());
        let ip = if host_network {
            String::new()
        } else {
            format!("10.0.{}.{}", (s.next_id >> 8) & 0xff, s.next_id & 0xff)
        };
        let created_at = s.now;
        s.sandboxes.insert(
            id.clone(),
            SandboxEntry {
                config,
                ready: true,
                created_at,
                ip,
            },
        );
        Ok(id)
    }

    async fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        let mut s = self.state();
        s.calls.push(format!("StopPodSandbox {id}"));
        let now = s.now;
        let sb = s
            .sandboxes
            .get_mut(id)
            .ok_or_else(|| not_found("sandbox", id))?;
        sb.ready = false;
        for c in s.containers.values_mut().filter(|c| c.sandbox_id == id) {
            if c.state == api::ContainerState::ContainerRunning {
                c.state = api::ContainerState::ContainerExited;
                c.exit_code = 137;
                c.finished_at = now;
                c.reason = "Error".into();
            }
        }
        Ok(())
    }

    async fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        let mut s = self.state();
        s.calls.push(format!("RemovePodSandbox {id}"));
        s.sandboxes.remove(id);
        s.containers.retain(|_, c| c.sandbox_id != id);
        Ok(())
    }

    async fn pod_sandbox_status(&self, id: &str) -> Result<api::PodSandboxStatus> {
        let s = self.state();
        let sb = s
            .sandboxes
            .get(id)
            .ok_or_else(|| not_found("sandbox", id))?;
        Ok(api::PodSandboxStatus {
            id: id.to_owned(),
            metadata: sb.config.metadata.clone(),
            state: if sb.ready {
                api::PodSandboxState::SandboxReady as i32
            } else {
                api::PodSandboxState::SandboxNotready as i32
            },
            created_at: sb.created_at,
            network: Some(api::PodSandboxNetworkStatus {
                ip: sb.ip.clone(),
                additional_ips: Vec::new(),
            }),
            labels: sb.config.labels.clone(),
            annotations: sb.config.annotations.clone(),
            ..Default::default()
        })
    }

    async fn list_pod_sandboxes(
        &self,
        filter: Option<api::PodSandboxFilter>,
    ) -> Result<Vec<api::PodSandbox>> {
        let s = self.state();
        let f = filter.unwrap_or_default();
        let mut out: Vec<api::PodSandbox> = s
            .sandboxes
            .iter()
            .filter(|(id, sb)| {
                (f.id.is_empty() || **id == f.id)
                    && f.state.as_ref().is_none_or(|st| {
                        (st.state == api::PodSandboxState::SandboxReady as i32) == sb.ready
                    })
                    && labels_match(&f.label_selector, &sb.config.labels)
            })
            .map(|(id, sb)| api::PodSandbox {
                id: id.clone(),
                metadata: sb.config.metadata.clone(),
                state: if sb.ready {
                    api::PodSandboxState::SandboxReady as i32
                } else {
                    api::PodSandboxState::SandboxNotready as i32
                },
                created_at: sb.created_at,
                labels: sb.config.labels.clone(),
                annotations: sb.config.annotations.clone(),
                runtime_handler: String::new(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: api::ContainerConfig,
        _sandbox_config: api::PodSandboxConfig,
    ) -> Result<String> {
        let mut s = self.state();
        match s.sandboxes.get(sandbox_id) {
            Some(sb) if sb.ready => {}
            Some(_) => {
                return Err(RuntimeError::Invalid(format!(
                    "sandbox {sandbox_id} is not ready"
                )));
            }
            None => return Err(not_found("sandbox", sandbox_id)),
        }
        let image = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        if !s.images.contains(&image) {
            return Err(not_found("image", &image));
        }
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = Self::record(&mut s, format!("CreateContainer {name}"));
        let created_at = s.now;
        s.containers.insert(
            id.clone(),
            ContainerEntry {
                sandbox_id: sandbox_id.to_owned(),
                config,
                state: api::ContainerState::ContainerCreated,
                created_at,
                started_at: 0,
                finished_at: 0,
                exit_code: 0,
                reason: String::new(),
            },
        );
        Ok(id)
    }

    async fn start_container(&self, id: &str) -> Result<()> {
        let mut s = self.state();
        s.calls.push(format!("StartContainer {id}"));
        let now = s.now;
        let c = s
            .containers
            .get_mut(id)
            .ok_or_else(|| not_found("container", id))?;
        if c.state != api::ContainerState::ContainerCreated {
            return Err(RuntimeError::Invalid(format!(
                "container {id} cannot be started in state {:?}",
                c.state
            )));
        }
        c.state = api::ContainerState::ContainerRunning;
        c.started_at = now;
        Ok(())
    }

    async fn stop_container(&self, id: &str, _timeout_seconds: i64) -> Result<()> {
        let mut s = self.state();
        s.calls.push(format!("StopContainer {id}"));
        let now = s.now;
        let c = s
            .containers
            .get_mut(id)
            .ok_or_else(|| not_found("container", id))?;
        if c.state != api::ContainerState::ContainerExited {
            c.state = api::ContainerState::ContainerExited;
            c.exit_code = 137;
            c.finished_at = now;
            c.reason = "Error".into();
        }
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<()> {
        let mut s = self.state();
        s.calls.push(format!("RemoveContainer {id}"));
        s.containers.remove(id);
        Ok(())
    }

    async fn list_containers(
        &self,
        filter: Option<api::ContainerFilter>,
    ) -> Result<Vec<api::Container>> {
        let s = self.state();
        let f = filter.unwrap_or_default();
        let mut out: Vec<api::Container> = s
            .containers
            .iter()
            .filter(|(id, c)| {
                (f.id.is_empty() || **id == f.id)
                    && (f.pod_sandbox_id.is_empty() || c.sandbox_id == f.pod_sandbox_id)
                    && f.state.as_ref().is_none_or(|st| st.state == c.state as i32)
                    && labels_match(&f.label_selector, &c.config.labels)
            })
            .map(|(id, c)| api::Container {
                id: id.clone(),
                pod_sandbox_id: c.sandbox_id.clone(),
                metadata: c.config.metadata.clone(),
                image: c.config.image.clone(),
                image_ref: c
                    .config
                    .image
                    .as_ref()
                    .map(|i| i.image.clone())
                    .unwrap_or_default(),
                state: c.state as i32,
                created_at: c.created_at,
                labels: c.config.labels.clone(),
                annotations: c.config.annotations.clone(),
                image_id: String::new(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn container_status(&self, id: &str) -> Result<api::ContainerStatus> {
        let s = self.state();
        let c = s
            .containers
            .get(id)
            .ok_or_else(|| not_found("container", id))?;
        Ok(api::ContainerStatus {
            id: id.to_owned(),
            metadata: c.config.metadata.clone(),
            state: c.state as i32,
            created_at: c.created_at,
            started_at: c.started_at,
            finished_at: c.finished_at,
            exit_code: c.exit_code,
            image: c.config.image.clone(),
            image_ref: c
                .config
                .image
                .as_ref()
                .map(|i| i.image.clone())
                .unwrap_or_default(),
            reason: c.reason.clone(),
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
            log_path: c.config.log_path.clone(),
            ..Default::default()
        })
    }

    async fn exec_sync(
        &self,
        id: &str,
        _cmd: Vec<String>,
        _timeout_seconds: i64,
    ) -> Result<api::ExecSyncResponse> {
        running(&self.state(), id)?;
        Err(RuntimeError::Invalid(
            "the in-memory runtime runs no commands".into(),
        ))
    }

    async fn exec(&self, request: api::ExecRequest) -> Result<String> {
        self.streaming_url("exec", &request.container_id, true)
    }

    async fn attach(&self, request: api::AttachRequest) -> Result<String> {
        self.streaming_url("attach", &request.container_id, true)
    }

    async fn port_forward(&self, request: api::PortForwardRequest) -> Result<String> {
        self.streaming_url("portforward", &request.pod_sandbox_id, false)
    }

    async fn image_status(&self, image: &str) -> Result<Option<api::Image>> {
        let s = self.state();
        Ok(s.images.contains(image).then(|| api::Image {
            id: format!("sha256:{image}"),
            repo_tags: vec![image.to_owned()],
            ..Default::default()
        }))
    }

    async fn sandbox_image(&self) -> Result<Option<String>> {
        Ok(self.state().sandbox_image.clone())
    }

    async fn list_images(&self) -> Result<Vec<api::Image>> {
        let s = self.state();
        let mut images: Vec<api::Image> = s
            .images
            .iter()
            .map(|name| api::Image {
                id: format!("sha256:{name}"),
                repo_tags: vec![name.clone()],
                size: s
                    .image_sizes
                    .get(name)
                    .copied()
                    .unwrap_or(MEMORY_IMAGE_SIZE),
                ..Default::default()
            })
            .collect();
        images.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(images)
    }

    async fn remove_image(&self, id: &str) -> Result<()> {
        let mut s = self.state();
        s.calls.push(format!("RemoveImage {id}"));
        let name = id.strip_prefix("sha256:").unwrap_or(id).to_owned();
        if s.images.remove(&name) {
            s.image_sizes.remove(&name);
            Ok(())
        } else {
            Err(not_found("image", id))
        }
    }

    async fn image_fs_info(&self) -> Result<Vec<api::FilesystemUsage>> {
        let s = self.state();
        let used: u64 = s
            .images
            .iter()
            .map(|name| {
                s.image_sizes
                    .get(name)
                    .copied()
                    .unwrap_or(MEMORY_IMAGE_SIZE)
            })
            .sum();
        Ok(vec![api::FilesystemUsage {
            timestamp: s.now.max(1),
            fs_id: Some(api::FilesystemIdentifier {
                mountpoint: "/memory/images".into(),
            }),
            used_bytes: Some(api::UInt64Value { value: used }),
            inodes_used: None,
        }])
    }

    async fn pull_image(
        &self,
        image: &str,
        _auth: Option<api::AuthConfig>,
        _sandbox_config: Option<api::PodSandboxConfig>,
    ) -> Result<String> {
        let mut s = self.state();
        s.calls.push(format!("PullImage {image}"));
        if !s.pullable.contains(image) {
            return Err(RuntimeError::Call {
                method: "PullImage",
                code: tonic::Code::NotFound,
                message: format!("{image}: not found"),
            });
        }
        s.images.insert(image.to_owned());
        Ok(format!("sha256:{image}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(uid: &str) -> api::PodSandboxConfig {
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: "web".into(),
                uid: uid.into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            labels: HashMap::from([("io.kubernetes.pod.uid".into(), uid.into())]),
            ..Default::default()
        }
    }

    fn container(name: &str, image: &str) -> api::ContainerConfig {
        api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(api::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            labels: HashMap::from([("io.kubernetes.container.name".into(), name.into())]),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn containers_move_through_created_running_exited_and_sandboxes_take_them_along() {
        let rt = MemoryRuntime::new();
        rt.set_time(100);
        let sb = rt.run_pod_sandbox(sandbox("u1")).await.unwrap();
        assert!(
            rt.create_container(&sb, container("c", "busybox"), sandbox("u1"))
                .await
                .unwrap_err()
                .is_not_found(),
            "no image, no container"
        );
        assert!(
            rt.pull_image("busybox", None, None)
                .await
                .unwrap_err()
                .is_not_found()
        );
        rt.allow_pull("busybox");
        rt.pull_image("busybox", None, None).await.unwrap();
        let c = rt
            .create_container(&sb, container("c", "busybox"), sandbox("u1"))
            .await
            .unwrap();
        rt.set_time(200);
        rt.start_container(&c).await.unwrap();
        assert!(rt.start_container(&c).await.is_err(), "started once only");
        let st = rt.container_status(&c).await.unwrap();
        assert_eq!(
            (st.state, st.started_at),
            (api::ContainerState::ContainerRunning as i32, 200)
        );
        rt.set_time(300);
        rt.exit_container(&c, 3).unwrap();
        let st = rt.container_status(&c).await.unwrap();
        assert_eq!(
            (st.state, st.exit_code, st.finished_at),
            (api::ContainerState::ContainerExited as i32, 3, 300)
        );

        let c2 = rt
            .create_container(&sb, container("d", "busybox"), sandbox("u1"))
            .await
            .unwrap();
        rt.start_container(&c2).await.unwrap();
        let by_label = rt
            .list_containers(Some(api::ContainerFilter {
                label_selector: HashMap::from([(
                    "io.kubernetes.container.name".into(),
                    "d".into(),
                )]),
                ..Default::default()
            }))
            .await
            .unwrap();
        assert_eq!(by_label.len(), 1);
        rt.stop_pod_sandbox(&sb).await.unwrap();
        assert_eq!(rt.container_status(&c2).await.unwrap().exit_code, 137);
        let ready = rt
            .list_pod_sandboxes(Some(api::PodSandboxFilter {
                state: Some(api::PodSandboxStateValue {
                    state: api::PodSandboxState::SandboxReady as i32,
                }),
                ..Default::default()
            }))
            .await
            .unwrap();
        assert!(ready.is_empty());
        rt.remove_pod_sandbox(&sb).await.unwrap();
        rt.remove_pod_sandbox(&sb).await.unwrap();
        assert!(rt.list_containers(None).await.unwrap().is_empty());
        assert!(rt.container_status(&c).await.unwrap_err().is_not_found());
    }
}

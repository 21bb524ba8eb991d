//! One sync of one pod against the runtime: read what the runtime has for the pod (by its UID
//! label), decide ([`pod_actions`](super::pod_actions)), act (sandbox, image, create and start
//! containers), and compute the status the API should show. The pod worker calls it after every
//! change of the pod and on every relist tick.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::backoff::RestartBackoff;
use super::cri_config::{self, NodeSettings, POD_UID_LABEL};
use super::env::{ObjectSource, PodContext};
use super::hosts;
use super::pod_actions::{self, ContainerInfo, RuntimePod, SandboxInfo};
use super::probes::{self, ContainerProbeView};
use super::pull_secrets;
use super::qos::qos_class;
use super::runtime::{Runtime, RuntimeError, api};
use super::status::{self, ContainerView, Waiting};
use super::volumes;

/// Grace period for containers killed because their sandbox went away.
const KILL_GRACE_SECONDS: i64 = 2;

/// What the runtime has for one pod, with each container's CRI status.
pub struct Observed {
    pub pod: RuntimePod,
    pub sandbox_ip: String,
    pub statuses: HashMap<String, api::ContainerStatus>,
}

fn uid_filter<T>(uid: &str, make: impl FnOnce(HashMap<String, String>) -> T) -> Option<T> {
    Some(make(HashMap::from([(
        POD_UID_LABEL.to_owned(),
        uid.to_owned(),
    )])))
}

/// Lists the pod's sandboxes and containers.
pub async fn observe<R: Runtime>(rt: &R, uid: &str) -> Result<Observed, RuntimeError> {
    let sandboxes = rt
        .list_pod_sandboxes(uid_filter(uid, |label_selector| api::PodSandboxFilter {
            label_selector,
            ..Default::default()
        }))
        .await?;
    let containers = rt
        .list_containers(uid_filter(uid, |label_selector| api::ContainerFilter {
            label_selector,
            ..Default::default()
        }))
        .await?;
    let mut observed = Observed {
        pod: RuntimePod::default(),
        sandbox_ip: String::new(),
        statuses: HashMap::new(),
    };
    for s in &sandboxes {
        observed.pod.sandboxes.push(SandboxInfo {
            id: s.id.clone(),
            attempt: s.metadata.as_ref().map_or(0, |m| m.attempt),
            ready: s.state == api::PodSandboxState::SandboxReady as i32,
            created_at: s.created_at,
        });
    }
    if let Some(newest) = observed
        .pod
        .sandboxes
        .iter()
        .filter(|s| s.ready)
        .max_by_key(|s| (s.attempt, s.created_at))
    {
        observed.sandbox_ip = rt
            .pod_sandbox_status(&newest.id)
            .await?
            .network
            .map(|n| n.ip)
            .unwrap_or_default();
    }
    for c in &containers {
        let st = match rt.container_status(&c.id).await {
            Ok(s) => s,
            // Removed between the list and now.
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        observed.pod.containers.push(ContainerInfo {
            id: c.id.clone(),
            name: c
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default(),
            attempt: c.metadata.as_ref().map_or(0, |m| m.attempt),
            sandbox_id: c.pod_sandbox_id.clone(),
            state: api::ContainerState::try_from(st.state)
                .unwrap_or(api::ContainerState::ContainerUnknown),
            exit_code: st.exit_code,
        });
        observed.statuses.insert(c.id.clone(), st);
    }
    Ok(observed)
}

/// Stops every container and sandbox of the pod (graceful for containers, then the sandboxes).
pub async fn kill_pod<R: Runtime>(
    rt: &R,
    observed: &Observed,
    grace_seconds: i64,
) -> Result<(), RuntimeError> {
    for c in &observed.pod.containers {
        if c.state == api::ContainerState::ContainerRunning {
            rt.stop_container(&c.id, grace_seconds).await?;
        }
    }
    for s in &observed.pod.sandboxes {
        if s.ready {
            rt.stop_pod_sandbox(&s.id).await?;
        }
    }
    Ok(())
}

/// Makes sure `image` is present, honouring `imagePullPolicy` (default: `Always` for `:latest`
/// or no tag, else `IfNotPresent`). A failure is the container's waiting reason.
async fn ensure_image<R: Runtime>(
    rt: &R,
    image: &str,
    policy: Option<&str>,
    sandbox: &api::PodSandboxConfig,
    credentials: &[api::AuthConfig],
) -> Result<(), Waiting> {
    let last = image.rsplit('/').next().unwrap_or(image);
    let latest = !last.contains(':') || last.ends_with(":latest");
    let policy = policy.unwrap_or(if latest { "Always" } else { "IfNotPresent" });
    let present = match rt.image_status(image).await {
        Ok(found) => found.is_some(),
        Err(e) => {
            // Not fatal: a pull (or its error, which the status shows) follows.
            tracing::warn!(%image, error = %e, "cannot read image status");
            false
        }
    };
    match policy {
        "Never" if !present => Err(Waiting {
            reason: "ErrImageNeverPull".into(),
            message: format!(
                "Container image \"{image}\" is not present with pull policy of Never"
            ),
        }),
        "Never" => Ok(()),
        "IfNotPresent" if present => Ok(()),
        _ => {
            // Each matching credential, then anonymously (as the kubelet tries them).
            let attempts = credentials.iter().cloned().map(Some).chain([None]);
            let mut last_error = String::new();
            for auth in attempts {
                match rt.pull_image(image, auth, Some(sandbox.clone())).await {
                    Ok(_) => return Ok(()),
                    Err(e) => last_error = e.to_string(),
                }
            }
            // Offline, a present image still runs (the registry is merely unreachable); a
            // registry that answers no (bad credentials, no such image) is not overruled.
            if present && unreachable(&last_error) {
                tracing::info!(%image, error = %last_error, "registry unreachable; using the image present on the node");
                return Ok(());
            }
            Err(Waiting {
                reason: "ErrImagePull".into(),
                message: last_error,
            })
        }
    }
}

/// Whether a pull failed for want of a network (not because the registry refused).
fn unreachable(error: &str) -> bool {
    [
        "dial tcp",
        "connection refused",
        "no such host",
        "i/o timeout",
        "network is unreachable",
        "TLS handshake timeout",
        "no route to host",
    ]
    .iter()
    .any(|m| error.contains(m))
}

/// The registry credentials of the pod's `imagePullSecrets` for `image` (a missing Secret is
/// skipped, as the kubelet does: the pull may still work anonymously).
fn pull_credentials(
    pod: &Pod,
    image: &str,
    source: &(dyn ObjectSource + Sync),
) -> Vec<api::AuthConfig> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let secrets: Vec<_> = pod
        .spec
        .iter()
        .flat_map(|s| s.image_pull_secrets.iter().flatten())
        .filter_map(|r| {
            let found = source.secret(ns, &r.name);
            if found.is_none() {
                tracing::warn!(pod = ?pod.metadata.name, secret = %r.name, "image pull secret not found; pulling without it");
            }
            found
        })
        .collect();
    pull_secrets::credentials_for(image, &secrets)
}

/// Per-pod memory between syncs.
#[derive(Debug, Default)]
pub struct PodMemory {
    pub start_time: Option<Time>,
    /// Why containers are held back, from the last sync.
    pub waiting: HashMap<String, Waiting>,
    /// What the probes say, by container ID (set by the pod worker before a sync).
    pub probes: HashMap<String, ContainerProbeView>,
    /// Running containers seen by the last sync: (name, container ID, started at in CRI
    /// nanoseconds), for the pod worker's probes.
    pub running: Vec<(String, String, i64)>,
    /// Settled termination messages of exited containers, by container ID.
    pub termination_messages: HashMap<String, String>,
}

/// The probe view of a running container the probes have not seen yet: not started while it
/// has a startup probe, not ready while it has a readiness probe.
fn unprobed_view(c: &k8s_openapi::api::core::v1::Container) -> ContainerProbeView {
    let started = c.startup_probe.is_none();
    ContainerProbeView {
        started,
        ready: started && c.readiness_probe.is_none(),
        kill: false,
    }
}

/// Syncs `pod` once and returns the status the API should show.
#[allow(clippy::too_many_arguments)]
pub async fn sync_pod<R: Runtime>(
    rt: &R,
    pod: &Pod,
    node: &NodeSettings,
    host_ip: &str,
    source: &(dyn ObjectSource + Sync),
    backoff: &mut RestartBackoff,
    memory: &mut PodMemory,
    now: Instant,
    wall_now: Time,
) -> Result<PodStatus, RuntimeError> {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let mut observed = observe(rt, &uid).await?;
    let actions = pod_actions::compute_actions(pod, &observed.pod, backoff, now);
    memory.waiting = actions.waiting.iter().cloned().collect();
    if actions.kill_pod {
        kill_pod(rt, &observed, KILL_GRACE_SECONDS).await?;
    }
    let spec = pod.spec.clone().unwrap_or_default();
    if let Some(attempt) = actions.create_sandbox {
        let config = cri_config::sandbox_config(pod, node, attempt)
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let _ = tokio::fs::create_dir_all(&config.log_directory).await;
        rt.run_pod_sandbox(config).await?;
    }
    if actions.start.is_empty() && observed.pod.sandboxes.iter().any(|s| s.ready) {
        // Keep written volumes current (ConfigMap/Secret changes reach running containers).
        let ctx = pod_context(node, host_ip, &observed);
        if let Err(e) = prepare_volumes(pod, node, &ctx, source).await {
            tracing::warn!(pod = ?pod.metadata.name, error = %e, "cannot update volumes");
        }
    }
    if !actions.start.is_empty() {
        observed = observe(rt, &uid).await?;
        let Some(sandbox) = observed
            .pod
            .sandboxes
            .iter()
            .filter(|s| s.ready)
            .max_by_key(|s| (s.attempt, s.created_at))
            .cloned()
        else {
            return Err(RuntimeError::Invalid(
                "the pod's sandbox is not ready".into(),
            ));
        };
        let ctx = pod_context(node, host_ip, &observed);
        let vols = match prepare_volumes(pod, node, &ctx, source).await {
            Ok(v) => v,
            Err(e) => {
                // A volume still being made (a token on its way) is `ContainerCreating`, as
                // with the kubelet waiting for a mount; a wrong reference is a config error.
                let reason = match e {
                    volumes::VolumeError::TokenUnavailable { .. } => "ContainerCreating",
                    _ => "CreateContainerConfigError",
                };
                for start in &actions.start {
                    memory.waiting.insert(
                        start.name.clone(),
                        Waiting {
                            reason: reason.into(),
                            message: e.to_string(),
                        },
                    );
                }
                return Ok(pod_status(pod, &observed, memory, host_ip, wall_now));
            }
        };
        let sb_config = cri_config::sandbox_config(pod, node, sandbox.attempt)
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        for start in &actions.start {
            let Some(container) = spec
                .init_containers
                .iter()
                .flatten()
                .chain(spec.containers.iter())
                .find(|c| c.name == start.name)
            else {
                continue;
            };
            let image = container.image.clone().unwrap_or_default();
            // Failed pulls back off like restarts (10 s doubling to 5 min), keyed apart from them.
            let pull_key = format!("pull/{}", start.name);
            if backoff.blocked_until(&uid, &pull_key, now).is_some() {
                memory.waiting.insert(
                    start.name.clone(),
                    Waiting {
                        reason: "ImagePullBackOff".into(),
                        message: format!("Back-off pulling image \"{image}\""),
                    },
                );
                continue;
            }
            let credentials = pull_credentials(pod, &image, source);
            if let Err(w) = ensure_image(
                rt,
                &image,
                container.image_pull_policy.as_deref(),
                &sb_config,
                &credentials,
            )
            .await
            {
                if w.reason == "ErrImagePull" {
                    backoff.failed(&uid, &pull_key, now, None);
                }
                memory.waiting.insert(start.name.clone(), w);
                continue;
            }
            let message_file = match termination_message_file(pod, container, start.attempt, node)
                .await
            {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(container = %container.name, error = %e, "cannot prepare the termination message file");
                    None
                }
            };
            let hosts_file = match pod_hosts_file(pod, node, &observed.sandbox_ip).await {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(container = %container.name, error = %e, "cannot write the pod's /etc/hosts");
                    None
                }
            };
            let config = match cri_config::container_config(
                pod,
                container,
                start.attempt,
                node,
                &ctx,
                source,
            )
            .map_err(|e| e.to_string())
            .and_then(|mut c| {
                c.mounts = volumes::mounts(pod, container, &vols).map_err(|e| e.to_string())?;
                if let Some((container_path, host_path)) = &message_file {
                    c.mounts.push(api::Mount {
                        container_path: container_path.clone(),
                        host_path: host_path.display().to_string(),
                        ..Default::default()
                    });
                }
                if let Some(host_path) = &hosts_file
                    && !c
                        .mounts
                        .iter()
                        .any(|m| m.container_path == hosts::HOSTS_PATH)
                {
                    c.mounts.push(api::Mount {
                        container_path: hosts::HOSTS_PATH.to_owned(),
                        host_path: host_path.display().to_string(),
                        ..Default::default()
                    });
                }
                Ok(c)
            }) {
                Ok(c) => c,
                Err(e) => {
                    memory.waiting.insert(
                        start.name.clone(),
                        Waiting {
                            reason: "CreateContainerConfigError".into(),
                            message: e,
                        },
                    );
                    continue;
                }
            };
            if start.attempt > 0 {
                // A restart: the next failure waits longer (the kubelet's back-off).
                let ran_since = observed
                    .pod
                    .containers
                    .iter()
                    .filter(|c| c.name == start.name)
                    .max_by_key(|c| c.attempt)
                    .and_then(|c| observed.statuses.get(&c.id))
                    .and_then(|s| ran_for(s, &wall_now))
                    .and_then(|d| now.checked_sub(d));
                backoff.failed(&uid, &start.name, now, ran_since);
            }
            let log_dir = std::path::Path::new(&sb_config.log_directory).join(&start.name);
            let _ = tokio::fs::create_dir_all(&log_dir).await;
            let id = rt
                .create_container(&sandbox.id, config, sb_config.clone())
                .await?;
            rt.start_container(&id).await?;
            tracing::debug!(target: "pod_path", pod = %format_args!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or_default(), pod.metadata.name.as_deref().unwrap_or_default()),
                %uid, container = %start.name, attempt = start.attempt, "5 container started");
            if let Some(hook) = container
                .lifecycle
                .as_ref()
                .and_then(|l| l.post_start.as_ref())
            {
                run_post_start(rt, pod, container, hook, &id, &observed.sandbox_ip).await?;
            }
            if start.init {
                // The next init container waits for this one to exit.
                break;
            }
        }
        observed = observe(rt, &uid).await?;
    }
    if prune_exited(rt, &observed).await? {
        observed = observe(rt, &uid).await?;
    }
    add_termination_messages(pod, node, &mut observed, &mut memory.termination_messages).await;
    Ok(pod_status(pod, &observed, memory, host_ip, wall_now))
}

/// The most of a termination message the API shows (as the kubelet limits it).
const MAX_TERMINATION_MESSAGE: usize = 4096;
/// With `FallbackToLogsOnError`: at most this many of the log's last lines, and bytes.
const FALLBACK_LOG_LINES: usize = 80;
const FALLBACK_LOG_BYTES: usize = 2048;

/// Where a container attempt's termination message lives on the host.
fn termination_message_host_path(
    node: &NodeSettings,
    uid: &str,
    name: &str,
    attempt: u32,
) -> std::path::PathBuf {
    volumes::pod_dir(&node.root_dir, uid)
        .join("containers")
        .join(name)
        .join(attempt.to_string())
}

/// Creates the empty, writable file mounted at the container's `terminationMessagePath`
/// (default `/dev/termination-log`); `None` when the path is set empty.
async fn termination_message_file(
    pod: &Pod,
    container: &k8s_openapi::api::core::v1::Container,
    attempt: u32,
    node: &NodeSettings,
) -> std::io::Result<Option<(String, std::path::PathBuf)>> {
    use std::os::unix::fs::PermissionsExt;
    let container_path = container
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".to_owned());
    if container_path.is_empty() {
        return Ok(None);
    }
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let host = termination_message_host_path(node, uid, &container.name, attempt);
    if let Some(dir) = host.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    tokio::fs::write(&host, b"").await?;
    // Any user in the container may write it, as with the kubelet.
    tokio::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o666)).await?;
    Ok(Some((container_path, host)))
}

/// The content of the last `lines` lines (at most `bytes`) of a CRI log file
/// (`<time> <stream> <P|F> <content>` per line).
fn cri_log_tail(text: &str, lines: usize, bytes: usize) -> String {
    let contents: Vec<&str> = text
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .collect();
    let start = contents.len().saturating_sub(lines);
    let mut out = contents[start..].join("\n");
    if out.len() > bytes {
        let mut cut = out.len() - bytes;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        out = out[cut..].to_owned();
    }
    out
}

/// The last `bytes` bytes of a (possibly large) log file, from its first whole line on.
async fn read_tail(path: &str, bytes: u64) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = tokio::fs::File::open(path).await?;
    let len = f.metadata().await?.len();
    let start = len.saturating_sub(bytes);
    f.seek(std::io::SeekFrom::Start(start)).await?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(match (start > 0, text.split_once('\n')) {
        (true, Some((_, rest))) => rest.to_owned(),
        _ => text,
    })
}

/// How much of a log the fallback message reads: its 80 lines rarely need more.
const FALLBACK_READ_BYTES: u64 = 64 * 1024;
/// An exited container's log is complete this long after it finished (containerd writes the
/// last lines asynchronously); its message is then final and kept.
const MESSAGE_SETTLED_NANOS: i64 = 5_000_000_000;

/// Fills in the termination message of exited containers (unless the runtime gave one): the
/// file the container wrote, or with `FallbackToLogsOnError` and a failure, its log's tail.
/// An exited container never changes, so its settled message is kept in `known` (by container
/// ID) and the files are not read again on every sync.
pub async fn add_termination_messages(
    pod: &Pod,
    node: &NodeSettings,
    observed: &mut Observed,
    known: &mut HashMap<String, String>,
) {
    let spec = pod.spec.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    known.retain(|id, _| observed.statuses.contains_key(id));
    let now =
        i64::try_from(k8s_openapi::jiff::Timestamp::now().as_nanosecond()).unwrap_or(i64::MAX);
    for c in &observed.pod.containers {
        if c.state != api::ContainerState::ContainerExited {
            continue;
        }
        let Some(st) = observed.statuses.get_mut(&c.id) else {
            continue;
        };
        if !st.message.is_empty() {
            continue;
        }
        if let Some(m) = known.get(&c.id) {
            st.message = m.clone();
            continue;
        }
        let host = termination_message_host_path(node, &uid, &c.name, c.attempt);
        let mut message = match tokio::fs::read(&host).await {
            Ok(mut b) => {
                b.truncate(MAX_TERMINATION_MESSAGE);
                String::from_utf8_lossy(&b).into_owned()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                tracing::warn!(container = %c.name, path = %host.display(), error = %e, "cannot read the termination message");
                String::new()
            }
        };
        let fallback = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|s| s.name == c.name)
            .and_then(|s| s.termination_message_policy.as_deref())
            == Some("FallbackToLogsOnError");
        if message.is_empty() && fallback && st.exit_code != 0 && !st.log_path.is_empty() {
            match read_tail(&st.log_path, FALLBACK_READ_BYTES).await {
                Ok(text) => message = cri_log_tail(&text, FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES),
                Err(e) => {
                    tracing::warn!(container = %c.name, path = %st.log_path, error = %e, "cannot read the log for the termination message")
                }
            }
        }
        if !message.is_empty() || now.saturating_sub(st.finished_at) >= MESSAGE_SETTLED_NANOS {
            known.insert(c.id.clone(), message.clone());
        }
        st.message = message;
    }
}

/// The pod's grace period (`terminationGracePeriodSeconds`, default 30 s).
pub fn grace_seconds(pod: &Pod) -> i64 {
    pod.spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30)
        .max(0)
}

/// Runs a container's `postStart` hook; if it fails the container is killed (the kubelet's
/// `FailedPostStartHook`) and restarted per the restart policy by a later sync.
async fn run_post_start<R: Runtime>(
    rt: &R,
    pod: &Pod,
    container: &k8s_openapi::api::core::v1::Container,
    hook: &k8s_openapi::api::core::v1::LifecycleHandler,
    id: &str,
    pod_ip: &str,
) -> Result<(), RuntimeError> {
    let grace = grace_seconds(pod);
    let outcome = match probes::hook_action(hook, container) {
        Ok(action) => {
            probes::run_action(
                rt,
                &action,
                id,
                pod_ip,
                Duration::from_secs(grace.max(1) as u64),
            )
            .await
        }
        Err(e) => probes::Outcome::Failure(e),
    };
    if let probes::Outcome::Failure(why) = outcome {
        tracing::warn!(pod = ?pod.metadata.name, container = %container.name, %why, "FailedPostStartHook: killing the container");
        rt.stop_container(id, grace).await?;
    }
    Ok(())
}

/// Stops one running container as the kubelet does: its `preStop` hook first (within the grace
/// period), then SIGTERM and, after what is left of the grace period (at least 2 s), SIGKILL.
pub async fn stop_container_gracefully<R: Runtime>(
    rt: &R,
    container: Option<&k8s_openapi::api::core::v1::Container>,
    id: &str,
    pod_ip: &str,
    grace_seconds: i64,
) -> Result<(), RuntimeError> {
    let started = Instant::now();
    if let Some((c, hook)) =
        container.and_then(|c| Some((c, c.lifecycle.as_ref()?.pre_stop.as_ref()?)))
    {
        let budget = Duration::from_secs(grace_seconds.max(0) as u64);
        match probes::hook_action(hook, c) {
            Ok(action) => {
                if let probes::Outcome::Failure(why) =
                    probes::run_action(rt, &action, id, pod_ip, budget).await
                {
                    tracing::warn!(container = %c.name, %why, "preStop hook failed");
                }
            }
            Err(why) => tracing::warn!(container = %c.name, %why, "preStop hook invalid"),
        }
    }
    let left = grace_seconds - started.elapsed().as_secs() as i64;
    match rt.stop_container(id, left.max(2)).await {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    }
}

/// Stops every running container of the pod with its preStop hooks and grace period (all at
/// once, as the kubelet does), then its sandboxes.
pub async fn stop_pod_gracefully<R: Runtime>(
    rt: &R,
    pod: &Pod,
    observed: &Observed,
    grace_seconds: i64,
) -> Result<(), RuntimeError> {
    let spec = pod.spec.clone().unwrap_or_default();
    let stops = observed
        .pod
        .containers
        .iter()
        .filter(|c| c.state == api::ContainerState::ContainerRunning)
        .map(|c| {
            let container = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .find(|s| s.name == c.name);
            stop_container_gracefully(rt, container, &c.id, &observed.sandbox_ip, grace_seconds)
        });
    for r in futures_util::future::join_all(stops).await {
        r?;
    }
    for s in &observed.pod.sandboxes {
        if s.ready {
            rt.stop_pod_sandbox(&s.id).await?;
        }
    }
    Ok(())
}

/// Removes exited containers beyond the newest two attempts per container name (the current one
/// and the `lastState` one), so a crash-looping container does not pile up containers on the
/// node (attempt numbers go on from the newest kept), and stopped sandboxes a newer one replaced
/// once they hold no container. Returns whether anything was removed.
async fn prune_exited<R: Runtime>(rt: &R, observed: &Observed) -> Result<bool, RuntimeError> {
    let mut by_name: HashMap<&str, Vec<&ContainerInfo>> = HashMap::new();
    for c in &observed.pod.containers {
        by_name.entry(c.name.as_str()).or_default().push(c);
    }
    let mut removed = false;
    // Sandboxes replaced by a newer attempt go once no container is left in them.
    if let Some(newest) = observed
        .pod
        .sandboxes
        .iter()
        .max_by_key(|s| (s.attempt, s.created_at))
    {
        for old in &observed.pod.sandboxes {
            let empty = !observed
                .pod
                .containers
                .iter()
                .any(|c| c.sandbox_id == old.id);
            if old.id != newest.id && !old.ready && empty {
                match rt.remove_pod_sandbox(&old.id).await {
                    Ok(()) => removed = true,
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    for attempts in by_name.values_mut() {
        attempts.sort_by_key(|c| std::cmp::Reverse(c.attempt));
        for old in attempts.iter().skip(2) {
            if old.state == api::ContainerState::ContainerExited {
                match rt.remove_container(&old.id).await {
                    Ok(()) => removed = true,
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(removed)
}

/// The final status of a pod that was stopped for deletion: every container terminated — one
/// that never ran is reported as the kubelet does (137, `ContainerStatusUnknown`).
pub fn final_status(pod: &Pod, observed: &Observed, host_ip: &str, wall_now: Time) -> PodStatus {
    let mut status = pod_status(pod, observed, &mut PodMemory::default(), host_ip, wall_now);
    let unknown = || k8s_openapi::api::core::v1::ContainerState {
        terminated: Some(k8s_openapi::api::core::v1::ContainerStateTerminated {
            exit_code: 137,
            reason: Some("ContainerStatusUnknown".to_owned()),
            message: Some(
                "The container could not be located when the pod was terminated".to_owned(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    for c in status
        .container_statuses
        .iter_mut()
        .flatten()
        .chain(status.init_container_statuses.iter_mut().flatten())
    {
        if c.state.as_ref().is_none_or(|s| s.terminated.is_none()) {
            c.state = Some(unknown());
        }
        c.ready = false;
    }
    status
}

/// The pod's `/etc/hosts` for a container about to be created (see [`hosts`]); none when the
/// sandbox has no IP yet on a pod network.
async fn pod_hosts_file(
    pod: &Pod,
    node: &NodeSettings,
    sandbox_ip: &str,
) -> std::io::Result<Option<std::path::PathBuf>> {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    if !host_network && sandbox_ip.is_empty() {
        return Ok(None);
    }
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let dir = volumes::pod_dir(&node.root_dir, uid);
    hosts::ensure(&dir, pod, sandbox_ip, host_network, &node.cluster_domain)
        .await
        .map(Some)
}

fn pod_context(node: &NodeSettings, host_ip: &str, observed: &Observed) -> PodContext {
    PodContext {
        node_name: node.node_name.clone(),
        host_ip: host_ip.to_owned(),
        pod_ips: Some(observed.sandbox_ip.clone())
            .filter(|i| !i.is_empty())
            .into_iter()
            .collect(),
        // The node's allocatable, as the node status reports it: what a container without a
        // limit may use (`resourceFieldRef` to an unset limit resolves to it, as the kubelet's).
        node_allocatable_milli_cpu: super::node::cpus() as i64 * 1000,
        node_allocatable_memory: node
            .node_memory_bytes
            .saturating_sub(super::pressure::MEMORY_AVAILABLE_MIN as i64)
            .max(0),
    }
}

/// Resolves the pod's volumes from the store, then writes them off the async threads.
async fn prepare_volumes(
    pod: &Pod,
    node: &NodeSettings,
    ctx: &PodContext,
    source: &(dyn ObjectSource + Sync),
) -> Result<HashMap<String, std::path::PathBuf>, volumes::VolumeError> {
    let plans = volumes::plan(pod, ctx, source)?;
    if plans.is_empty() {
        return Ok(HashMap::new());
    }
    let root = node.root_dir.clone();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    tokio::task::spawn_blocking(move || volumes::apply(&root, &uid, &plans))
        .await
        .unwrap_or_else(|e| {
            Err(volumes::VolumeError::Io {
                volume: "*".into(),
                reason: e.to_string(),
            })
        })
}

/// How long a container ran (CRI timestamps are wall-clock nanoseconds).
fn ran_for(s: &api::ContainerStatus, wall_now: &Time) -> Option<Duration> {
    let started = s.started_at;
    let ended = if s.finished_at > 0 {
        s.finished_at
    } else {
        i64::try_from(wall_now.0.as_nanosecond()).ok()?
    };
    (started > 0 && ended >= started).then(|| Duration::from_nanos((ended - started) as u64))
}

fn pod_status(
    pod: &Pod,
    observed: &Observed,
    memory: &mut PodMemory,
    host_ip: &str,
    wall_now: Time,
) -> PodStatus {
    let spec = pod.spec.clone().unwrap_or_default();
    let newest_sandbox = observed
        .pod
        .sandboxes
        .iter()
        .max_by_key(|s| (s.attempt, s.created_at));
    let sandbox_ready = newest_sandbox.is_some_and(|s| s.ready);
    let view = |c: &k8s_openapi::api::core::v1::Container| {
        let mut attempts: Vec<&ContainerInfo> = observed
            .pod
            .containers
            .iter()
            .filter(|x| x.name == c.name)
            .collect();
        attempts.sort_by_key(|x| x.attempt);
        let current = attempts
            .last()
            .and_then(|x| observed.statuses.get(&x.id))
            .cloned();
        let previous = attempts
            .len()
            .checked_sub(2)
            .and_then(|i| attempts.get(i))
            .and_then(|x| observed.statuses.get(&x.id))
            .cloned();
        let running = current
            .as_ref()
            .is_some_and(|s| s.state == api::ContainerState::ContainerRunning as i32);
        let probe_view = attempts
            .last()
            .and_then(|x| memory.probes.get(&x.id).copied())
            .unwrap_or_else(|| unprobed_view(c));
        let waiting = memory.waiting.get(&c.name).cloned();
        // While held back, the last run is the last state (and the current one is history).
        let (current, previous) = if waiting.is_some() && current.is_some() && !running {
            (None, current)
        } else {
            (current, previous)
        };
        ContainerView {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            restart_count: attempts.last().map_or(0, |x| x.attempt as i32),
            current,
            previous,
            waiting,
            ready: running && probe_view.ready,
            started: running.then_some(probe_view.started),
        }
    };
    memory.running = observed
        .pod
        .containers
        .iter()
        .filter(|c| c.state == api::ContainerState::ContainerRunning)
        .map(|c| {
            let started = observed.statuses.get(&c.id).map_or(0, |s| s.started_at);
            (c.name.clone(), c.id.clone(), started)
        })
        .collect();
    let init: Vec<_> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| status::container_status(&view(c)))
        .collect();
    let containers: Vec<_> = spec
        .containers
        .iter()
        .map(|c| status::container_status(&view(c)))
        .collect();
    let policy = spec.restart_policy.as_deref().unwrap_or("Always");
    let phase = status::pod_phase(policy, &init, &containers);
    let start_time = memory
        .start_time
        .get_or_insert_with(|| wall_now.clone())
        .clone();
    let ip = observed.sandbox_ip.clone();
    let host_network = spec.host_network.unwrap_or(false);
    let pod_ip = if host_network { host_ip.to_owned() } else { ip };
    PodStatus {
        phase: Some(phase.to_owned()),
        conditions: Some(status::pod_conditions(
            sandbox_ready,
            &init,
            &containers,
            &wall_now,
        )),
        host_ip: (!host_ip.is_empty()).then(|| host_ip.to_owned()),
        pod_ip: (!pod_ip.is_empty()).then(|| pod_ip.clone()),
        pod_ips: (!pod_ip.is_empty())
            .then(|| vec![k8s_openapi::api::core::v1::PodIP { ip: pod_ip.clone() }]),
        start_time: Some(start_time),
        qos_class: Some(qos_class(pod).as_str().to_owned()),
        init_container_statuses: (!init.is_empty()).then_some(init),
        container_statuses: Some(containers),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edged::runtime::MemoryRuntime;

    #[tokio::test]
    async fn only_the_tail_of_a_large_log_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut text = String::new();
        for i in 0..20_000 {
            text.push_str(&format!("2026-12-02T10:00:00.1Z stdout F line {i}\n"));
        }
        std::fs::write(&path, &text).unwrap();
        let tail = read_tail(path.to_str().unwrap(), 4096).await.unwrap();
        assert!(
            tail.len() <= 4096 && tail.starts_with("2026-12-02T"),
            "starts at a whole line"
        );
        assert_eq!(cri_log_tail(&tail, 1, 2048), "line 19999");
        let small = read_tail(path.to_str().unwrap(), 1 << 30).await.unwrap();
        assert_eq!(small, text);
    }

    #[test]
    fn fallback_messages_are_the_log_tail() {
        let log =
            "2026-12-02T10:00:00.1Z stdout F one\n2026-12-02T10:00:00.2Z stderr F two words\n";
        assert_eq!(cri_log_tail(log, 80, 2048), "one\ntwo words");
        assert_eq!(cri_log_tail(log, 1, 2048), "two words");
        assert_eq!(cri_log_tail(log, 80, 5), "words");
        assert_eq!(cri_log_tail("", 80, 2048), "");
    }
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use serde_json::json;

    struct NoObjects;
    impl ObjectSource for NoObjects {
        fn config_map(&self, _: &str, _: &str) -> Option<ConfigMap> {
            None
        }
        fn secret(&self, _: &str, _: &str) -> Option<Secret> {
            None
        }
    }

    fn node() -> NodeSettings {
        NodeSettings {
            node_name: "edge-1".into(),
            resolv_conf: "nameserver 192.0.2.53\n".into(),
            cluster_dns: Vec::new(),
            cluster_domain: "cluster.local".into(),
            cgroup_root: "/kubepods".into(),
            pod_log_root: std::env::temp_dir().join("kedge-sync-test-logs"),
            root_dir: std::env::temp_dir().join("kedge-sync-test-root"),
            node_memory_bytes: 8 << 30,
        }
    }

    fn t(s: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + s).unwrap())
    }

    #[test]
    fn an_unset_limit_resolves_to_the_nodes_allocatable() {
        let observed = Observed {
            pod: RuntimePod::default(),
            sandbox_ip: "10.233.0.5".into(),
            statuses: HashMap::new(),
        };
        let ctx = pod_context(&node(), "192.0.2.10", &observed);
        assert_eq!(
            ctx.node_allocatable_milli_cpu,
            super::super::node::cpus() as i64 * 1000
        );
        assert!(ctx.node_allocatable_milli_cpu >= 1000);
        assert_eq!(ctx.node_allocatable_memory, (8 << 30) - (100 << 20));
    }

    async fn sync_at(
        rt: &MemoryRuntime,
        pod: &Pod,
        backoff: &mut RestartBackoff,
        mem: &mut PodMemory,
        t0: Instant,
        secs: u64,
    ) -> PodStatus {
        let now = t0 + Duration::from_secs(secs);
        sync_pod(
            rt,
            pod,
            &node(),
            "192.0.2.10",
            &NoObjects,
            backoff,
            mem,
            now,
            t(secs as i64),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_pod_runs_crashes_backs_off_and_restarts_with_its_count() {
        let rt = MemoryRuntime::new();
        rt.add_image("busybox:1");
        rt.add_image("kedge.local/pause:test");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u1"},
            "spec": {"initContainers": [{"name": "init", "image": "busybox:1"}],
                     "containers": [{"name": "app", "image": "busybox:1"}]}
        }))
        .unwrap();
        let mut backoff = RestartBackoff::default();
        let mut mem = PodMemory::default();
        let t0 = Instant::now();
        // Sandbox + the init container.
        let s = sync_at(&rt, &pod, &mut backoff, &mut mem, t0, 0).await;
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        assert!(s.pod_ip.as_deref().is_some_and(|ip| ip.starts_with("10.")));
        let init_id = rt.list_containers(None).await.unwrap()[0].id.clone();
        rt.exit_container(&init_id, 0).unwrap();
        // Then the app.
        let s = sync_at(&rt, &pod, &mut backoff, &mut mem, t0, 1).await;
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let app = &s.container_statuses.as_ref().unwrap()[0];
        assert!(app.state.as_ref().unwrap().running.is_some() && app.ready);
        let ready = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        // The app crashes: restarted at once (attempt 1), then held back 10 s after crashing again.
        let app_id = |n: usize| {
            let rt = &rt;
            async move {
                let mut cs = rt.list_containers(None).await.unwrap();
                cs.retain(|c| c.metadata.as_ref().unwrap().name == "app");
                cs.sort_by_key(|c| c.metadata.as_ref().unwrap().attempt);
                cs[n].id.clone()
            }
        };
        rt.exit_container(&app_id(0).await, 1).unwrap();
        let s = sync_at(&rt, &pod, &mut backoff, &mut mem, t0, 2).await;
        assert_eq!(s.container_statuses.as_ref().unwrap()[0].restart_count, 1);
        rt.exit_container(&app_id(1).await, 1).unwrap();
        let s = sync_at(&rt, &pod, &mut backoff, &mut mem, t0, 3).await;
        let app = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(
            app.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("CrashLoopBackOff")
        );
        assert_eq!(
            app.last_state
                .as_ref()
                .unwrap()
                .terminated
                .as_ref()
                .unwrap()
                .exit_code,
            1
        );
        assert_eq!(
            s.phase.as_deref(),
            Some("Running"),
            "Always: restarting counts as running"
        );
        let s = sync_at(&rt, &pod, &mut backoff, &mut mem, t0, 12).await;
        let app = &s.container_statuses.as_ref().unwrap()[0];
        assert!(app.state.as_ref().unwrap().running.is_some());
        assert_eq!(app.restart_count, 2);
        // Kept: the start time of the first sync.
        assert_eq!(s.start_time, Some(t(0)));

        // More crashes: only the newest two attempts of the container stay on the node.
        for at in [40u64, 80] {
            // The running attempt is the newest of the two kept.
            rt.exit_container(&app_id(1).await, 1).unwrap();
            sync_at(&rt, &pod, &mut backoff, &mut mem, t0, at).await;
        }
        let apps = rt
            .list_containers(None)
            .await
            .unwrap()
            .into_iter()
            .filter(|c| c.metadata.as_ref().unwrap().name == "app")
            .count();
        assert_eq!(apps, 2, "exited attempts beyond the last two are removed");
        let s = sync_at(&rt, &pod, &mut backoff, &mut mem, t0, 81).await;
        let app = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(app.restart_count, 4, "restart counts go on");
        assert!(app.state.as_ref().unwrap().running.is_some());
    }

    #[tokio::test]
    async fn a_dead_sandbox_is_replaced_and_removed_once_empty() {
        let rt = MemoryRuntime::new();
        rt.add_image("busybox:1");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u2"},
            "spec": {"containers": [{"name": "app", "image": "busybox:1"}]}
        }))
        .unwrap();
        let (mut backoff, mut mem, t0) = (
            RestartBackoff::default(),
            PodMemory::default(),
            Instant::now(),
        );
        sync_at(&rt, &pod, &mut backoff, &mut mem, t0, 0).await;
        let first = rt.list_pod_sandboxes(None).await.unwrap()[0].id.clone();
        // The sandbox dies (e.g. a reboot): its containers are killed, a new one is made.
        rt.stop_pod_sandbox(&first).await.unwrap();
        let s = sync_at(&rt, &pod, &mut backoff, &mut mem, t0, 1).await;
        let s = if s.phase.as_deref() == Some("Running") {
            s
        } else {
            sync_at(&rt, &pod, &mut backoff, &mut mem, t0, 2).await
        };
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let sandboxes = rt.list_pod_sandboxes(None).await.unwrap();
        assert!(
            sandboxes
                .iter()
                .any(|x| x.id != first && x.metadata.as_ref().unwrap().attempt == 1)
        );
        // The old sandbox goes once the containers it held are gone (pruned or removed).
        for c in rt.list_containers(None).await.unwrap() {
            if c.pod_sandbox_id == first {
                rt.remove_container(&c.id).await.unwrap();
            }
        }
        sync_at(&rt, &pod, &mut backoff, &mut mem, t0, 3).await;
        let left: Vec<String> = rt
            .list_pod_sandboxes(None)
            .await
            .unwrap()
            .into_iter()
            .map(|x| x.id)
            .collect();
        assert_eq!(left.len(), 1);
        assert_ne!(left[0], first);
    }

    #[tokio::test]
    async fn failed_pulls_back_off_as_image_pull_back_off() {
        let rt = MemoryRuntime::new();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u3"},
            "spec": {"containers": [{"name": "c", "image": "registry.local/missing:1"}]}
        }))
        .unwrap();
        let (mut backoff, mut mem, t0) = (
            RestartBackoff::default(),
            PodMemory::default(),
            Instant::now(),
        );
        let reason = |s: &PodStatus| {
            s.container_statuses.as_ref().unwrap()[0]
                .state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .reason
                .clone()
                .unwrap()
        };
        let pulls = |rt: &MemoryRuntime| {
            rt.calls()
                .iter()
                .filter(|c| c.starts_with("PullImage"))
                .count()
        };
        let s = sync_at(&rt, &pod, &mut backoff, &mut mem, t0, 0).await;
        assert_eq!((reason(&s), pulls(&rt)), ("ErrImagePull".to_owned(), 1));
        let s = sync_at(&rt, &pod, &mut backoff, &mut mem, t0, 5).await;
        assert_eq!(
            (reason(&s), pulls(&rt)),
            ("ImagePullBackOff".to_owned(), 1),
            "no pull while backing off"
        );
        rt.allow_pull("registry.local/missing:1");
        let s = sync_at(&rt, &pod, &mut backoff, &mut mem, t0, 10).await;
        assert_eq!(pulls(&rt), 2);
        assert!(
            s.container_statuses.unwrap()[0]
                .state
                .as_ref()
                .unwrap()
                .running
                .is_some()
        );
    }

    #[tokio::test]
    async fn missing_images_and_config_errors_are_waiting_reasons() {
        let rt = MemoryRuntime::new();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u2"},
            "spec": {"containers": [
                {"name": "never", "image": "img:1", "imagePullPolicy": "Never"},
                {"name": "pull", "image": "img:2"},
                {"name": "cfg", "image": "img:3", "imagePullPolicy": "IfNotPresent",
                 "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k"}}}]}]}
        }))
        .unwrap();
        rt.add_image("img:3");
        let s = sync_pod(
            &rt,
            &pod,
            &node(),
            "",
            &NoObjects,
            &mut RestartBackoff::default(),
            &mut PodMemory::default(),
            Instant::now(),
            t(0),
        )
        .await
        .unwrap();
        let reasons: Vec<String> = s
            .container_statuses
            .unwrap()
            .iter()
            .map(|c| {
                c.state
                    .as_ref()
                    .unwrap()
                    .waiting
                    .as_ref()
                    .unwrap()
                    .reason
                    .clone()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            reasons,
            [
                "ErrImageNeverPull",
                "ErrImagePull",
                "CreateContainerConfigError"
            ]
        );
        assert_eq!(s.phase.as_deref(), Some("Pending"));
    }
}

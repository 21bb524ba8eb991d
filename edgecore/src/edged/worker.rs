//! One pod's worker: a task per pod that owns everything edged remembers about the pod (restart
//! back-off, probe state, waiting reasons, the status last reported) and keeps the runtime in
//! line with it.
//!
//! Each pod has its own timers, so a slow image pull, a long grace period or a probe of one pod
//! never holds up another. The worker syncs when something could have changed what the pod
//! needs: the pod itself, a ConfigMap/Secret/token it uses, the runtime (the relist saw a
//! container change), a probe result, the end of a back-off, and at least every
//! [`RESYNC`]. Probes run in tasks of their own and only wake the worker when a result flips.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kedge_common::{Message, Operation};
use serde_json::json;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::backoff::RestartBackoff;
use super::env::ObjectSource;
use super::manager::EdgedSettings;
use super::probes::{self, Outcome, ProbeKind, ProbeSet};
use super::runtime::Runtime;
use super::sync::{self, PodMemory};
use super::tokens::Tokens;
use crate::edgehub::outbox::Outbox;

/// A worker syncs at least this often even when nothing woke it.
pub const RESYNC: Duration = Duration::from_secs(10);

/// What every worker shares.
pub struct WorkerContext<R: Runtime, O: Outbox> {
    pub runtime: Arc<R>,
    pub outbox: Arc<O>,
    pub settings: EdgedSettings,
    /// ConfigMaps, Secrets and tokens, as the store has them now.
    pub source: Arc<dyn ObjectSource + Send + Sync>,
    pub tokens: Option<Arc<dyn Tokens>>,
    /// Bounds how many pods sync against the runtime at once.
    pub sync_slots: Arc<Semaphore>,
}

/// The life of a pod worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// The pod should run. Entered when the worker starts (a new pod, or edgecore started and
    /// adopts what already runs). Every wake-up syncs the pod once. Left for `Terminating` when
    /// the pod gets a `deletionTimestamp`.
    Running,
    /// The pod is being deleted: preStop hooks, SIGTERM, SIGKILL after the grace period; then its
    /// sandbox and volumes are removed and the final status reported. Left for `Terminated`
    /// once that is done (failures are logged; what is left is removed with the pod).
    Terminating,
    /// Stopped and reported; cloudcore deletes the object, and the worker waits for the pod to
    /// leave the store.
    Terminated,
}

/// The dispatcher's end of a worker.
pub struct WorkerHandle {
    pod: watch::Sender<Option<Arc<Pod>>>,
    nudge: Arc<Notify>,
}

impl WorkerHandle {
    /// The pod changed in the store.
    pub fn update(&self, pod: Arc<Pod>) {
        self.pod.send_if_modified(|current| {
            let changed = current.as_ref().is_none_or(|c| {
                c.metadata.resource_version != pod.metadata.resource_version
                    || c.metadata.deletion_timestamp != pod.metadata.deletion_timestamp
            });
            if changed {
                *current = Some(pod);
            }
            changed
        });
    }

    /// The pod left the store: the worker removes what is left of it and ends.
    pub fn remove(&self) {
        self.pod.send_replace(None);
    }

    /// Something the pod may depend on changed: sync soon.
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }
}

/// Starts the worker of `pod`.
pub fn spawn<R: Runtime, O: Outbox>(
    ctx: Arc<WorkerContext<R, O>>,
    pod: Arc<Pod>,
    shutdown: CancellationToken,
) -> WorkerHandle {
    let (tx, rx) = watch::channel(Some(pod.clone()));
    let nudge = Arc::new(Notify::new());
    let worker = Worker {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        ctx,
        pod,
        state: WorkerState::Running,
        memory: PodMemory::default(),
        backoff: RestartBackoff::default(),
        probes: ProbeSet::default(),
        probe_runs: JoinSet::new(),
        reported: None,
        pod_ip: String::new(),
        last_sync: Instant::now(),
    };
    // Detached: the worker ends on its own (pod removed, or shutdown).
    tokio::spawn(worker.run(rx, nudge.clone(), shutdown));
    WorkerHandle { pod: tx, nudge }
}

struct Worker<R: Runtime, O: Outbox> {
    ctx: Arc<WorkerContext<R, O>>,
    uid: String,
    pod: Arc<Pod>,
    state: WorkerState,
    memory: PodMemory,
    backoff: RestartBackoff,
    probes: ProbeSet,
    probe_runs: JoinSet<(String, String, ProbeKind, Outcome)>,
    reported: Option<PodStatus>,
    pod_ip: String,
    last_sync: Instant,
}

fn now_time() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// The monotonic instant of a CRI wall-clock timestamp (nanoseconds), for probe timing.
fn instant_of(wall_nanos: i64) -> Instant {
    let now = Instant::now();
    let wall_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let ago = Duration::from_nanos(wall_now.saturating_sub(wall_nanos).max(0) as u64);
    now.checked_sub(ago).unwrap_or(now)
}

/// Keeps a condition's transition time when its status did not change, so a status only
/// differs from the last one when something did.
fn carry_transition_times(previous: Option<&PodStatus>, status: &mut PodStatus) {
    let Some(prev) = previous.and_then(|p| p.conditions.as_ref()) else {
        return;
    };
    for c in status.conditions.iter_mut().flatten() {
        if let Some(p) = prev
            .iter()
            .find(|p| p.type_ == c.type_ && p.status == c.status)
        {
            c.last_transition_time = p.last_transition_time.clone();
        }
    }
}

/// KubeEdge's request to finish a pod's deletion once its containers are gone
/// (`edged/meta/delete <ns>/pod/<name>`, grace period 0, this pod's UID as precondition).
pub fn deletion_request(pod: &Pod) -> Message {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    Message::new(
        "edged",
        "meta",
        Operation::Delete,
        format!("{ns}/pod/{name}"),
        json!({"gracePeriodSeconds": 0, "preconditions": {"uid": pod.metadata.uid}}),
    )
}

/// Asks the cloud, through the outbox (so it survives being offline), to delete the stopped
/// pod's object: KubeEdge's cloud waits for this; ours would also finish the deletion from the
/// final status and answers this one idempotently.
pub async fn finish_deletion<O: Outbox>(outbox: &O, pod: &Pod) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    if let Err(e) = outbox
        .put(&format!("poddelete/{ns}/{name}"), deletion_request(pod))
        .await
    {
        tracing::error!(pod = %format!("{ns}/{name}"), error = %e, "cannot queue the pod's deletion");
    }
}

/// Queues a pod's status for the cloud (the outbox keeps only the latest per pod).
pub async fn report<O: Outbox>(outbox: &O, pod: &Pod, status: &PodStatus) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let msg = Message::new(
        "edged",
        "resource",
        Operation::Update,
        format!("{ns}/podstatus/{name}"),
        json!({"uid": pod.metadata.uid, "name": name, "status": status}),
    );
    match outbox.put(&format!("podstatus/{ns}/{name}"), msg).await {
        Ok(_) => {
            tracing::debug!(target: "pod_path", pod = %format_args!("{ns}/{name}"),
                uid = pod.metadata.uid.as_deref().unwrap_or_default(),
                phase = status.phase.as_deref().unwrap_or_default(), "6 status queued for the cloud");
        }
        Err(e) => {
            tracing::error!(pod = %format!("{ns}/{name}"), error = %e, "cannot queue pod status")
        }
    }
}

/// Stops and removes everything of pod `uid` at once (it left the store).
pub async fn remove_pod<R: Runtime>(rt: &R, root: &std::path::Path, uid: &str) {
    match sync::observe(rt, uid).await {
        Ok(o) => {
            if let Err(e) = sync::kill_pod(rt, &o, 0).await {
                tracing::warn!(%uid, error = %e, "cannot stop pod");
            }
            for s in &o.pod.sandboxes {
                if let Err(e) = rt.remove_pod_sandbox(&s.id).await {
                    tracing::warn!(%uid, error = %e, "cannot remove sandbox");
                }
            }
        }
        Err(e) => tracing::warn!(%uid, error = %e, "cannot list the pod's containers"),
    }
    remove_volumes(root, uid).await;
}

/// Removes the pod's directory (volumes, tokens; unmounting tmpfs emptyDirs) off the async
/// threads.
async fn remove_volumes(root: &std::path::Path, uid: &str) {
    let (root, id) = (root.to_owned(), uid.to_owned());
    match tokio::task::spawn_blocking(move || super::volumes::remove(&root, &id)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(%uid, error = %e, "cannot remove the pod's volumes"),
        Err(e) => tracing::warn!(%uid, error = %e, "volume removal task failed"),
    }
}

impl<R: Runtime, O: Outbox> Worker<R, O> {
    async fn run(
        mut self,
        mut pod_rx: watch::Receiver<Option<Arc<Pod>>>,
        nudge: Arc<Notify>,
        shutdown: CancellationToken,
    ) {
        loop {
            match self.state {
                WorkerState::Running if self.pod.metadata.deletion_timestamp.is_some() => {
                    self.state = WorkerState::Terminating;
                    continue;
                }
                WorkerState::Running => self.sync().await,
                WorkerState::Terminating => {
                    self.terminate().await;
                    self.state = WorkerState::Terminated;
                }
                WorkerState::Terminated => {}
            }
            // Wait for something that calls for a sync.
            loop {
                let now = Instant::now();
                let sync_at = self.sync_at(now);
                let wake = match self.probes.next_due() {
                    Some(p) if self.state == WorkerState::Running => p.min(sync_at),
                    _ => sync_at,
                };
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        // Containers keep running when edgecore stops (as with the kubelet).
                        self.probe_runs.abort_all();
                        return;
                    }
                    changed = pod_rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let next = pod_rx.borrow_and_update().clone();
                        match next {
                            Some(p) => {
                                self.pod = p;
                                break;
                            }
                            None => {
                                self.probe_runs.abort_all();
                                tracing::info!(uid = %self.uid, "pod removed from the store; removing its containers");
                                remove_pod(&*self.ctx.runtime, &self.ctx.settings.node.root_dir, &self.uid).await;
                                if let Some(t) = &self.ctx.tokens {
                                    t.forget(&self.uid);
                                }
                                return;
                            }
                        }
                    }
                    _ = nudge.notified() => break,
                    Some(done) = self.probe_runs.join_next(), if !self.probe_runs.is_empty() => {
                        if let Ok((name, id, kind, outcome)) = done {
                            if let Outcome::Failure(why) = &outcome {
                                tracing::debug!(uid = %self.uid, container = %name, probe = kind.as_str(), %why, "probe failed");
                            }
                            if self.probes.record(&name, &id, kind, outcome, Instant::now()) {
                                tracing::info!(uid = %self.uid, container = %name, probe = kind.as_str(),
                                    view = ?self.probes.view(&name), "probe result changed");
                                break;
                            }
                        }
                    }
                    _ = tokio::time::sleep_until(wake.into()) => {
                        if Instant::now() >= sync_at {
                            break;
                        }
                        self.start_due_probes();
                    }
                }
            }
        }
    }

    /// When the next sync is due without any event: a back-off ending, or the periodic resync.
    fn sync_at(&self, now: Instant) -> Instant {
        let periodic = match self.state {
            WorkerState::Terminated => now + Duration::from_secs(3600),
            _ => self.last_sync + RESYNC,
        };
        self.backoff
            .next_expiry(&self.uid, now)
            .map_or(periodic, |t| t.min(periodic))
    }

    async fn sync(&mut self) {
        self.last_sync = Instant::now();
        let ctx = self.ctx.clone();
        let pod = self.pod.clone();
        if let Some(t) = &ctx.tokens {
            t.ready(&pod, kedge_common::pki::now_unix()).await;
        }
        self.kill_failed_probes(&pod).await;
        self.memory.probes = self
            .memory
            .running
            .iter()
            .map(|(name, id, _)| (id.clone(), self.probes.view(name)))
            .collect();
        let result = {
            let _slot = ctx.sync_slots.acquire().await;
            sync::sync_pod(
                &*ctx.runtime,
                &pod,
                &ctx.settings.node,
                &ctx.settings.host_ip,
                &*ctx.source,
                &mut self.backoff,
                &mut self.memory,
                Instant::now(),
                now_time(),
            )
            .await
        };
        match result {
            Ok(mut status) => {
                self.pod_ip = status.pod_ip.clone().unwrap_or_default();
                carry_transition_times(self.reported.as_ref(), &mut status);
                if self.reported.as_ref() != Some(&status) {
                    report(&*ctx.outbox, &pod, &status).await;
                    self.reported = Some(status);
                }
            }
            Err(e) => {
                tracing::warn!(pod = ?pod.metadata.name, error = %e, "pod sync failed; retrying");
            }
        }
        let running: Vec<(String, String, Instant)> = self
            .memory
            .running
            .iter()
            .map(|(n, id, started)| (n.clone(), id.clone(), instant_of(*started)))
            .collect();
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        self.probes.track(&containers, &running);
        self.start_due_probes();
    }

    /// Kills containers whose liveness or startup probe failed; the sync then restarts them
    /// per the restart policy (with back-off), as the kubelet does.
    async fn kill_failed_probes(&mut self, pod: &Pod) {
        let spec = pod.spec.clone().unwrap_or_default();
        for (name, id, _) in self.memory.running.clone() {
            let Some((kind, why)) = self.probes.failure(&name) else {
                continue;
            };
            tracing::info!(pod = ?pod.metadata.name, container = %name, probe = kind.as_str(), %why,
                "container failed its probe; it will be restarted");
            let container = spec.containers.iter().find(|c| c.name == name);
            let grace = sync::grace_seconds(pod);
            if let Err(e) = sync::stop_container_gracefully(
                &*self.ctx.runtime,
                container,
                &id,
                &self.pod_ip,
                grace,
            )
            .await
            {
                tracing::warn!(container = %name, error = %e, "cannot stop a container that failed its probe");
            }
        }
    }

    /// Starts the probes that are due, each in a task of its own.
    fn start_due_probes(&mut self) {
        if self.state != WorkerState::Running {
            return;
        }
        let spec = self.pod.spec.clone().unwrap_or_default();
        for (name, id, kind) in self.probes.due(Instant::now()) {
            let Some(c) = spec.containers.iter().find(|c| c.name == name) else {
                continue;
            };
            let Some(p) = probes::container_probe(c, kind) else {
                continue;
            };
            let timeout = probes::ProbeTiming::of(p).timeout;
            let action = probes::probe_action(p, c);
            let rt = self.ctx.runtime.clone();
            let ip = self.pod_ip.clone();
            self.probe_runs.spawn(async move {
                let outcome = match action {
                    Ok(a) => probes::run_action(&*rt, &a, &id, &ip, timeout).await,
                    Err(e) => Outcome::Failure(e),
                };
                (name, id, kind, outcome)
            });
        }
    }

    /// Stops the pod for its deletion and reports its final status once its sandbox is gone.
    async fn terminate(&mut self) {
        self.probe_runs.abort_all();
        let pod = self.pod.clone();
        let rt = &*self.ctx.runtime;
        let uid = &self.uid;
        let grace = pod
            .metadata
            .deletion_grace_period_seconds
            .unwrap_or_else(|| sync::grace_seconds(&pod))
            .max(0);
        let observed = match sync::observe(rt, uid).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(%uid, error = %e, "cannot list a terminating pod's containers");
                return;
            }
        };
        if let Err(e) = sync::stop_pod_gracefully(rt, &pod, &observed, grace).await {
            tracing::warn!(%uid, error = %e, "cannot stop a terminating pod");
        }
        // The final status: every container terminated, read before the sandbox goes.
        let stopped = match sync::observe(rt, uid).await {
            Ok(mut s) => {
                sync::add_termination_messages(
                    &pod,
                    &self.ctx.settings.node,
                    &mut s,
                    &mut self.memory.termination_messages,
                )
                .await;
                Ok(s)
            }
            Err(e) => Err(e),
        };
        for s in &observed.pod.sandboxes {
            if let Err(e) = rt.remove_pod_sandbox(&s.id).await {
                tracing::warn!(%uid, error = %e, "cannot remove a terminating pod's sandbox");
            }
        }
        remove_volumes(&self.ctx.settings.node.root_dir, uid).await;
        if let Ok(stopped) = stopped {
            let status = sync::final_status(&pod, &stopped, &self.ctx.settings.host_ip, now_time());
            report(&*self.ctx.outbox, &pod, &status).await;
            finish_deletion(&*self.ctx.outbox, &pod).await;
            tracing::info!(%uid, grace, "pod stopped and removed; final status reported");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deletion request is what KubeEdge's edge sends (line 176 of the capture).
    #[test]
    fn the_deletion_request_is_kubeedge_s() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "kcap-pod", "namespace": "default", "uid": "u-1"}
        }))
        .unwrap();
        let ours = serde_json::to_value(deletion_request(&pod)).unwrap();
        crate::kubeedge_capture::assert_same_route(&ours, 176);
        let theirs = crate::kubeedge_capture::captured(176);
        assert_eq!(
            ours["content"]["gracePeriodSeconds"],
            theirs["content"]["gracePeriodSeconds"]
        );
        assert_eq!(ours["content"]["preconditions"]["uid"], "u-1");
    }
}

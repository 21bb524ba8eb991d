//! Pod status from what the runtime reports, as the kubelet computes it: each container's state
//! (waiting with edged's reason, running, terminated) and last state, the pod's phase, and its
//! conditions. Pure functions: the pod worker gathers the inputs, this decides what the API shows.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PodCondition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::runtime::api;

/// Why edged holds a container back (`CrashLoopBackOff`, `ErrImagePull`, `ImagePullBackOff`,
/// `CreateContainerConfigError`, `ContainerCreating`, `PodInitializing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

/// What edged knows about one container of a pod.
#[derive(Debug, Clone, Default)]
pub struct ContainerView {
    pub name: String,
    /// The image in the pod spec.
    pub image: String,
    /// CRI status of the newest attempt, if one was created.
    pub current: Option<api::ContainerStatus>,
    /// CRI status of the attempt before it (the API's `lastState`).
    pub previous: Option<api::ContainerStatus>,
    pub restart_count: i32,
    /// Set while edged does not (re)start the container.
    pub waiting: Option<Waiting>,
    /// Readiness (probe result; true for a running container without a readiness probe).
    pub ready: bool,
    /// Startup probe passed (true without one) — `None` for containers never started.
    pub started: Option<bool>,
}

fn time(nanos: i64) -> Option<Time> {
    (nanos > 0)
        .then(|| Timestamp::from_nanosecond(i128::from(nanos)).ok())
        .flatten()
        .map(Time)
}

fn container_id(id: &str) -> String {
    format!("containerd://{id}")
}

fn terminated(s: &api::ContainerStatus) -> ContainerStateTerminated {
    ContainerStateTerminated {
        exit_code: s.exit_code,
        reason: Some(if s.reason.is_empty() {
            if s.exit_code == 0 {
                "Completed"
            } else {
                "Error"
            }
            .to_owned()
        } else {
            s.reason.clone()
        }),
        message: (!s.message.is_empty()).then(|| s.message.clone()),
        started_at: time(s.started_at),
        finished_at: time(s.finished_at),
        container_id: Some(container_id(&s.id)),
        signal: None,
    }
}

fn state_of(v: &ContainerView) -> ContainerState {
    if let Some(w) = &v.waiting {
        return ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(w.reason.clone()),
                message: (!w.message.is_empty()).then(|| w.message.clone()),
            }),
            ..Default::default()
        };
    }
    match &v.current {
        Some(s) if s.state == api::ContainerState::ContainerRunning as i32 => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: time(s.started_at),
            }),
            ..Default::default()
        },
        Some(s) if s.state == api::ContainerState::ContainerExited as i32 => ContainerState {
            terminated: Some(terminated(s)),
            ..Default::default()
        },
        _ => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("ContainerCreating".to_owned()),
                message: None,
            }),
            ..Default::default()
        },
    }
}

/// The API's status of one container.
pub fn container_status(v: &ContainerView) -> ContainerStatus {
    let state = state_of(v);
    let running = state.running.is_some();
    ContainerStatus {
        name: v.name.clone(),
        image: v.image.clone(),
        image_id: v
            .current
            .as_ref()
            .map(|s| s.image_ref.clone())
            .unwrap_or_default(),
        container_id: v.current.as_ref().map(|s| container_id(&s.id)),
        ready: running && v.ready,
        started: v.started.map(|s| s && running),
        restart_count: v.restart_count,
        last_state: v.previous.as_ref().map(|p| ContainerState {
            terminated: Some(terminated(p)),
            ..Default::default()
        }),
        state: Some(state),
        ..Default::default()
    }
}

/// The pod's phase (the kubelet's `getPhase`): `Pending` until every init container succeeded
/// and every container was started; `Running` while one runs (or, with `Always`, restarts);
/// `Succeeded`/`Failed` when all stopped and none will restart.
pub fn pod_phase(
    restart_policy: &str,
    init: &[ContainerStatus],
    containers: &[ContainerStatus],
) -> &'static str {
    let terminated = |s: &ContainerStatus| {
        s.state
            .as_ref()
            .and_then(|st| st.terminated.as_ref())
            .map(|t| t.exit_code)
    };
    let last_terminated = |s: &ContainerStatus| {
        s.last_state
            .as_ref()
            .and_then(|st| st.terminated.as_ref())
            .map(|t| t.exit_code)
    };
    for s in init {
        match terminated(s) {
            Some(0) => {}
            Some(_) if restart_policy == "Never" => return "Failed",
            // Failed init containers of a restartable pod, or init still running/waiting.
            _ => {
                if restart_policy == "Never" && last_terminated(s).is_some_and(|c| c != 0) {
                    return "Failed";
                }
                return "Pending";
            }
        }
    }
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for s in containers {
        let st = s.state.as_ref();
        if st.is_some_and(|x| x.running.is_some()) {
            running += 1;
        } else if let Some(code) = terminated(s) {
            stopped += 1;
            if code == 0 {
                succeeded += 1;
            }
        } else if st.is_some_and(|x| x.waiting.is_some()) {
            // A container waiting to restart counts as stopped once it has run before.
            match last_terminated(s) {
                Some(code) => {
                    stopped += 1;
                    if code == 0 {
                        succeeded += 1;
                    }
                }
                None => waiting += 1,
            }
        } else {
            waiting += 1;
        }
    }
    if waiting > 0 {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    if stopped > 0 {
        return match restart_policy {
            "Always" => "Running",
            _ if stopped == succeeded => "Succeeded",
            "OnFailure" => "Running",
            _ => "Failed",
        };
    }
    "Pending"
}

fn condition(kind: &str, ok: bool, reason: Option<&str>, now: &Time) -> PodCondition {
    PodCondition {
        type_: kind.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: (!ok)
            .then(|| reason.unwrap_or_default().to_owned())
            .filter(|r| !r.is_empty()),
        last_transition_time: Some(now.clone()),
        ..Default::default()
    }
}

/// The pod's conditions. `now` stamps transitions; the caller keeps a condition's earlier
/// transition time when its status did not change.
pub fn pod_conditions(
    sandbox_ready: bool,
    init: &[ContainerStatus],
    containers: &[ContainerStatus],
    now: &Time,
) -> Vec<PodCondition> {
    let initialized = init.iter().all(|s| {
        s.state
            .as_ref()
            .and_then(|st| st.terminated.as_ref())
            .is_some_and(|t| t.exit_code == 0)
    });
    let all_ready = !containers.is_empty() && containers.iter().all(|s| s.ready);
    let not_ready = if initialized {
        "ContainersNotReady"
    } else {
        "ContainersNotInitialized"
    };
    vec![
        condition("PodReadyToStartContainers", sandbox_ready, None, now),
        condition(
            "Initialized",
            initialized,
            Some("ContainersNotInitialized"),
            now,
        ),
        condition("Ready", all_ready, Some(not_ready), now),
        condition("ContainersReady", all_ready, Some(not_ready), now),
        condition("PodScheduled", true, None, now),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cri(id: &str, state: api::ContainerState, exit: i32) -> api::ContainerStatus {
        api::ContainerStatus {
            id: id.into(),
            state: state as i32,
            started_at: 1_700_000_000_000_000_000,
            finished_at: if state == api::ContainerState::ContainerExited {
                1_700_000_010_000_000_000
            } else {
                0
            },
            exit_code: exit,
            image_ref: "sha256:abc".into(),
            ..Default::default()
        }
    }

    fn view(current: Option<api::ContainerStatus>) -> ContainerView {
        ContainerView {
            name: "c".into(),
            image: "busybox".into(),
            current,
            ready: true,
            started: Some(true),
            ..Default::default()
        }
    }

    #[test]
    fn container_states() {
        let s = container_status(&view(None));
        assert_eq!(
            s.state.unwrap().waiting.unwrap().reason.as_deref(),
            Some("ContainerCreating")
        );
        assert!(!s.ready);

        let s = container_status(&view(Some(cri(
            "a1",
            api::ContainerState::ContainerRunning,
            0,
        ))));
        let running = s.state.as_ref().unwrap().running.as_ref().unwrap();
        assert_eq!(
            running.started_at.as_ref().unwrap().0.to_string(),
            "2023-11-14T22:13:20Z"
        );
        assert!(s.ready && s.started == Some(true));
        assert_eq!(s.container_id.as_deref(), Some("containerd://a1"));
        assert_eq!(s.image_id, "sha256:abc");

        // Crashed twice, waiting out the back-off: waiting now, the last run as lastState.
        let mut v = view(Some(cri("a3", api::ContainerState::ContainerExited, 2)));
        v.previous = v.current.take();
        v.restart_count = 2;
        v.waiting = Some(Waiting {
            reason: "CrashLoopBackOff".into(),
            message: "back-off 20s restarting failed container".into(),
        });
        let s = container_status(&v);
        assert_eq!(
            s.state.unwrap().waiting.unwrap().reason.as_deref(),
            Some("CrashLoopBackOff")
        );
        let last = s.last_state.unwrap().terminated.unwrap();
        assert_eq!((last.exit_code, last.reason.as_deref()), (2, Some("Error")));
        assert_eq!(s.restart_count, 2);
        assert!(!s.ready);
    }

    fn st(v: ContainerView) -> ContainerStatus {
        container_status(&v)
    }

    #[test]
    fn phases_follow_the_kubelet() {
        let running = || {
            st(view(Some(cri(
                "r",
                api::ContainerState::ContainerRunning,
                0,
            ))))
        };
        let ok = || {
            st(view(Some(cri(
                "o",
                api::ContainerState::ContainerExited,
                0,
            ))))
        };
        let failed = || {
            st(view(Some(cri(
                "f",
                api::ContainerState::ContainerExited,
                1,
            ))))
        };
        let creating = || st(view(None));
        let crashloop = || {
            let mut v = view(None);
            v.previous = Some(cri("f", api::ContainerState::ContainerExited, 1));
            v.waiting = Some(Waiting {
                reason: "CrashLoopBackOff".into(),
                message: String::new(),
            });
            st(v)
        };
        assert_eq!(pod_phase("Always", &[], &[creating()]), "Pending");
        assert_eq!(
            pod_phase("Always", &[], &[running(), creating()]),
            "Pending"
        );
        assert_eq!(pod_phase("Always", &[], &[running(), ok()]), "Running");
        assert_eq!(pod_phase("Always", &[], &[crashloop()]), "Running");
        assert_eq!(pod_phase("Always", &[], &[failed()]), "Running");
        assert_eq!(pod_phase("Never", &[], &[ok(), ok()]), "Succeeded");
        assert_eq!(pod_phase("Never", &[], &[ok(), failed()]), "Failed");
        assert_eq!(pod_phase("OnFailure", &[], &[ok()]), "Succeeded");
        assert_eq!(pod_phase("OnFailure", &[], &[failed()]), "Running");
        assert_eq!(pod_phase("OnFailure", &[], &[crashloop()]), "Running");
        // Init containers.
        assert_eq!(pod_phase("Always", &[running()], &[creating()]), "Pending");
        assert_eq!(pod_phase("Always", &[ok()], &[running()]), "Running");
        assert_eq!(pod_phase("Never", &[failed()], &[creating()]), "Failed");
        assert_eq!(
            pod_phase("Always", &[crashloop()], &[creating()]),
            "Pending"
        );
    }

    #[test]
    fn conditions() {
        let now = Time(Timestamp::from_second(1_700_000_000).unwrap());
        let running = st(view(Some(cri(
            "r",
            api::ContainerState::ContainerRunning,
            0,
        ))));
        let mut unready = running.clone();
        unready.ready = false;
        let init_ok = st(view(Some(cri(
            "i",
            api::ContainerState::ContainerExited,
            0,
        ))));
        let get = |cs: &[PodCondition], t: &str| {
            cs.iter()
                .find(|c| c.type_ == t)
                .map(|c| (c.status.clone(), c.reason.clone()))
                .unwrap()
        };
        let c = pod_conditions(
            true,
            std::slice::from_ref(&init_ok),
            std::slice::from_ref(&running),
            &now,
        );
        assert_eq!(get(&c, "Ready"), ("True".into(), None));
        assert_eq!(get(&c, "Initialized"), ("True".into(), None));
        assert_eq!(get(&c, "PodReadyToStartContainers"), ("True".into(), None));
        let c = pod_conditions(true, &[init_ok], &[running, unready], &now);
        assert_eq!(
            get(&c, "ContainersReady"),
            ("False".into(), Some("ContainersNotReady".into()))
        );
        let c = pod_conditions(false, &[st(view(None))], &[st(view(None))], &now);
        assert_eq!(
            get(&c, "Ready"),
            ("False".into(), Some("ContainersNotInitialized".into()))
        );
        assert_eq!(get(&c, "PodReadyToStartContainers").0, "False");
    }
}

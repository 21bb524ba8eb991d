//! What a pod needs done next, from the pod and what the runtime has for it — the kubelet's
//! `computePodActions`. The pod worker gathers the inputs, applies the actions through the
//! runtime, and asks again; keeping the decision pure keeps every restart rule testable.
//!
//! Rules (as the kubelet):
//! - No sandbox, or the newest one is not ready: kill whatever is left and create a sandbox with
//!   `attempt` + 1 — except for a `restartPolicy: Never` pod whose containers already ran (it is
//!   not run twice).
//! - Init containers run one at a time, in order; each must exit 0 before the next. A failed one
//!   is restarted (with back-off) unless the policy is `Never`, which fails the pod.
//! - Then every container is started; an exited one is restarted if the policy says so
//!   (`Always`; `OnFailure` on a non-zero exit), once its back-off allows, as a new container
//!   with `attempt` + 1.
//! - A pod being deleted gets no new sandbox or container.

use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;

use super::backoff::RestartBackoff;
use super::runtime::api;
use super::status::Waiting;

/// A sandbox the runtime has for the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxInfo {
    pub id: String,
    pub attempt: u32,
    pub ready: bool,
    pub created_at: i64,
}

/// A container the runtime has for the pod (any sandbox, any attempt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub attempt: u32,
    pub sandbox_id: String,
    pub state: api::ContainerState,
    pub exit_code: i32,
}

/// Everything the runtime has for one pod.
#[derive(Debug, Clone, Default)]
pub struct RuntimePod {
    pub sandboxes: Vec<SandboxInfo>,
    pub containers: Vec<ContainerInfo>,
}

impl RuntimePod {
    fn newest_sandbox(&self) -> Option<&SandboxInfo> {
        self.sandboxes
            .iter()
            .max_by_key(|s| (s.attempt, s.created_at))
    }

    /// The newest attempt of container `name` (in any sandbox).
    fn newest(&self, name: &str) -> Option<&ContainerInfo> {
        self.containers
            .iter()
            .filter(|c| c.name == name)
            .max_by_key(|c| c.attempt)
    }
}

/// A container to create and start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub name: String,
    pub attempt: u32,
    /// An init container (started alone; the next step waits for it to exit).
    pub init: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodActions {
    /// Stop every container and sandbox of the pod first (sandbox gone bad, or pod failed).
    pub kill_pod: bool,
    /// Create a new sandbox with this attempt number.
    pub create_sandbox: Option<u32>,
    /// Containers to create and start, in order.
    pub start: Vec<Start>,
    /// Containers held back, with why (back-off).
    pub waiting: Vec<(String, Waiting)>,
    /// The pod has failed for good (an init container failed under `restartPolicy: Never`).
    pub pod_failed: bool,
}

fn should_restart(policy: &str, exit_code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

fn backoff_wait(
    backoff: &RestartBackoff,
    uid: &str,
    pod_label: &str,
    name: &str,
    now: Instant,
) -> Option<Waiting> {
    backoff.blocked_until(uid, name, now)?;
    let delay = backoff.delay(uid, name).unwrap_or_default();
    Some(Waiting {
        reason: "CrashLoopBackOff".to_owned(),
        message: format!(
            "back-off {}s restarting failed container={name} pod={pod_label}",
            delay.as_secs()
        ),
    })
}

/// What to do next for `pod`.
pub fn compute_actions(
    pod: &Pod,
    runtime: &RuntimePod,
    backoff: &RestartBackoff,
    now: Instant,
) -> PodActions {
    let mut actions = PodActions::default();
    let Some(spec) = &pod.spec else {
        return actions;
    };
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let pod_label = format!(
        "{}_{}({uid})",
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.namespace.as_deref().unwrap_or_default()
    );
    let policy = spec.restart_policy.as_deref().unwrap_or("Always");
    if pod.metadata.deletion_timestamp.is_some() {
        return actions;
    }
    let inits: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();

    // 1. The sandbox.
    let sandbox = runtime.newest_sandbox();
    if !sandbox.is_some_and(|s| s.ready) {
        let ran_before = !runtime.containers.is_empty();
        if let Some(s) = sandbox {
            actions.kill_pod = true;
            if policy == "Never" && ran_before {
                // Not run twice; the containers' last states stand.
                return actions;
            }
            actions.create_sandbox = Some(s.attempt + 1);
        } else {
            actions.create_sandbox = Some(0);
        }
        // A new sandbox starts from the first init container (or all containers); attempts go
        // on from what ran before so restart counts carry over.
        let next_attempt = |name: &str| runtime.newest(name).map_or(0, |c| c.attempt + 1);
        match inits.first() {
            Some(first) => actions.start.push(Start {
                name: (*first).to_owned(),
                attempt: next_attempt(first),
                init: true,
            }),
            None => actions.start.extend(names.iter().map(|n| Start {
                name: (*n).to_owned(),
                attempt: next_attempt(n),
                init: false,
            })),
        }
        return actions;
    }
    let sandbox_id = sandbox.map(|s| s.id.as_str()).unwrap_or_default();
    // Only containers of the current sandbox count for "is it running".
    let current = |name: &str| {
        runtime
            .containers
            .iter()
            .filter(|c| c.name == name && c.sandbox_id == sandbox_id)
            .max_by_key(|c| c.attempt)
    };

    // 2. Init containers, one at a time.
    for name in &inits {
        match current(name) {
            None => {
                let attempt = runtime.newest(name).map_or(0, |c| c.attempt + 1);
                actions.start.push(Start {
                    name: (*name).to_owned(),
                    attempt,
                    init: true,
                });
                return actions;
            }
            Some(c) if c.state == api::ContainerState::ContainerExited && c.exit_code == 0 => {}
            Some(c) if c.state == api::ContainerState::ContainerExited => {
                if policy == "Never" {
                    actions.kill_pod = true;
                    actions.pod_failed = true;
                    return actions;
                }
                match backoff_wait(backoff, uid, &pod_label, name, now) {
                    Some(w) => actions.waiting.push(((*name).to_owned(), w)),
                    None => actions.start.push(Start {
                        name: (*name).to_owned(),
                        attempt: c.attempt + 1,
                        init: true,
                    }),
                }
                return actions;
            }
            // Created or running: wait for it.
            Some(_) => return actions,
        }
    }

    // 3. The containers.
    for name in &names {
        match current(name) {
            None => {
                // Never ran in this sandbox; it may have run in an earlier one.
                let before = runtime.newest(name);
                let ran = before.is_some_and(|c| c.state == api::ContainerState::ContainerExited);
                if ran && !before.is_some_and(|c| should_restart(policy, c.exit_code)) {
                    continue;
                }
                actions.start.push(Start {
                    name: (*name).to_owned(),
                    attempt: before.map_or(0, |c| c.attempt + 1),
                    init: false,
                });
            }
            Some(c) if c.state == api::ContainerState::ContainerExited => {
                if !should_restart(policy, c.exit_code) {
                    continue;
                }
                match backoff_wait(backoff, uid, &pod_label, name, now) {
                    Some(w) => actions.waiting.push(((*name).to_owned(), w)),
                    None => actions.start.push(Start {
                        name: (*name).to_owned(),
                        attempt: c.attempt + 1,
                        init: false,
                    }),
                }
            }
            Some(_) => {}
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edged::backoff::BackoffSettings;
    use serde_json::json;
    use std::time::Duration;

    fn pod(policy: &str, inits: &[&str], containers: &[&str]) -> Pod {
        let c = |n: &&str| json!({"name": n, "image": "busybox"});
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u1"},
            "spec": {"restartPolicy": policy,
                "initContainers": inits.iter().map(c).collect::<Vec<_>>(),
                "containers": containers.iter().map(c).collect::<Vec<_>>()}
        }))
        .unwrap()
    }

    fn sandbox(id: &str, attempt: u32, ready: bool) -> SandboxInfo {
        SandboxInfo {
            id: id.into(),
            attempt,
            ready,
            created_at: attempt as i64,
        }
    }

    fn ctr(
        name: &str,
        attempt: u32,
        sb: &str,
        state: api::ContainerState,
        exit: i32,
    ) -> ContainerInfo {
        ContainerInfo {
            id: format!("{name}-{attempt}"),
            name: name.into(),
            attempt,
            sandbox_id: sb.into(),
            state,
            exit_code: exit,
        }
    }

    fn start(name: &str, attempt: u32, init: bool) -> Start {
        Start {
            name: name.into(),
            attempt,
            init,
        }
    }

    use api::ContainerState::{ContainerExited as Exited, ContainerRunning as Running};

    #[test]
    fn a_new_pod_gets_a_sandbox_then_init_containers_in_order_then_its_containers() {
        let p = pod("Always", &["i1", "i2"], &["a", "b"]);
        let b = RestartBackoff::default();
        let now = Instant::now();
        let mut rt = RuntimePod::default();
        let a = compute_actions(&p, &rt, &b, now);
        assert_eq!(a.create_sandbox, Some(0));
        assert!(!a.kill_pod);
        assert_eq!(a.start, [start("i1", 0, true)]);

        rt.sandboxes.push(sandbox("s0", 0, true));
        rt.containers.push(ctr("i1", 0, "s0", Running, 0));
        assert_eq!(
            compute_actions(&p, &rt, &b, now),
            PodActions::default(),
            "wait for i1"
        );
        rt.containers[0].state = Exited;
        assert_eq!(
            compute_actions(&p, &rt, &b, now).start,
            [start("i2", 0, true)]
        );
        rt.containers.push(ctr("i2", 0, "s0", Exited, 0));
        assert_eq!(
            compute_actions(&p, &rt, &b, now).start,
            [start("a", 0, false), start("b", 0, false)]
        );
        rt.containers.push(ctr("a", 0, "s0", Running, 0));
        rt.containers.push(ctr("b", 0, "s0", Running, 0));
        assert_eq!(compute_actions(&p, &rt, &b, now), PodActions::default());
    }

    #[test]
    fn restart_policies_and_back_off() {
        let now = Instant::now();
        let mut b = RestartBackoff::new(BackoffSettings::default());
        let exited = |code| RuntimePod {
            sandboxes: vec![sandbox("s0", 0, true)],
            containers: vec![ctr("a", 3, "s0", Exited, code)],
        };
        for (policy, code, restart) in [
            ("Always", 0, true),
            ("Always", 1, true),
            ("OnFailure", 0, false),
            ("OnFailure", 1, true),
            ("Never", 0, false),
            ("Never", 1, false),
        ] {
            let a = compute_actions(&pod(policy, &[], &["a"]), &exited(code), &b, now);
            let want = if restart {
                vec![start("a", 4, false)]
            } else {
                vec![]
            };
            assert_eq!(a.start, want, "{policy} exit {code}");
        }
        // A failure inside its back-off window: waiting, with the kubelet's message.
        b.failed("u1", "a", now, Some(now));
        let a = compute_actions(
            &pod("Always", &[], &["a"]),
            &exited(1),
            &b,
            now + Duration::from_secs(3),
        );
        assert!(a.start.is_empty());
        assert_eq!(a.waiting[0].1.reason, "CrashLoopBackOff");
        assert_eq!(
            a.waiting[0].1.message,
            "back-off 10s restarting failed container=a pod=web_ns(u1)"
        );
        let a = compute_actions(
            &pod("Always", &[], &["a"]),
            &exited(1),
            &b,
            now + Duration::from_secs(10),
        );
        assert_eq!(a.start, [start("a", 4, false)]);
    }

    #[test]
    fn a_failed_init_container_fails_a_never_pod_and_is_retried_otherwise() {
        let now = Instant::now();
        let b = RestartBackoff::default();
        let rt = RuntimePod {
            sandboxes: vec![sandbox("s0", 0, true)],
            containers: vec![ctr("i", 0, "s0", Exited, 2)],
        };
        let a = compute_actions(&pod("Never", &["i"], &["a"]), &rt, &b, now);
        assert!(a.pod_failed && a.kill_pod && a.start.is_empty());
        let a = compute_actions(&pod("OnFailure", &["i"], &["a"]), &rt, &b, now);
        assert_eq!(a.start, [start("i", 1, true)]);
    }

    #[test]
    fn a_dead_sandbox_is_replaced_and_restart_counts_go_on() {
        let now = Instant::now();
        let b = RestartBackoff::default();
        // After a reboot: the sandbox is not ready, its container exited.
        let rt = RuntimePod {
            sandboxes: vec![sandbox("s0", 0, false)],
            containers: vec![ctr("a", 2, "s0", Exited, 137)],
        };
        let a = compute_actions(&pod("Always", &[], &["a"]), &rt, &b, now);
        assert!(a.kill_pod);
        assert_eq!(a.create_sandbox, Some(1));
        assert_eq!(a.start, [start("a", 3, false)]);
        // A Never pod that already ran is not run twice.
        let a = compute_actions(&pod("Never", &[], &["a"]), &rt, &b, now);
        assert!(a.kill_pod && a.create_sandbox.is_none() && a.start.is_empty());
        // A container that completed under OnFailure in the old sandbox is not started again.
        let rt = RuntimePod {
            sandboxes: vec![sandbox("s0", 0, false), sandbox("s1", 1, true)],
            containers: vec![ctr("a", 0, "s0", Exited, 0), ctr("b", 0, "s1", Running, 0)],
        };
        let a = compute_actions(&pod("OnFailure", &[], &["a", "b"]), &rt, &b, now);
        assert_eq!(a, PodActions::default());
    }

    #[test]
    fn a_pod_being_deleted_gets_nothing_new() {
        let mut p = pod("Always", &[], &["a"]);
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap(),
        ));
        let a = compute_actions(
            &p,
            &RuntimePod::default(),
            &RestartBackoff::default(),
            Instant::now(),
        );
        assert_eq!(a, PodActions::default());
    }
}

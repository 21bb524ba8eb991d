//! Autonomy against taint-based eviction.
//!
//! When an edge node's Lease stops, the node lifecycle controller taints it
//! `node.kubernetes.io/unreachable:NoExecute` (or `not-ready`), and the taint eviction controller
//! deletes every pod whose tolerations of that taint run out — by default after 300 s, the
//! toleration the API server's `DefaultTolerationSeconds` admission adds. An edge node is offline
//! by design, so cloudcore makes the pods bound to it tolerate both taints for the node's
//! autonomy duration: unlimited, or the node annotation `kedge.io/autonomy-duration` (`24h`,
//! `90m`, `3600s`, `1h30m`; `0` turns autonomy off and leaves pods as their users wrote them).
//!
//! The eviction controller honours the *smallest* `tolerationSeconds` among the tolerations
//! matching a taint, and a running pod's tolerations may only gain entries or change their
//! `tolerationSeconds` — so the existing matching tolerations are changed (a second, longer one
//! beside the default would do nothing) and a missing one is added.

use std::sync::atomic::Ordering;

use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};
use kube::api::Api;

use super::{NsName, rv_of};

pub const AUTONOMY_ANNOTATION: &str = "kedge.io/autonomy-duration";
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";
const NO_EXECUTE: &str = "NoExecute";

/// How long pods on a node ride out its absence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Autonomy {
    /// `0`: pods are left as written (the cluster evicts them as usual).
    Off,
    Unlimited,
    Seconds(i64),
}

impl Autonomy {
    fn toleration_seconds(self) -> Option<i64> {
        match self {
            Autonomy::Seconds(s) => Some(s),
            _ => None,
        }
    }
}

/// Parses a duration like Go's `time.ParseDuration` for whole seconds: `24h`, `90m`, `1h30m`,
/// `3600s`, `0`.
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(0);
    }
    let mut total: i64 = 0;
    let mut number = String::new();
    let mut any = false;
    for ch in t.chars() {
        if ch.is_ascii_digit() {
            number.push(ch);
            continue;
        }
        let unit = match ch {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => {
                return Err(format!(
                    "invalid duration {text:?}: unknown unit {ch:?} (use h, m, s)"
                ));
            }
        };
        let n: i64 = number
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: a number must come before {ch:?}"))?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("invalid duration {text:?}: too large"))?;
        number.clear();
        any = true;
    }
    if !number.is_empty() || !any {
        return Err(format!(
            "invalid duration {text:?}: expected e.g. 24h, 90m, 1h30m, 0"
        ));
    }
    Ok(total)
}

/// The node's autonomy; an unparsable annotation is reported and treated as unlimited (the
/// safe side for workloads on a device that may go offline).
pub fn autonomy_of(node: &Node) -> Autonomy {
    let Some(v) = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(AUTONOMY_ANNOTATION))
    else {
        return Autonomy::Unlimited;
    };
    match parse_duration(v) {
        Ok(0) => Autonomy::Off,
        Ok(s) => Autonomy::Seconds(s),
        Err(e) => {
            tracing::warn!(node = ?node.metadata.name, error = %e, "bad {AUTONOMY_ANNOTATION}; pods tolerate the node's absence without limit");
            Autonomy::Unlimited
        }
    }
}

/// Whether `t` tolerates `taint` (Kubernetes' `ToleratesTaint`).
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    let effect_ok = t
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let key = t.key.as_deref().unwrap_or_default();
    let key_ok = key.is_empty() || key == taint.key;
    if !effect_ok || !key_ok {
        return false;
    }
    match t.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        "Equal" | "" => {
            !key.is_empty()
                && t.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

/// What the taint eviction controller does with a pod on a node with `taint` (NoExecute):
/// `None` — evict at once (not tolerated); `Some(None)` — never; `Some(Some(s))` — after `s`
/// seconds, the smallest `tolerationSeconds` among the matching tolerations.
pub fn eviction_after(tolerations: &[Toleration], taint: &Taint) -> Option<Option<i64>> {
    let matching: Vec<&Toleration> = tolerations.iter().filter(|t| tolerates(t, taint)).collect();
    if matching.is_empty() {
        return None;
    }
    Some(
        matching
            .iter()
            .filter_map(|t| t.toleration_seconds)
            .map(|s| s.max(0))
            .min(),
    )
}

fn taint(key: &str) -> Taint {
    Taint {
        key: key.to_owned(),
        effect: NO_EXECUTE.to_owned(),
        ..Default::default()
    }
}

/// The tolerations a pod must have for `autonomy`, or `None` when it already has them (or
/// autonomy is off): every toleration matching the unreachable/not-ready taints gets the
/// autonomy's `tolerationSeconds`, and one is added for a taint nothing tolerates.
pub fn desired_tolerations(current: &[Toleration], autonomy: Autonomy) -> Option<Vec<Toleration>> {
    if autonomy == Autonomy::Off {
        return None;
    }
    let want = autonomy.toleration_seconds();
    let mut out = current.to_vec();
    let mut changed = false;
    for key in [NOT_READY, UNREACHABLE] {
        let t = taint(key);
        let mut matched = false;
        for tol in out.iter_mut().filter(|x| tolerates(x, &t)) {
            matched = true;
            if tol.toleration_seconds != want {
                tol.toleration_seconds = want;
                changed = true;
            }
        }
        if !matched {
            out.push(Toleration {
                key: Some(key.to_owned()),
                operator: Some("Exists".to_owned()),
                effect: Some(NO_EXECUTE.to_owned()),
                toleration_seconds: want,
                value: None,
            });
            changed = true;
        }
    }
    changed.then_some(out)
}

impl super::Loop {
    /// Patches the pod's NoExecute tolerations to its node's autonomy when they differ (see
    /// `autonomy`); at most one patch per pod version, conditional on that version (a newer one
    /// arrives through the watch and is looked at again).
    ///
    /// Only the leader patches (with several replicas, one patch per pod version in the cluster);
    /// a replica that becomes leader looks at every pod again.
    pub(super) fn ensure_autonomy(&mut self, key: &NsName) {
        if !self.leads() {
            return;
        }
        let Some(entry) = self.pods.get(key) else {
            return;
        };
        if entry.pod.metadata.deletion_timestamp.is_some() {
            return;
        }
        let Some(node) = self.edge_nodes.get(&entry.node) else {
            return;
        };
        let current = entry
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.clone())
            .unwrap_or_default();
        let Some(wanted) = desired_tolerations(&current, autonomy_of(node)) else {
            return;
        };
        let rv = rv_of(&entry.pod);
        if self.autonomy_patched.get(key) == Some(&rv) {
            return;
        }
        self.autonomy_patched.insert(key.clone(), rv.clone());
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &key.0);
        let (name, stats) = (key.1.clone(), self.stats.clone());
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": rv},
            "spec": {"tolerations": wanted}
        });
        tokio::spawn(async move {
            match api
                .patch(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    stats.toleration_patches.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(pod = %name, "tolerations set for the node's autonomy");
                }
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                    tracing::debug!(pod = %name, "pod changed meanwhile; looked at again on its next version");
                }
                Err(e) => {
                    tracing::warn!(pod = %name, error = %e, "cannot set the pod's tolerations for autonomy")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted() -> Vec<Toleration> {
        [NOT_READY, UNREACHABLE]
            .iter()
            .map(|k| Toleration {
                key: Some((*k).to_owned()),
                operator: Some("Exists".into()),
                effect: Some(NO_EXECUTE.into()),
                toleration_seconds: Some(300),
                value: None,
            })
            .collect()
    }

    #[test]
    fn durations_parse_like_go_for_whole_seconds() {
        assert_eq!(parse_duration("24h"), Ok(86400));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("0"), Ok(0));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn the_smallest_matching_toleration_decides_eviction() {
        let t = taint(UNREACHABLE);
        let mut tols = admitted();
        assert_eq!(eviction_after(&tols, &t), Some(Some(300)));
        // A second, unlimited toleration beside the default changes nothing.
        tols.push(Toleration {
            key: Some(UNREACHABLE.into()),
            operator: Some("Exists".into()),
            effect: Some(NO_EXECUTE.into()),
            toleration_seconds: None,
            value: None,
        });
        assert_eq!(eviction_after(&tols, &t), Some(Some(300)));
        assert_eq!(eviction_after(&[], &t), None);
        // A wildcard toleration matches everything.
        let all = Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        };
        assert_eq!(eviction_after(&[all], &t), Some(None));
    }

    #[test]
    fn the_patch_makes_eviction_follow_the_autonomy() {
        for (autonomy, expect) in [
            (Autonomy::Unlimited, Some(None)),
            (Autonomy::Seconds(86400), Some(Some(86400))),
        ] {
            for start in [admitted(), Vec::new()] {
                let tols = desired_tolerations(&start, autonomy).unwrap();
                for key in [UNREACHABLE, NOT_READY] {
                    assert_eq!(
                        eviction_after(&tols, &taint(key)),
                        expect,
                        "{autonomy:?} {key}"
                    );
                }
                // Only tolerationSeconds changed or entries added (what the API allows).
                for old in &start {
                    assert!(tols.iter().any(|n| Toleration {
                        toleration_seconds: old.toleration_seconds,
                        ..n.clone()
                    } == *old));
                }
                assert_eq!(
                    desired_tolerations(&tols, autonomy),
                    None,
                    "a second pass changes nothing"
                );
            }
        }
        assert_eq!(desired_tolerations(&admitted(), Autonomy::Off), None);
        // Other tolerations are left alone.
        let mut with_other = admitted();
        let other = Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("edge".into()),
            effect: Some("NoSchedule".into()),
            toleration_seconds: None,
        };
        with_other.push(other.clone());
        assert!(
            desired_tolerations(&with_other, Autonomy::Unlimited)
                .unwrap()
                .contains(&other)
        );
    }
}

//! Leader election on a `coordination.k8s.io/v1` Lease, for the few controllers that must act
//! once in the cluster however many cloudcore replicas run: deleting the pods of a deleted edge
//! Node, patching tolerations for node autonomy, Events about invalid devices. Everything else a
//! replica does concerns the nodes connected to it and needs no election.
//!
//! Hand-written: kube-runtime 5 has no leader election, and kube-leader-election 0.44 is built
//! on kube 4 (a second kube and k8s-openapi tree in the build). The rules are client-go's:
//! - A follower does not trust the holder's clock. It notes when *it* last saw the record change
//!   and takes over only after a whole lease duration without a change, so clock skew between
//!   replicas cannot make two leaders.
//! - A leader that has not renewed within `renew_deadline` (shorter than the lease duration)
//!   stops acting as leader before anybody else may take over.
//! - Every write carries the resourceVersion it read: of two replicas racing for the Lease, one
//!   write wins and the other reads the winner next time.
//! - A replica that stops releases the Lease, so the next one takes over at once instead of after
//!   a lease duration.
//!
//! [`Elector`] is the decision alone, with time passed in (tested without sleeping, like
//! `cloudhub::queue`); [`spawn`] drives it against the API server.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Timing of the election (client-go's defaults: 15 s, 10 s, 2 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElectionTiming {
    /// How long a Lease nobody renews keeps others from taking over.
    pub lease_duration: Duration,
    /// How long a leader keeps acting as leader without a successful renewal.
    pub renew_deadline: Duration,
    /// How often the Lease is read and renewed.
    pub retry_period: Duration,
}

impl Default for ElectionTiming {
    fn default() -> Self {
        ElectionTiming {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What of a Lease the election looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    pub renew_time: Option<String>,
    pub transitions: i32,
}

impl Record {
    fn of(lease: &Lease) -> Record {
        let spec = lease.spec.as_ref();
        Record {
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
            renew_time: spec
                .and_then(|s| s.renew_time.as_ref())
                .and_then(|t| serde_json::to_value(t).ok())
                .and_then(|v| v.as_str().map(str::to_owned)),
            transitions: spec.and_then(|s| s.lease_transitions).unwrap_or(0),
        }
    }
}

/// What the replica should do after reading the Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Somebody else holds a live Lease.
    Wait,
    /// Write the Lease naming us (a new holder: transitions + 1).
    TakeOver,
    /// We hold it: write a new renew time.
    Renew,
}

/// One replica's view of the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Elector {
    /// Entered at start, when another holder's write is seen, and when renewals failed for the
    /// renew deadline. `seen` is the last record read and when this replica first saw it so;
    /// left for `Leading` when a write naming this replica succeeds.
    Following { seen: Option<(Record, Instant)> },
    /// Entered when a write naming this replica succeeded (`renewed`: the last such write). Left
    /// when a renewal has not succeeded for the renew deadline, or another holder is read.
    Leading { renewed: Instant },
}

impl Elector {
    pub fn new() -> Elector {
        Elector::Following { seen: None }
    }

    pub fn is_leader(&self) -> bool {
        matches!(self, Elector::Leading { .. })
    }

    /// The Lease as just read (`None`: it does not exist).
    pub fn observe(
        &mut self,
        identity: &str,
        current: Option<&Record>,
        now: Instant,
        timing: &ElectionTiming,
    ) -> Decision {
        let Some(current) = current else {
            return Decision::TakeOver;
        };
        match current.holder.as_deref() {
            Some(h) if h == identity => return Decision::Renew,
            None => return Decision::TakeOver,
            Some(_) => {}
        }
        // Another holder.
        let since = match self {
            Elector::Following {
                seen: Some((record, since)),
            } if record == current => *since,
            _ => {
                *self = Elector::Following {
                    seen: Some((current.clone(), now)),
                };
                now
            }
        };
        if now.saturating_duration_since(since) >= timing.lease_duration {
            Decision::TakeOver
        } else {
            Decision::Wait
        }
    }

    /// A write naming this replica succeeded at `now`.
    pub fn written(&mut self, now: Instant) {
        *self = Elector::Leading { renewed: now };
    }

    /// A write failed (conflict, API server unreachable) at `now`.
    pub fn write_failed(&mut self, now: Instant, timing: &ElectionTiming) {
        if let Elector::Leading { renewed } = *self
            && now.saturating_duration_since(renewed) >= timing.renew_deadline
        {
            *self = Elector::Following { seen: None };
        }
    }
}

impl Default for Elector {
    fn default() -> Self {
        Elector::new()
    }
}

/// A replica's identity in the Lease: the pod name where the Downward API gives one, else the
/// host name, with a random suffix so that a restarted replica never mistakes the Lease of its
/// predecessor for its own.
pub fn identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "cloudcore".to_owned());
    // Without randomness (never seen) the process id still tells restarts apart.
    let suffix = kedge_common::pki::random_secret()
        .map(|r| kedge_common::pki::sha256_hex(&r)[..8].to_owned())
        .unwrap_or_else(|_| std::process::id().to_string());
    format!("{base}_{suffix}")
}

fn micro_time_now() -> Option<MicroTime> {
    let text = crate::edgecontroller::upstream::micro_time_now();
    serde_json::from_value(serde_json::Value::String(text)).ok()
}

/// Runs the election for `identity` on Lease `namespace/name` until `shutdown` (then releases
/// the Lease if held). The receiver says whether this replica leads now.
pub fn spawn(
    client: kube::Client,
    namespace: &str,
    name: &str,
    identity: String,
    timing: ElectionTiming,
    shutdown: CancellationToken,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let name = name.to_owned();
    let task = tokio::spawn(async move {
        let mut elector = Elector::new();
        loop {
            let round = tokio::time::timeout(
                timing.retry_period.max(Duration::from_millis(100)),
                one_round(&api, &name, &identity, &mut elector, &timing),
            )
            .await;
            if round.is_err() {
                // The API server did not answer at all: as a failed write.
                elector.write_failed(Instant::now(), &timing);
            }
            let leads = elector.is_leader();
            tx.send_if_modified(|was| {
                if *was != leads {
                    tracing::info!(lease = %name, %identity, leader = leads, "leader election: role changed");
                    *was = leads;
                    true
                } else {
                    false
                }
            });
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(timing.retry_period) => {}
            }
        }
        if elector.is_leader() {
            let _ = tx.send(false);
            release(&api, &name, &identity).await;
        }
    });
    (rx, task)
}

async fn one_round(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
    elector: &mut Elector,
    timing: &ElectionTiming,
) {
    let current = match api.get_opt(name).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(lease = %name, error = %e, "leader election: cannot read the Lease");
            elector.write_failed(Instant::now(), timing);
            return;
        }
    };
    let record = current.as_ref().map(Record::of);
    let decision = elector.observe(identity, record.as_ref(), Instant::now(), timing);
    if decision == Decision::Wait {
        return;
    }
    let now = micro_time_now();
    let transitions = record.as_ref().map(|r| r.transitions).unwrap_or(0);
    let mut spec = current
        .as_ref()
        .and_then(|l| l.spec.clone())
        .unwrap_or_default();
    spec.holder_identity = Some(identity.to_owned());
    spec.lease_duration_seconds = Some(timing.lease_duration.as_secs().max(1) as i32);
    spec.renew_time = now.clone();
    if decision == Decision::TakeOver {
        spec.acquire_time = now;
        spec.lease_transitions = Some(if current.is_some() {
            transitions + 1
        } else {
            0
        });
    }
    let result = match current {
        Some(mut lease) => {
            lease.spec = Some(spec);
            api.replace(name, &PostParams::default(), &lease).await
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            api.create(&PostParams::default(), &lease).await
        }
    };
    match result {
        Ok(_) => {
            if decision == Decision::TakeOver {
                tracing::info!(lease = %name, %identity, "leader election: took the Lease");
            }
            elector.written(Instant::now());
        }
        // 409: another replica wrote first; it is read next round.
        Err(e) => {
            if !matches!(&e, kube::Error::Api(s) if s.code == 409) {
                tracing::warn!(lease = %name, error = %e, "leader election: cannot write the Lease");
            }
            elector.write_failed(Instant::now(), timing);
        }
    }
}

/// Gives the Lease up (holder cleared), so that another replica takes over at its next round.
async fn release(api: &Api<Lease>, name: &str, identity: &str) {
    let Ok(Some(mut lease)) = api.get_opt(name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(identity) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = micro_time_now();
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => tracing::info!(lease = %name, %identity, "leader election: Lease released"),
        Err(e) => {
            tracing::warn!(lease = %name, error = %e, "leader election: cannot release the Lease")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(h: &str, renew: &str) -> Record {
        Record {
            holder: Some(h.into()),
            renew_time: Some(renew.into()),
            transitions: 0,
        }
    }

    #[test]
    fn a_missing_or_released_lease_is_taken_at_once() {
        let t = ElectionTiming::default();
        let now = Instant::now();
        let mut e = Elector::new();
        assert_eq!(e.observe("a", None, now, &t), Decision::TakeOver);
        let released = Record {
            holder: None,
            renew_time: None,
            transitions: 3,
        };
        assert_eq!(e.observe("a", Some(&released), now, &t), Decision::TakeOver);
        e.written(now);
        assert!(e.is_leader());
        assert_eq!(
            e.observe("a", Some(&held_by("a", "t1")), now, &t),
            Decision::Renew
        );
    }

    #[test]
    fn a_live_lease_of_another_is_taken_only_after_a_lease_duration_without_change() {
        let t = ElectionTiming::default();
        let t0 = Instant::now();
        let mut e = Elector::new();
        assert_eq!(
            e.observe("b", Some(&held_by("a", "t1")), t0, &t),
            Decision::Wait
        );
        // The holder renews: the clock starts again, whatever its renew time says.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            e.observe("b", Some(&held_by("a", "t2")), t1, &t),
            Decision::Wait
        );
        assert_eq!(
            e.observe(
                "b",
                Some(&held_by("a", "t2")),
                t1 + Duration::from_secs(14),
                &t
            ),
            Decision::Wait
        );
        assert_eq!(
            e.observe(
                "b",
                Some(&held_by("a", "t2")),
                t1 + Duration::from_secs(15),
                &t
            ),
            Decision::TakeOver
        );
        assert!(!e.is_leader(), "leader only once the write succeeds");
    }

    #[test]
    fn a_leader_that_cannot_renew_steps_down_before_others_may_take_over() {
        let t = ElectionTiming::default();
        let t0 = Instant::now();
        let mut e = Elector::new();
        e.written(t0);
        e.write_failed(t0 + Duration::from_secs(5), &t);
        assert!(e.is_leader(), "within the renew deadline it still leads");
        e.write_failed(t0 + t.renew_deadline, &t);
        assert!(!e.is_leader());
        assert!(t.renew_deadline < t.lease_duration);
    }

    #[test]
    fn a_leader_that_reads_another_holder_follows() {
        let t = ElectionTiming::default();
        let t0 = Instant::now();
        let mut e = Elector::new();
        e.written(t0);
        assert_eq!(
            e.observe("a", Some(&held_by("b", "t9")), t0, &t),
            Decision::Wait
        );
        assert!(!e.is_leader());
    }

    #[test]
    fn the_lease_record_reads_an_empty_holder_as_none() {
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x"},
            "spec": {"holderIdentity": "", "renewTime": "2026-12-03T01:02:03.000000Z", "leaseTransitions": 4}
        }))
        .unwrap();
        let r = Record::of(&lease);
        assert_eq!(r.holder, None);
        assert_eq!(r.transitions, 4);
        assert!(r.renew_time.is_some());
        assert!(micro_time_now().is_some());
    }
}

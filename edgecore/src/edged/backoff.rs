//! The kubelet's restart back-off (`CrashLoopBackOff`, and `ImagePullBackOff` for pulls): the
//! first restart waits 10 s, each following one twice as long up to 5 min, and a container that
//! ran for 10 min without failing starts again from 10 s.
//!
//! Keyed by pod UID and container name, so a re-created pod (new UID) starts fresh. Time is passed
//! in, as in `cloudhub::queue`: pod workers are tested without sleeping.

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct BackoffSettings {
    pub initial: Duration,
    pub max: Duration,
    /// Running (or not failing) this long resets the back-off.
    pub reset_after: Duration,
}

impl Default for BackoffSettings {
    fn default() -> Self {
        BackoffSettings {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    delay: Duration,
    /// When the last failure was recorded; the next start is allowed at `last + delay`.
    last: Instant,
}

#[derive(Debug, Default)]
pub struct RestartBackoff {
    settings: BackoffSettings,
    entries: HashMap<(String, String), Entry>,
}

impl RestartBackoff {
    pub fn new(settings: BackoffSettings) -> Self {
        RestartBackoff {
            settings,
            entries: HashMap::new(),
        }
    }

    /// Records a failure (the container exited and will be restarted, or a pull failed) at `now`.
    /// `ran_since`: when the failed container had started; a long enough run resets the back-off.
    pub fn failed(&mut self, uid: &str, container: &str, now: Instant, ran_since: Option<Instant>) {
        let key = (uid.to_owned(), container.to_owned());
        let s = self.settings;
        let reset = |e: &Entry| {
            now.saturating_duration_since(e.last) >= s.reset_after + e.delay
                || ran_since.is_some_and(|t| now.saturating_duration_since(t) >= s.reset_after)
        };
        let delay = match self.entries.get(&key) {
            Some(e) if !reset(e) => (e.delay * 2).min(s.max),
            _ => s.initial,
        };
        self.entries.insert(key, Entry { delay, last: now });
    }

    /// When `container` may be (re)started: `None` if it may start now.
    pub fn blocked_until(&self, uid: &str, container: &str, now: Instant) -> Option<Instant> {
        let e = self.entries.get(&(uid.to_owned(), container.to_owned()))?;
        let until = e.last + e.delay;
        (now < until).then_some(until)
    }

    /// The current delay, for the `back-off 40s restarting failed container` message.
    pub fn delay(&self, uid: &str, container: &str) -> Option<Duration> {
        self.entries
            .get(&(uid.to_owned(), container.to_owned()))
            .map(|e| e.delay)
    }

    /// The earliest moment after `now` at which a held-back start of pod `uid` is allowed: when
    /// its pod worker must sync again.
    pub fn next_expiry(&self, uid: &str, now: Instant) -> Option<Instant> {
        self.entries
            .iter()
            .filter(|((u, _), _)| u == uid)
            .map(|(_, e)| e.last + e.delay)
            .filter(|t| *t > now)
            .min()
    }

    /// Forgets a pod (it was deleted).
    pub fn forget_pod(&mut self, uid: &str) {
        self.entries.retain(|(u, _), _| u != uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn next_expiry_is_the_earliest_pending_one() {
        let t0 = Instant::now();
        let mut b = RestartBackoff::default();
        assert_eq!(b.next_expiry("p", t0), None);
        b.failed("p", "a", t0, None);
        b.failed("p", "b", t0 + S, None);
        b.failed("q", "a", t0, None);
        assert_eq!(b.next_expiry("p", t0), Some(t0 + 10 * S));
        assert_eq!(b.next_expiry("p", t0 + 10 * S), Some(t0 + 11 * S));
        assert_eq!(b.next_expiry("p", t0 + 11 * S), None);
    }

    #[test]
    fn doubles_from_ten_seconds_to_five_minutes() {
        let mut b = RestartBackoff::new(BackoffSettings::default());
        let mut t = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..7 {
            b.failed("u", "c", t, Some(t));
            delays.push(b.delay("u", "c").unwrap().as_secs());
            assert!(b.blocked_until("u", "c", t).is_some());
            t = b.blocked_until("u", "c", t).unwrap();
            assert_eq!(b.blocked_until("u", "c", t), None, "free at the deadline");
        }
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(b.blocked_until("other", "c", t), None);
    }

    #[test]
    fn a_long_run_or_a_quiet_spell_resets() {
        let mut b = RestartBackoff::new(BackoffSettings::default());
        let t0 = Instant::now();
        b.failed("u", "c", t0, Some(t0));
        b.failed("u", "c", t0 + 10 * S, Some(t0 + 10 * S));
        assert_eq!(b.delay("u", "c"), Some(20 * S));
        // Started at 30 s, ran for 10 minutes, then failed: back to 10 s.
        let started = t0 + 30 * S;
        b.failed("u", "c", started + 600 * S, Some(started));
        assert_eq!(b.delay("u", "c"), Some(10 * S));
        b.failed("u", "c", started + 610 * S, None);
        assert_eq!(b.delay("u", "c"), Some(20 * S));
        b.forget_pod("u");
        assert_eq!(b.delay("u", "c"), None);
    }
}

//! Failed bootstrap attempts per source address: after `max_failures` in one window the address
//! is refused (429 with `Retry-After`) until the window ends, so a token or a node name cannot be
//! guessed at line rate. Successful requests cost nothing. Time is an argument, so the rules are
//! tested without sleeping. (A dozen lines of counting; `governor` limits every request, not only
//! failures, and has no way to look without spending.)

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Addresses remembered at most; beyond that, windows that ended are forgotten first and then
/// new addresses go uncounted rather than growing the map without bound.
const MAX_ADDRESSES: usize = 16_384;

#[derive(Debug)]
pub struct FailureLimiter {
    max_failures: u32,
    window: Duration,
    /// Per address: when its window started and the failures in it.
    seen: HashMap<IpAddr, (Instant, u32)>,
}

impl FailureLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        FailureLimiter {
            max_failures,
            window,
            seen: HashMap::new(),
        }
    }

    /// `Err(wait)`: `ip` failed too often; refuse it for `wait`.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        match self.seen.get(&ip) {
            Some(&(start, n)) if n >= self.max_failures => {
                let end = start + self.window;
                if now < end { Err(end - now) } else { Ok(()) }
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed attempt from `ip`.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) {
        if self.seen.len() >= MAX_ADDRESSES && !self.seen.contains_key(&ip) {
            let window = self.window;
            self.seen
                .retain(|_, (start, _)| now.saturating_duration_since(*start) < window);
            if self.seen.len() >= MAX_ADDRESSES {
                return;
            }
        }
        let entry = self.seen.entry(ip).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_refused_after_its_failures_until_the_window_ends() {
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut l = FailureLimiter::new(3, Duration::from_secs(60));
        for i in 0..3 {
            assert_eq!(l.check(a, t0), Ok(()), "attempt {i}");
            l.failed(a, t0 + Duration::from_secs(i));
        }
        assert_eq!(
            l.check(a, t0 + Duration::from_secs(10)),
            Err(Duration::from_secs(50))
        );
        assert_eq!(l.check(b, t0), Ok(()), "other addresses are not affected");
        assert_eq!(l.check(a, t0 + Duration::from_secs(60)), Ok(()));
        // A new window starts from zero.
        l.failed(a, t0 + Duration::from_secs(61));
        assert_eq!(l.check(a, t0 + Duration::from_secs(62)), Ok(()));
    }

    #[test]
    fn the_table_stays_bounded() {
        let t0 = Instant::now();
        let mut l = FailureLimiter::new(1, Duration::from_secs(60));
        for i in 0..(MAX_ADDRESSES as u32 + 100) {
            l.failed(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert_eq!(l.seen.len(), MAX_ADDRESSES);
        // Once the windows have ended, new addresses are counted again.
        let later = t0 + Duration::from_secs(61);
        let fresh: IpAddr = "192.0.2.1".parse().unwrap();
        l.failed(fresh, later);
        assert_eq!(l.check(fresh, later), Err(Duration::from_secs(60)));
    }
}

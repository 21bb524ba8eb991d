//! Gives freed heap memory back to the operating system.
//!
//! glibc's malloc keeps what a thread frees in that thread's arena for later reuse, and only the
//! very top of an arena is ever returned on its own. edgecore allocates on many threads (the
//! runtime's workers, one per SQLite connection, the embedded MQTT broker's router and server),
//! so after a burst of twin traffic megabytes stay resident long after they were freed: on a
//! device with a few hundred MiB that is memory the node's pods do not get. `malloc_trim(0)`
//! returns every whole free page of every arena. On an edge node's heap (tens of MiB at most)
//! it takes well under a millisecond (`trim_cost` in BENCHMARKS.md), so edgecore runs it every
//! [`TRIM_INTERVAL`] on a blocking thread.
//!
//! glibc also gives every thread that meets a locked arena an arena of its own (up to eight per
//! core), each with its own free lists, fragmentation and top padding. edgecore's allocations are
//! small and few next to its pods', but spread over the runtime's workers, the SQLite threads and
//! the embedded broker's threads, so [`use_one_arena`] keeps them in one: with the embedded broker
//! and 100 devices that is 1.1–1.5 MiB less resident memory (BENCHMARKS.md, devices); twin and
//! pod throughput stayed within the benches' run-to-run noise (each thread keeps glibc's
//! per-thread cache of small blocks, which needs no arena lock).
//!
//! This is the one place edgecore calls C directly; on other C libraries it does nothing.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How often freed memory is handed back.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Returns freed heap pages to the OS; returns whether any memory was released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() -> bool {
    // SAFETY: malloc_trim takes no pointers, only walks glibc's own arenas under their locks,
    // and is documented as safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Makes every thread allocate from glibc's main arena. Call it first thing in `main`, before
/// any other thread exists (later threads would already have arenas of their own).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn use_one_arena() {
    // SAFETY: mallopt takes two integers and only sets a tunable under glibc's own lock.
    // M_ARENA_MAX = 1 is always a valid value; a refusal (0) leaves glibc's default.
    let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// Makes every thread allocate from one arena (nothing to do on this C library).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn use_one_arena() {}

/// Returns freed heap pages to the OS (nothing to do on this C library).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}

/// Trims every [`TRIM_INTERVAL`] until `shutdown`.
pub async fn trim_periodically(shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let took = tokio::task::spawn_blocking(|| {
            let t = Instant::now();
            let released = trim();
            (released, t.elapsed())
        })
        .await;
        if let Ok((released, took)) = took {
            tracing::trace!(released, ?took, "heap trimmed");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn trimming_is_harmless() {
        let v: Vec<Vec<u8>> = (0..1000).map(|i| vec![1u8; 1000 + i]).collect();
        drop(v);
        super::trim();
        // The allocator still works afterwards.
        let w = vec![7u8; 1 << 20];
        assert_eq!(w[12345], 7);
    }
}

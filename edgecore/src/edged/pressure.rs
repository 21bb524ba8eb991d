//! The node's MemoryPressure and DiskPressure conditions, from the signals and default hard
//! eviction thresholds a kubelet uses on Linux: `memory.available < 100Mi`,
//! `nodefs.available < 10%`, `nodefs.inodesFree < 5%`, `imagefs.available < 15%`,
//! `imagefs.inodesFree < 5%`. The node lifecycle controller turns them into the
//! `node.kubernetes.io/memory-pressure` / `disk-pressure` taints, so the scheduler stops placing
//! pods on an edge device that is out of memory or disk — instead of the conditions always
//! saying "no pressure".
//!
//! As the kubelet's, a condition stays true for `evictionPressureTransitionPeriod` (5 minutes)
//! after its signal last crossed the threshold, so a node hovering at the line does not flap.
//! `memory.available` is the kernel's `MemAvailable` (the kubelet subtracts the root cgroup's
//! inactive file pages from its working set; both estimate what can be had without swapping).
//! Pods are not evicted: edged has no eviction manager.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Kubelet's default `evictionPressureTransitionPeriod`.
pub const TRANSITION_PERIOD: Duration = Duration::from_secs(300);
/// Kubelet's default hard threshold `memory.available<100Mi`.
pub const MEMORY_AVAILABLE_MIN: u64 = 100 << 20;

/// Size and free space of a filesystem, in bytes and inodes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FsStats {
    pub capacity: u64,
    pub available: u64,
    pub inodes: u64,
    pub inodes_free: u64,
}

impl FsStats {
    /// Reads the filesystem holding `path` (or its nearest existing ancestor: edged's root
    /// directory appears with the first pod).
    pub fn of(path: &Path) -> std::io::Result<FsStats> {
        let existing = path.ancestors().find(|p| p.exists()).unwrap_or(path);
        let st = rustix::fs::statvfs(existing).map_err(std::io::Error::from)?;
        Ok(FsStats {
            capacity: st.f_blocks.saturating_mul(st.f_frsize),
            available: st.f_bavail.saturating_mul(st.f_frsize),
            inodes: st.f_files,
            inodes_free: st.f_favail,
        })
    }

    /// Percent of the space in use, rounded down, as the kubelet computes it.
    pub fn used_percent(&self) -> u64 {
        if self.capacity == 0 {
            return 0;
        }
        let available = u128::from(self.available.min(self.capacity)) * 100;
        100 - u64::try_from(available / u128::from(self.capacity)).unwrap_or(100)
    }

    /// Whether less than `percent` of the space, or less than `inodes_percent` of the inodes,
    /// is free. A filesystem without inode counts (some report 0) is judged by space alone.
    fn short(&self, percent: u64, inodes_percent: u64) -> bool {
        let below = |free: u64, total: u64, pct: u64| {
            total > 0 && u128::from(free) * 100 < u128::from(total) * u128::from(pct)
        };
        below(self.available, self.capacity, percent)
            || below(self.inodes_free, self.inodes, inodes_percent)
    }
}

/// One reading of the signals; `None` where it could not be read (then it signals nothing).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Readings {
    pub memory_available: Option<u64>,
    /// The filesystem of edged's root directory (pods' volumes and logs).
    pub nodefs: Option<FsStats>,
    /// The filesystem the runtime keeps images on.
    pub imagefs: Option<FsStats>,
}

impl Readings {
    /// Whether each signal is past its threshold now.
    fn crossed(&self) -> (bool, bool) {
        let memory = self
            .memory_available
            .is_some_and(|m| m < MEMORY_AVAILABLE_MIN);
        let disk = self.nodefs.is_some_and(|f| f.short(10, 5))
            || self.imagefs.is_some_and(|f| f.short(15, 5));
        (memory, disk)
    }
}

/// The conditions to report.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Pressure {
    pub memory: bool,
    pub disk: bool,
}

/// When each signal last crossed its threshold.
#[derive(Debug, Default)]
pub struct PressureTracker {
    memory_seen: Option<Instant>,
    disk_seen: Option<Instant>,
}

impl PressureTracker {
    /// The conditions after `readings` at `now`.
    pub fn observe(&mut self, readings: &Readings, now: Instant) -> Pressure {
        let (memory, disk) = readings.crossed();
        if memory {
            self.memory_seen = Some(now);
        }
        if disk {
            self.disk_seen = Some(now);
        }
        let recent =
            |seen: Option<Instant>| seen.is_some_and(|t| now.duration_since(t) < TRANSITION_PERIOD);
        Pressure {
            memory: recent(self.memory_seen),
            disk: recent(self.disk_seen),
        }
    }
}

/// Where the signals are read, and the tracker shared by everything that reports the node's
/// status (clones share it).
#[derive(Debug, Clone, Default)]
pub struct NodeSignals {
    pub root_dir: Option<PathBuf>,
    pub image_fs: Option<PathBuf>,
    tracker: Arc<Mutex<PressureTracker>>,
}

impl NodeSignals {
    pub fn new(root_dir: Option<PathBuf>, image_fs: Option<PathBuf>) -> Self {
        NodeSignals {
            root_dir,
            image_fs,
            tracker: Arc::default(),
        }
    }

    /// Reads the signals now.
    pub fn read(&self) -> Readings {
        let fs = |p: &Option<PathBuf>| p.as_deref().and_then(|p| FsStats::of(p).ok());
        Readings {
            memory_available: super::node::meminfo_bytes("MemAvailable"),
            nodefs: fs(&self.root_dir),
            imagefs: fs(&self.image_fs),
        }
    }

    /// Reads the signals and updates the conditions.
    pub fn sample(&self, now: Instant) -> (Readings, Pressure) {
        let readings = self.read();
        let pressure = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(&readings, now);
        (readings, pressure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(free_pct: u64, inodes_free_pct: u64) -> FsStats {
        FsStats {
            capacity: 1000,
            available: free_pct * 10,
            inodes: 1000,
            inodes_free: inodes_free_pct * 10,
        }
    }

    #[test]
    fn the_kubelets_default_thresholds() {
        let at = |r: Readings| r.crossed();
        let plenty = Readings {
            memory_available: Some(1 << 30),
            nodefs: Some(fs(50, 50)),
            imagefs: Some(fs(50, 50)),
        };
        assert_eq!(at(plenty), (false, false));
        assert_eq!(
            at(Readings {
                memory_available: Some(99 << 20),
                ..plenty
            }),
            (true, false)
        );
        for (nodefs, imagefs, disk) in [
            (fs(9, 50), fs(50, 50), true),
            (fs(10, 50), fs(50, 50), false),
            (fs(50, 4), fs(50, 50), true),
            (fs(50, 50), fs(14, 50), true),
            (fs(50, 50), fs(15, 50), false),
            (fs(50, 50), fs(50, 4), true),
        ] {
            let r = Readings {
                nodefs: Some(nodefs),
                imagefs: Some(imagefs),
                ..plenty
            };
            assert_eq!(at(r).1, disk, "{nodefs:?} {imagefs:?}");
        }
        // Nothing readable signals nothing; a filesystem without inode counts is judged by
        // space.
        assert_eq!(at(Readings::default()), (false, false));
        let no_inodes = FsStats {
            inodes: 0,
            inodes_free: 0,
            ..fs(50, 0)
        };
        assert!(!no_inodes.short(10, 5));
    }

    #[test]
    fn a_condition_stays_true_for_the_transition_period() {
        let mut t = PressureTracker::default();
        let t0 = Instant::now();
        let low = Readings {
            memory_available: Some(10 << 20),
            ..Readings::default()
        };
        let fine = Readings {
            memory_available: Some(1 << 30),
            ..Readings::default()
        };
        assert_eq!(t.observe(&fine, t0), Pressure::default());
        assert!(t.observe(&low, t0).memory);
        assert!(t.observe(&fine, t0 + Duration::from_secs(299)).memory);
        assert!(!t.observe(&fine, t0 + TRANSITION_PERIOD).memory);
    }

    #[test]
    fn this_machine_can_be_read() {
        let signals = NodeSignals::new(Some(std::env::temp_dir().join("not/made/yet")), None);
        let r = signals.read();
        assert!(r.memory_available.is_some_and(|m| m > 0));
        assert!(r.nodefs.is_some_and(|f| f.capacity > 0));
        assert_eq!(r.imagefs, None);
    }
}

//! Image garbage collection, as the kubelet's image GC manager does it: when the filesystem
//! holding the images is `imageGCHighThresholdPercent` full, remove images no container uses,
//! least recently used first, until it is down to `imageGCLowThresholdPercent`.
//!
//! Edge devices have small disks and pull new versions of their applications for years; without
//! this, old images fill the disk until pulls fail. Three kinds of image are never removed:
//! one a container uses (running or exited — an exited container may restart), one first seen
//! less than `imageMinimumGCAge` ago (pulled for a pod whose container does not exist yet), and
//! the runtime's sandbox image (or one it pins): an offline node could not pull that back, and
//! no pod could start.
//!
//! The records of when an image was first seen and last used live in memory, as the kubelet's:
//! after a restart every image counts as first seen then, which only delays collection by the
//! minimum age. Time is an argument, so the policy is tested without waiting.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use super::pressure::FsStats;
use super::runtime::{Runtime, RuntimeError, api};

/// When to collect and what may go.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageGcPolicy {
    /// Collect when the image filesystem is at least this full; 100 turns collection off.
    pub high_threshold_percent: u8,
    /// Collect down to this.
    pub low_threshold_percent: u8,
    /// An image first seen more recently is kept.
    pub min_age: Duration,
}

impl Default for ImageGcPolicy {
    /// The kubelet's defaults.
    fn default() -> Self {
        ImageGcPolicy {
            high_threshold_percent: 85,
            low_threshold_percent: 80,
            min_age: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct ImageRecord {
    first_detected: Instant,
    last_used: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageGcError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("the runtime reports no image filesystem")]
    NoImageFs,
    #[error("cannot read the image filesystem {path}: {source}")]
    Statfs {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What one collection did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Collected {
    /// Image ids removed, in order.
    pub removed: Vec<String>,
    pub freed_bytes: u64,
    /// Bytes that had to go to reach the low threshold (0: below the high one, nothing to do).
    pub wanted_bytes: u64,
}

/// The records and the policy; one per node.
#[derive(Debug)]
pub struct ImageGc {
    policy: ImageGcPolicy,
    records: HashMap<String, ImageRecord>,
}

/// The names an image is known by.
fn names(image: &api::Image) -> impl Iterator<Item = &str> {
    std::iter::once(image.id.as_str())
        .chain(image.repo_tags.iter().map(String::as_str))
        .chain(image.repo_digests.iter().map(String::as_str))
}

impl ImageGc {
    pub fn new(policy: ImageGcPolicy) -> Self {
        ImageGc {
            policy,
            records: HashMap::new(),
        }
    }

    pub fn policy(&self) -> &ImageGcPolicy {
        &self.policy
    }

    /// Updates the records from the images present and the containers that exist at `now`;
    /// returns the ids of the images in use (by a container, or as the sandbox image).
    pub fn detect(
        &mut self,
        images: &[api::Image],
        containers: &[api::Container],
        sandbox_image: Option<&str>,
        now: Instant,
    ) -> HashSet<String> {
        let mut wanted: HashSet<&str> = containers
            .iter()
            .flat_map(|c| {
                std::iter::once(c.image_ref.as_str())
                    .chain(c.image.as_ref().map(|i| i.image.as_str()))
            })
            .filter(|n| !n.is_empty())
            .collect();
        wanted.extend(sandbox_image);
        let mut in_use = HashSet::new();
        for image in images {
            let record = self.records.entry(image.id.clone()).or_insert(ImageRecord {
                first_detected: now,
                last_used: now,
            });
            if image.pinned || names(image).any(|n| wanted.contains(n)) {
                record.last_used = now;
                in_use.insert(image.id.clone());
            }
        }
        let present: HashSet<&str> = images.iter().map(|i| i.id.as_str()).collect();
        self.records.retain(|id, _| present.contains(id.as_str()));
        in_use
    }

    /// Bytes to free so that `fs` goes down to the low threshold, if it is at or above the
    /// high one.
    pub fn bytes_to_free(&self, fs: FsStats) -> u64 {
        if self.policy.high_threshold_percent >= 100
            || fs.used_percent() < u64::from(self.policy.high_threshold_percent)
        {
            return 0;
        }
        let keep_free = u128::from(fs.capacity)
            * u128::from(100 - u64::from(self.policy.low_threshold_percent.min(100)))
            / 100;
        u64::try_from(keep_free)
            .unwrap_or(u64::MAX)
            .saturating_sub(fs.available)
    }

    /// Images that may go, least recently used first (then first seen first): not in use, not
    /// pinned, seen at least the minimum age ago.
    pub fn candidates<'a>(
        &self,
        images: &'a [api::Image],
        in_use: &HashSet<String>,
        now: Instant,
    ) -> Vec<&'a api::Image> {
        let mut out: Vec<(&api::Image, ImageRecord)> = images
            .iter()
            .filter(|i| !i.pinned && !in_use.contains(&i.id))
            .filter_map(|i| self.records.get(&i.id).map(|r| (i, *r)))
            .filter(|(_, r)| now.saturating_duration_since(r.first_detected) >= self.policy.min_age)
            .collect();
        out.sort_by(|(a, ra), (b, rb)| {
            (ra.last_used, ra.first_detected, &a.id).cmp(&(rb.last_used, rb.first_detected, &b.id))
        });
        out.into_iter().map(|(i, _)| i).collect()
    }

    /// One collection against `rt` at `now`: reads what exists, and if the image filesystem
    /// (`fs` reads it) is full enough, removes candidates until enough is freed.
    pub async fn collect<R: Runtime>(
        &mut self,
        rt: &R,
        fs: impl Fn(&Path) -> std::io::Result<FsStats>,
        now: Instant,
    ) -> Result<Collected, ImageGcError> {
        let images = rt.list_images().await?;
        let containers = rt.list_containers(None).await?;
        // A runtime that cannot answer now may answer next round; collecting without knowing
        // the sandbox image could remove it, and an offline node could not pull it back.
        let sandbox_image = rt.sandbox_image().await?;
        let in_use = self.detect(&images, &containers, sandbox_image.as_deref(), now);
        let mountpoint = rt
            .image_fs_info()
            .await?
            .into_iter()
            .find_map(|f| f.fs_id.map(|id| id.mountpoint))
            .ok_or(ImageGcError::NoImageFs)?;
        let usage = fs(Path::new(&mountpoint)).map_err(|source| ImageGcError::Statfs {
            path: mountpoint.clone(),
            source,
        })?;
        let wanted = self.bytes_to_free(usage);
        let mut done = Collected {
            wanted_bytes: wanted,
            ..Collected::default()
        };
        if wanted == 0 {
            return Ok(done);
        }
        for image in self.candidates(&images, &in_use, now) {
            if done.freed_bytes >= wanted {
                break;
            }
            match rt.remove_image(&image.id).await {
                Ok(()) => {
                    tracing::info!(image = %image.id, tags = ?image.repo_tags, bytes = image.size, "unused image removed (image GC)");
                    done.freed_bytes += image.size;
                    done.removed.push(image.id.clone());
                    self.records.remove(&image.id);
                }
                // Gone meanwhile, or taken by a container just created: the next round sees.
                Err(e) => {
                    tracing::warn!(image = %image.id, error = %e, "cannot remove an unused image")
                }
            }
        }
        if done.freed_bytes < wanted {
            tracing::warn!(
                mountpoint,
                wanted = wanted,
                freed = done.freed_bytes,
                "image GC could not free enough space: the rest is used by containers or too new"
            );
        }
        Ok(done)
    }
}

/// How often the kubelet collects images.
pub const IMAGE_GC_PERIOD: Duration = Duration::from_secs(300);

/// Collects at start and then every `period` until `shutdown`. The first round only records
/// what exists: every image counts as first seen then, so none is old enough to go yet.
pub async fn run<R: Runtime>(
    rt: std::sync::Arc<R>,
    policy: ImageGcPolicy,
    period: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut gc = ImageGc::new(policy);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = gc.collect(&*rt, FsStats::of, Instant::now()).await {
            tracing::warn!(error = %e, "image GC failed; next round in {period:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edged::runtime::MemoryRuntime;

    fn image(id: &str, tag: &str, size: u64) -> api::Image {
        api::Image {
            id: id.into(),
            repo_tags: vec![tag.into()],
            size,
            ..Default::default()
        }
    }

    fn ids_of<'a>(images: &[&'a api::Image]) -> Vec<&'a str> {
        images.iter().map(|i| i.id.as_str()).collect()
    }

    fn container(image_ref: &str) -> api::Container {
        api::Container {
            image_ref: image_ref.into(),
            ..Default::default()
        }
    }

    #[test]
    fn collection_starts_at_the_high_threshold_and_frees_down_to_the_low_one() {
        let gc = ImageGc::new(ImageGcPolicy::default());
        let gib = 1 << 30;
        let fs = |used: u64| FsStats {
            capacity: 100 * gib,
            available: (100 - used) * gib,
            ..FsStats::default()
        };
        assert_eq!(gc.bytes_to_free(fs(84)), 0);
        assert_eq!(gc.bytes_to_free(fs(85)), 5 * gib);
        assert_eq!(gc.bytes_to_free(fs(100)), 20 * gib);
        let off = ImageGc::new(ImageGcPolicy {
            high_threshold_percent: 100,
            ..ImageGcPolicy::default()
        });
        assert_eq!(off.bytes_to_free(fs(100)), 0, "100 turns it off");
        assert_eq!(FsStats::default().used_percent(), 0);
    }

    #[test]
    fn only_unused_unpinned_old_enough_images_go_least_recently_used_first() {
        let t0 = Instant::now();
        let min = Duration::from_secs(120);
        let mut gc = ImageGc::new(ImageGcPolicy::default());
        let mut pinned = image("sha256:pin", "pinned:1", 10);
        pinned.pinned = true;
        let images = vec![
            image("sha256:a", "app:1", 10),
            image("sha256:b", "app:2", 10),
            image("sha256:c", "app:3", 10),
            image("sha256:p", "pause:3", 10),
            pinned,
        ];
        // At t0 app:1 and app:2 are in use (by image id and by tag), app:3 is not.
        let in_use = gc.detect(
            &images,
            &[container("sha256:a"), container("app:2")],
            Some("pause:3"),
            t0,
        );
        assert_eq!(
            in_use,
            HashSet::from([
                "sha256:a".into(),
                "sha256:b".into(),
                "sha256:p".into(),
                "sha256:pin".into()
            ])
        );
        assert!(gc.candidates(&images, &in_use, t0).is_empty(), "too new");
        // Later: app:2's container is gone; app:1 still runs.
        let t1 = t0 + min;
        let in_use = gc.detect(&images, &[container("sha256:a")], Some("pause:3"), t1);
        let ids = ids_of(&gc.candidates(&images, &in_use, t1));
        // Both last used at t0 and first seen at t0: the id decides.
        assert_eq!(ids, ["sha256:b", "sha256:c"]);
        // app:3 is used at t2, then nothing is (app:1 last at t1): least recently used first.
        let t2 = t1 + Duration::from_secs(1);
        gc.detect(&images, &[container("app:3")], Some("pause:3"), t2);
        let t3 = t2 + Duration::from_secs(1);
        let in_use = gc.detect(&images, &[], Some("pause:3"), t3);
        let ids = ids_of(&gc.candidates(&images, &in_use, t3));
        assert_eq!(ids, ["sha256:b", "sha256:a", "sha256:c"]);
        // An image that disappeared is forgotten; one that comes back is new again.
        let fewer = &images[1..];
        gc.detect(fewer, &[], Some("pause:3"), t3);
        let in_use = gc.detect(&images, &[], Some("pause:3"), t3);
        let ids = ids_of(&gc.candidates(&images, &in_use, t3));
        assert_eq!(ids, ["sha256:b", "sha256:c"], "sha256:a is new again");
    }

    #[tokio::test]
    async fn a_collection_removes_enough_and_keeps_what_containers_and_sandboxes_use() {
        let rt = MemoryRuntime::new();
        rt.set_sandbox_image("pause:3");
        for (name, mib) in [
            ("pause:3", 1),
            ("old:1", 30),
            ("old:2", 30),
            ("old:3", 30),
            ("live:1", 30),
        ] {
            rt.add_image_of_size(name, mib << 20);
        }
        // A container of live:1 exists (exited containers count too: they may restart).
        let sandbox_config = api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: "web".into(),
                uid: "uid-web".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            ..Default::default()
        };
        let sandbox = rt.run_pod_sandbox(sandbox_config.clone()).await.unwrap();
        rt.create_container(
            &sandbox,
            api::ContainerConfig {
                image: Some(api::ImageSpec {
                    image: "live:1".into(),
                    ..Default::default()
                }),
                metadata: Some(api::ContainerMetadata {
                    name: "c".into(),
                    attempt: 0,
                }),
                ..Default::default()
            },
            sandbox_config,
        )
        .await
        .unwrap();
        let mut gc = ImageGc::new(ImageGcPolicy {
            high_threshold_percent: 90,
            low_threshold_percent: 50,
            min_age: Duration::from_secs(120),
        });
        // 100 MiB disk, 95 used: 45 MiB to free, so two 30 MiB images go.
        let full = |_: &Path| {
            Ok(FsStats {
                capacity: 100 << 20,
                available: 5 << 20,
                ..FsStats::default()
            })
        };
        let t0 = Instant::now();
        let first = gc.collect(&rt, full, t0).await.unwrap();
        assert_eq!(first.wanted_bytes, 45 << 20);
        assert!(
            first.removed.is_empty(),
            "every image is new at first: {first:?}"
        );
        let later = gc
            .collect(&rt, full, t0 + Duration::from_secs(121))
            .await
            .unwrap();
        assert_eq!(later.removed, ["sha256:old:1", "sha256:old:2"]);
        assert_eq!(later.freed_bytes, 60 << 20);
        assert!(rt.has_image("old:3") && rt.has_image("live:1") && rt.has_image("pause:3"));
        // Below the high threshold nothing goes.
        let fine = |_: &Path| {
            Ok(FsStats {
                capacity: 100 << 20,
                available: 50 << 20,
                ..FsStats::default()
            })
        };
        let calm = gc
            .collect(&rt, fine, t0 + Duration::from_secs(400))
            .await
            .unwrap();
        assert_eq!(calm, Collected::default());
        assert!(rt.has_image("old:3"));
    }
}

//! A private containerd for tests, started with `hack/containerd-up.sh` in a temporary directory
//! and stopped (with its mounts, bridge and cgroups) by `hack/containerd-down.sh` on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The repository's `hack/` directory.
fn hack(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../hack")
        .join(script)
}

pub struct TestContainerd {
    pub socket: PathBuf,
    /// The cgroup under which this containerd's pods go (removed on drop).
    pub cgroup_parent: String,
    pub pause_image: String,
    /// busybox-static with a shell, built by `hack/build-image.py`.
    pub busybox_image: String,
    dir: tempfile::TempDir,
}

impl TestContainerd {
    pub fn start() -> anyhow::Result<TestContainerd> {
        let dir = tempfile::Builder::new()
            .prefix("kedge-containerd-")
            .tempdir()?;
        let out = Command::new("bash")
            .arg(hack("containerd-up.sh"))
            .arg(dir.path())
            .output()
            .context("running hack/containerd-up.sh")?;
        if !out.status.success() {
            bail!(
                "hack/containerd-up.sh failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8(out.stdout)?;
        let var = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .map(str::to_owned)
                .with_context(|| format!("hack/containerd-up.sh printed no {name}"))
        };
        Ok(TestContainerd {
            socket: PathBuf::from(var("CONTAINERD_SOCK")?),
            cgroup_parent: var("CGROUP_PARENT")?,
            pause_image: var("PAUSE_IMAGE")?,
            busybox_image: var("BUSYBOX_IMAGE")?,
            dir,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for TestContainerd {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(hack("containerd-down.sh"))
            .arg(self.dir.path())
            .status();
    }
}

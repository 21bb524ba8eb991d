//! A real container registry for pull tests: Debian's `docker-registry` (the CNCF distribution
//! registry) on 127.0.0.1 with htpasswd basic auth, images pushed into it with `skopeo`.
//! containerd talks plain HTTP to registries on 127.0.0.1, so no TLS set-up is needed.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub struct TestRegistry {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    pub user: String,
    pub password: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl TestRegistry {
    pub fn start(user: &str, password: &str) -> anyhow::Result<TestRegistry> {
        let dir = tempfile::Builder::new()
            .prefix("kedge-registry-")
            .tempdir()?;
        let out = Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .context("running htpasswd (apache2-utils)")?;
        if !out.status.success() {
            bail!("htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::write(dir.path().join("htpasswd"), &out.stdout)?;
        let addr = format!("127.0.0.1:{}", crate::procfs::free_port()?);
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}\nhttp:\n  addr: {addr}\nauth:\n  htpasswd:\n    realm: kedge-test\n    path: {htpasswd}\n",
            root = dir.path().join("data").display(),
            htpasswd = dir.path().join("htpasswd").display(),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting docker-registry (Debian package docker-registry)")?;
        let registry = TestRegistry {
            addr,
            user: user.to_owned(),
            password: password.to_owned(),
            child,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "docker-registry did not listen on {}:\n{}",
                    registry.addr,
                    registry.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    /// Pushes an OCI archive (from `hack/build-image.py`) as `<addr>/<name>`.
    pub fn push(&self, oci_archive: &Path, name: &str) -> anyhow::Result<String> {
        let reference = format!("{}/{name}", self.addr);
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds"])
            .arg(format!("{}:{}", self.user, self.password))
            .arg(format!("oci-archive:{}", oci_archive.display()))
            .arg(format!("docker://{reference}"))
            .output()
            .context("running skopeo")?;
        if !out.status.success() {
            bail!(
                "skopeo copy to {reference} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(reference)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

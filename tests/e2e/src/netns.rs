//! Two "hosts" on one machine (test support): the root network namespace is the cloud, a
//! namespace of its own is the edge, joined by a veth pair on a private /30 (10.252.x.0/30).
//! [`EdgeHost::partition`] takes the cloud end of the pair down — packets are dropped, nothing
//! is reset, as when a real link fails — and [`EdgeHost::heal`] brings it back. Needs root and
//! `ip` (iproute2); `../shared/design/containerd-here.md` says what works here. Everything is
//! deleted on drop; only this test's own namespace and interfaces are touched.

use std::process::Command;

use anyhow::{Context, bail};

pub struct EdgeHost {
    pub name: String,
    cloud_if: String,
    /// The cloud's address on the pair (in the root namespace).
    pub cloud_ip: String,
    /// The edge's address (in its namespace).
    pub edge_ip: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (apt-get install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl EdgeHost {
    /// Creates the namespace and the pair; an error says what is missing (root, `ip netns`).
    pub fn create() -> anyhow::Result<EdgeHost> {
        let pid = std::process::id();
        let n = pid % 250 + 1;
        let host = EdgeHost {
            name: format!("kedge-edge-{pid}"),
            cloud_if: format!("kc{pid}"),
            cloud_ip: format!("10.252.{n}.1"),
            edge_ip: format!("10.252.{n}.2"),
        };
        let edge_if = format!("ke{pid}");
        ip(&["netns", "add", &host.name])?;
        // From here on, drop cleans up whatever was made.
        ip(&[
            "link",
            "add",
            &host.cloud_if,
            "type",
            "veth",
            "peer",
            "name",
            &edge_if,
        ])?;
        ip(&["link", "set", &edge_if, "netns", &host.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", host.cloud_ip),
            "dev",
            &host.cloud_if,
        ])?;
        ip(&["link", "set", &host.cloud_if, "up"])?;
        let ns = |args: &[&str]| {
            let mut full = vec!["-n", host.name.as_str()];
            full.extend_from_slice(args);
            ip(&full)
        };
        ns(&[
            "addr",
            "add",
            &format!("{}/30", host.edge_ip),
            "dev",
            &edge_if,
        ])?;
        ns(&["link", "set", &edge_if, "up"])?;
        ns(&["link", "set", "lo", "up"])?;
        Ok(host)
    }

    /// The prefix that runs a program on the edge host.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }

    /// Cuts the link (the cloud's end goes down; in-flight packets are lost).
    pub fn partition(&self) -> anyhow::Result<()> {
        ip(&["link", "set", &self.cloud_if, "down"])
    }

    pub fn heal(&self) -> anyhow::Result<()> {
        ip(&["link", "set", &self.cloud_if, "up"])
    }
}

impl Drop for EdgeHost {
    fn drop(&mut self) {
        // Deleting one end of a pair deletes both.
        let _ = ip(&["link", "del", &self.cloud_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

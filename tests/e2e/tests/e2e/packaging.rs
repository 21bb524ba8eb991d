//! What ships beside the binaries: the sample configs load, and the systemd unit runs edgecore
//! the way edgecore expects (readiness notification, the config `edgecore join` writes, restarts
//! that leave pods running).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

fn build() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build")
}

#[test]
fn the_sample_configs_are_valid() {
    let cloud = cloudcore::config::CloudCoreConfig::load(&build().join("config/cloudcore.yaml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cloud.modules.cloud_hub.advertise_address.len(), 2);
    let edge = edgecore::config::EdgeCoreConfig::load(&build().join("config/edgecore.yaml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(edge.modules.edged.hostname_override, "edge-node-1");
}

#[test]
fn the_systemd_unit_matches_edgecore() {
    let unit = std::fs::read_to_string(build().join("systemd/edgecore.service")).unwrap();
    let settings: Vec<(&str, &str)> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| {
            l.split_once('=')
                .unwrap_or_else(|| panic!("not key=value: {l}"))
        })
        .collect();
    let get = |k: &str| settings.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    // edgecore sends READY=1 (sd_notify) once its modules run.
    assert_eq!(get("Type"), Some("notify"));
    assert_eq!(get("Restart"), Some("always"));
    // Only edgecore is stopped; containerd's shims keep the pods running.
    assert_eq!(get("KillMode"), Some("process"));
    // The config path `edgecore join` writes by default.
    assert_eq!(
        get("ExecStart"),
        Some("/usr/local/bin/edgecore --config /etc/kedge/edgecore.yaml")
    );
    assert_eq!(get("StateDirectory"), Some("kedge"));
    let defaults = edgecore::config::EdgeCoreConfig::default();
    assert!(defaults.database.data_source.starts_with("/var/lib/kedge"));
}

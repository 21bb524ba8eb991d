//! The edgecore binary's command line, run as a user would.

use std::process::{Command, Output};

fn edgecore(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgecore"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run edgecore")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_the_options() {
    let o = edgecore(&["--help"]);
    assert!(o.status.success());
    let out = stdout(&o);
    for word in ["--defaultconfig", "--config", "--log-format"] {
        assert!(out.contains(word), "--help lacks {word}:\n{out}");
    }
}

#[test]
fn defaultconfig_is_a_valid_config() {
    let o = edgecore(&["--defaultconfig"]);
    assert!(o.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgecore.yaml");
    std::fs::write(&path, stdout(&o)).unwrap();
    let check = edgecore(&["--config", path.to_str().unwrap(), "check-config"]);
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(stdout(&check).contains("heartbeat: 15"));
}

#[test]
fn bad_config_names_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "modules:\n  metaManager:\n    metaServer:\n      enable: sometimes\n",
    )
    .unwrap();
    let o = edgecore(&["--config", path.to_str().unwrap(), "check-config"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains(path.to_str().unwrap()), "{err}");
    assert!(
        err.contains("modules.metaManager.metaServer.enable"),
        "{err}"
    );
}

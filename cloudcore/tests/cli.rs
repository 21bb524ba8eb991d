//! The cloudcore binary's command line, run as a user would.

use std::process::{Command, Output};

fn cloudcore(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloudcore"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run cloudcore")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_the_commands() {
    let o = cloudcore(&["--help"]);
    assert!(o.status.success());
    let out = stdout(&o);
    for word in [
        "crds",
        "--defaultconfig",
        "--config",
        "--kubeconfig",
        "--log-format",
    ] {
        assert!(out.contains(word), "--help lacks {word}:\n{out}");
    }
}

#[test]
fn defaultconfig_is_a_valid_config() {
    let o = cloudcore(&["--defaultconfig"]);
    assert!(o.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloudcore.yaml");
    std::fs::write(&path, stdout(&o)).unwrap();
    let check = cloudcore(&["--config", path.to_str().unwrap(), "check-config"]);
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(stdout(&check).contains("keepaliveInterval: 30"));
}

#[test]
fn crds_output_equals_the_crds_directory() {
    let o = cloudcore(&["crds"]);
    assert!(o.status.success());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    names.sort();
    let files: std::collections::BTreeSet<String> = names
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let printed: std::collections::BTreeSet<String> = stdout(&o)
        .split_inclusive('\n')
        .fold(Vec::<String>::new(), |mut docs, line| {
            if line == "---\n" {
                docs.push(String::new());
            }
            if let Some(last) = docs.last_mut() {
                last.push_str(line);
            }
            docs
        })
        .into_iter()
        .collect();
    assert_eq!(printed, files);
}

#[test]
fn bad_config_names_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "modules:\n  cloudHub:\n    websocket:\n      prot: 1\n",
    )
    .unwrap();
    let o = cloudcore(&["--config", path.to_str().unwrap(), "check-config"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains(path.to_str().unwrap()), "{err}");
    assert!(err.contains("modules.cloudHub.websocket.prot"), "{err}");

    std::fs::write(&path, "modules:\n  cloudHub:\n    nodeLimit: lots\n").unwrap();
    let o = cloudcore(&["--config", path.to_str().unwrap(), "check-config"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("modules.cloudHub.nodeLimit"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let o = cloudcore(&["--config", "/nonexistent/cloudcore.yaml", "check-config"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/cloudcore.yaml"));
}

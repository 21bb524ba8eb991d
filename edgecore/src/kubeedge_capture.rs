//! Test support: the capture of a real KubeEdge v1.23.1 session
//! (`tests/e2e/testdata/kubeedge-v1.23.1`), which what our edge sends to KubeEdge's cloudcore
//! is compared with.

use serde_json::Value;

/// The message payload on `line` (1-based, as the capture's README counts) of the session.
pub fn captured(line: usize) -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/e2e/testdata/kubeedge-v1.23.1/session.jsonl"
    );
    let text = std::fs::read_to_string(path).expect("the KubeEdge capture in tests/e2e/testdata");
    let l = text
        .lines()
        .nth(line - 1)
        .expect("a line of the KubeEdge capture");
    serde_json::from_str::<Value>(l).expect("a JSON line")["payload"].clone()
}

/// Asserts that `ours` has the route (source, group, operation, resource) of capture `line`.
pub fn assert_same_route(ours: &Value, line: usize) {
    let theirs = captured(line);
    for k in ["source", "group", "operation", "resource"] {
        assert_eq!(
            ours["route"][k], theirs["route"][k],
            "line {line}: route.{k}"
        );
    }
}

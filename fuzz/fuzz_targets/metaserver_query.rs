//! A MetaServer request's query string (`labelSelector`, `fieldSelector`, `limit`, ...) as a
//! local client sends it: parsing and matching never panic.
#![no_main]

use kedge_common::http::{parse_query, query_value};
use kedge_common::selectors::{FieldSelector, LabelSelector, supported_fields};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(q) = std::str::from_utf8(data) else {
        return;
    };
    let params = parse_query(Some(q));
    let pod = json!({"metadata": {"name": "web", "namespace": "default",
        "labels": {"app": "web", "tier": "front"}},
        "spec": {"nodeName": "edge-1"}, "status": {"phase": "Running"}});
    if let Ok(l) = LabelSelector::parse(query_value(&params, "labelSelector").unwrap_or("")) {
        let _ = l.matches(&pod);
    }
    let fields = query_value(&params, "fieldSelector").unwrap_or("");
    if let Ok(f) = FieldSelector::parse(fields, supported_fields("", "pods")) {
        let _ = f.matches(&pod);
    }
    // The selectors are also fuzzed on the raw input, not only what the query split produced.
    let _ = LabelSelector::parse(q);
    let _ = FieldSelector::parse(q, supported_fields("", "pods"));
});

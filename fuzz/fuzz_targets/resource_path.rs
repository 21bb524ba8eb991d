//! Resource paths of messages (`node/<node>/<ns>/<type>/<name>` from the cloud, without the
//! node from the edge) and node names: parsing never panics, and what parses answers every
//! accessor and converts between the two forms.
#![no_main]

use kedge_common::ResourcePath;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = kedge_common::resource::validate_node_name(s);
    let _ = kedge_common::resource::api_type_of(s);
    for parsed in [ResourcePath::parse_cloud(s), ResourcePath::parse_edge(s)] {
        if let Ok(p) = parsed {
            let _ = (
                p.node(),
                p.namespace(),
                p.namespace_segment(),
                p.resource_type(),
                p.name(),
                p.is_cluster_scoped(),
                p.edge_str(),
            );
            let edge = p.without_node();
            if let Ok(back) = edge.with_node("edge-1") {
                assert_eq!(back.node(), Some("edge-1"));
            }
        }
    }
});

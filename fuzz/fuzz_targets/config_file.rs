//! cloudcore's and edgecore's configuration files: any text gives a configuration or an error
//! naming the field, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = cloudcore::config::CloudCoreConfig::parse(Path::new("cloudcore.yaml"), &text);
    let _ = edgecore::config::EdgeCoreConfig::parse(Path::new("edgecore.yaml"), &text);
});

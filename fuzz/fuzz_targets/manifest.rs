//! Any bytes as a volume manifest and as a checkpoint chain; whatever parses must survive
//! a write-and-parse round trip unchanged.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tidemark_formats::manifest::{CheckpointChain, VolumeManifest};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = VolumeManifest::parse(data, Path::new("volume.json")) {
        let again = VolumeManifest::parse(&m.to_json(), Path::new("again")).expect("round trip");
        assert_eq!(again, m);
    }
    if let Ok(c) = CheckpointChain::parse(data, Path::new("checkpoints.json")) {
        let again = CheckpointChain::parse(&c.to_json(), Path::new("again")).expect("round trip");
        assert_eq!(again, c);
    }
});

//! Any bytes as a delta file, through both readers: open, read every extent, serve a few
//! reads. Never a panic; the two readers agree on every file they both accept.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tidemark_formats::delta::{DeltaReader, DeltaStreamReader};

fuzz_target!(|data: &[u8]| {
    let file = Path::new("fuzz.delta");
    let mut random_access = Vec::new();
    if let Ok(mut r) = DeltaReader::open(Cursor::new(data), file) {
        let mut ok = true;
        for e in r.extents().to_vec() {
            let mut out = Vec::new();
            match r.read_extent(&e, &mut out) {
                Ok(()) => random_access.push((e, out)),
                Err(_) => ok = false,
            }
        }
        let size = r.header().volume_size;
        let mut buf = [0u8; 4096];
        for off in [0, size / 3, size.saturating_sub(100)] {
            let _ = r.read_at(off, &mut buf);
        }
        if !ok {
            random_access.clear();
        }
        let mut streamed = Vec::new();
        if let Ok(mut s) = DeltaStreamReader::new(data, file) {
            loop {
                match s.next_extent() {
                    Ok(Some((e, d))) => streamed.push((e, d.to_vec())),
                    Ok(None) => {
                        if ok {
                            assert_eq!(streamed, random_access);
                        }
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
    } else if let Ok(mut s) = DeltaStreamReader::new(data, file) {
        while let Ok(Some(_)) = s.next_extent() {}
    }
});

//! Any bytes as a request header, compact and extended: parsing never panics, and a
//! header that parses re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_nbd::proto;

fuzz_target!(|data: &[u8]| {
    for extended in [false, true] {
        let len = if extended { proto::EXTENDED_REQUEST_LEN } else { proto::REQUEST_LEN };
        if let Ok(request) = proto::parse_request(data, extended) {
            let mut out = Vec::new();
            proto::encode_request(&mut out, &request, extended);
            assert_eq!(out[..], data[..len]);
        }
    }
    if let Ok(header) = proto::parse_option_header(data) {
        let encoded = proto::encode_option(header.option, &[]);
        assert_eq!(encoded[..12], data[..12]);
    }
});

// HTTP/Kafka payloads as ndjson.
#![no_main]
#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::decode(data, Some("application/x-ndjson"), &fleetpipe_processors::Origin::Http);
});

// HTTP/Kafka payloads as json.
#![no_main]
#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::decode(data, None, &fleetpipe_processors::Origin::Http);
});

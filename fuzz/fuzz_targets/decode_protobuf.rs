// HTTP/Kafka payloads as protobuf.
#![no_main]
#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::decode(data, Some("application/x-protobuf"), &fleetpipe_processors::Origin::Http);
});

// A write-ahead log record as a replay reads it: a corrupt one is an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fleetpipe_pipeline::decode_log_record(data);
});

// The trusted path for what fleetpipe stored itself (Redis values, Protobuf batches): corrupt
// stored bytes are an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fleetpipe_processors::codec::stored::frame_from_json(data);
    let _ = fleetpipe_processors::codec::stored::frames_from_protobuf(data, 1_795_640_400_000_000);
});

// MQTT messages: the input up to its first NUL byte is the topic (parsed for vehicle and
// kind), the rest the payload.
#![no_main]
#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (topic, payload) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"vehicles/V1/frames"[..], data),
    };
    let topic = String::from_utf8_lossy(topic).into_owned();
    let _ = fleetpipe_processors::codec::parse_topic(&topic);
    common::decode(payload, None, &fleetpipe_processors::Origin::Mqtt { topic });
});

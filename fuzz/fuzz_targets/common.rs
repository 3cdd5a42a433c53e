// Shared by the decoding targets: one message through the untrusted path, and the invariant
// every decode keeps (each received frame is either accepted or rejected, never lost).
use bytes::Bytes;
use fleetpipe_processors::codec::{decode_message, Message};
use fleetpipe_processors::validate::Rules;
use fleetpipe_processors::Origin;

pub fn decode(data: &[u8], content_type: Option<&str>, origin: &Origin) {
    let payload = Bytes::copy_from_slice(data);
    let msg = Message { payload: &payload, content_type, origin, received_at: 1_795_640_400_000_000 };
    let rules = Rules { max_frames_per_message: 1_000, ..Rules::default() };
    let d = decode_message(&msg, &rules);
    assert_eq!(d.frames.len() + d.rejections.len(), d.received as usize, "a frame went missing");
    assert!(d.received >= 1, "a message is at least one frame or one rejection");
    for f in &d.frames {
        assert!(fleetpipe_processors::validate::frame(f, &rules).is_ok(), "an accepted frame fails validation");
    }
}

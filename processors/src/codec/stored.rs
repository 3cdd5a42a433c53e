//! The trusted decode path: what fleetpipe itself stored — log records (Protobuf frames) and
//! Redis values (contract JSON with `received_at`) — read back as it was written.
//!
//! Input from vehicles goes through [`super::decode_message`], which applies the transport's
//! rules and every contract check. Stored frames passed those checks when they were received;
//! checking them again against today's clock and rules could only refuse what was accepted (a
//! frame accepted as 23 h ahead would be "future" a day later). So this path converts, and
//! fails only on bytes fleetpipe does not write (truncated, missing a required field), which
//! callers treat as corruption, never as a rejection.

use crate::frame::{Frame, Micros, Reason};
use crate::{Error, Result};

use super::{json, proto};

fn corrupt((reason, detail): (Reason, String)) -> Error {
    Error::CorruptFrame { reason, detail }
}

/// The frames of a stored Protobuf `FrameBatch`, each with `received_at`.
pub fn frames_from_protobuf(payload: &[u8], received_at: Micros) -> Result<Vec<Frame>> {
    let batch = proto::decode_batch(payload)
        .map_err(|e| Error::CorruptFrame { reason: Reason::MalformedProtobuf, detail: e.to_string() })?;
    batch.frames.iter().map(|f| proto::convert_stored(f, received_at).map_err(corrupt)).collect()
}

/// A frame stored as contract JSON by [`super::encode_json`] (`received_at` included).
pub fn frame_from_json(text: &[u8]) -> Result<Frame> {
    json::stored(text).map_err(corrupt)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::codec::tests::{full_diag_frame, full_loc_frame};
    use crate::codec::{encode_json, encode_protobuf};

    #[test]
    fn stored_protobuf_frames_read_back_exactly() {
        let frames = vec![full_loc_frame(), full_diag_frame()];
        let received_at = frames[0].received_at;
        let mut expected = frames.clone();
        for f in &mut expected {
            f.received_at = received_at;
        }
        assert_eq!(frames_from_protobuf(&encode_protobuf(&frames), received_at).unwrap(), expected);
    }

    #[test]
    fn stored_json_frames_read_back_exactly_with_their_received_at() {
        for frame in [full_loc_frame(), full_diag_frame()] {
            let mut text = Vec::new();
            encode_json(&frame, &mut text);
            assert_eq!(frame_from_json(&text).unwrap(), frame);
        }
    }

    #[test]
    fn a_stored_frame_far_in_the_future_is_not_refused_by_todays_clock() {
        let mut frame = full_loc_frame();
        frame.ts = crate::time::MAX_TS;
        frame.received_at = 0;
        let mut text = Vec::new();
        encode_json(&frame, &mut text);
        assert_eq!(frame_from_json(&text).unwrap().ts, crate::time::MAX_TS);
        assert_eq!(frames_from_protobuf(&encode_protobuf(&[frame.clone()]), 0).unwrap(), vec![frame]);
    }

    #[test]
    fn bytes_fleetpipe_does_not_write_are_corrupt() {
        assert!(frames_from_protobuf(b"\x0a\x05junk", 0).is_err());
        assert!(matches!(
            frame_from_json(b"{\"vehicle_id\":\"V1\",\"ts\":1}").unwrap_err(),
            Error::CorruptFrame { reason: Reason::MissingField, .. }
        ));
        assert!(frame_from_json(b"not json").is_err());
    }
}

//! The JSON wire format (CONTRACT.md §1): decoding objects, arrays and NDJSON into frames, and
//! encoding a frame back into normalised contract JSON.
//!
//! Decoding deserializes straight into a borrowed wire struct (`Wire`): strings borrow from the
//! payload, `ts` is parsed in its visitor, and nothing is buffered (no `serde(untagged)`, no
//! intermediate `Value`). Values whose *type* is wrong in a way the contract names a reason for
//! (`ts`, `dtcs` items, `signals`) are captured as "invalid" variants instead of serde errors, so
//! that the frame is rejected with that reason rather than a generic `invalid_field`.
//!
//! Splitting keeps one bad frame from rejecting its neighbours: an array is first decoded in one
//! pass into `Vec<Wire>`; only if that fails is it split into raw elements ([`RawValue`]) that
//! are decoded one by one. Objects (one, NDJSON, or several in a row) are read as a stream; if a
//! bad one breaks the stream, NDJSON-shaped input is split on newlines from there on.

mod decode;
mod encode;
mod wire;

pub(crate) use decode::{decode, first_non_ws, stored};
pub use encode::{encode_json, frame_to_value};

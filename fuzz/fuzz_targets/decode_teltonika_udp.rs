// A Teltonika UDP datagram. Checks: no frame goes missing, every accepted frame validates, an
// answer echoes the datagram's packet ids, a datagram refused whole keeps its bytes.
#![no_main]
use bytes::Bytes;
use fleetpipe_processors::codec::teltonika::{datagram, UdpStep};
use fleetpipe_processors::validate::Rules;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let rules = Rules::default();
    let bytes = Bytes::copy_from_slice(data);
    match datagram(&bytes, 1_795_640_400_000_000, &rules, |imei| {
        if imei.len() % 2 == 0 { Err("unknown_imei") } else { Ok("V1".to_owned()) }
    }) {
        UdpStep::Refused { .. } => {}
        UdpStep::Store { decoded, answer, records } => {
            assert_eq!(decoded.frames.len() + decoded.rejections.len(), decoded.received as usize);
            for f in &decoded.frames {
                assert!(fleetpipe_processors::validate::frame(f, &rules).is_ok());
            }
            if let Some(a) = answer {
                assert_eq!(&a[..3], &[0x00, 0x05, data[2]], "the answer echoes the packet id");
                assert_eq!(a[5], data[5], "and the AVL packet id");
            }
            if records == 0 {
                assert_eq!(&decoded.rejections[0].raw[..], data);
            }
        }
    }
});

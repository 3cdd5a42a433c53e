// A Teltonika TCP connection's bytes after the IMEI handshake, read packet after packet as the
// source does (`next_tcp`, advancing by what each step consumed). Checks: every step consumes
// something or asks for more, no frame goes missing (accepted + rejected = received), every
// accepted frame validates, a packet refused whole keeps its bytes.
#![no_main]
use fleetpipe_processors::codec::teltonika::{next_tcp, TcpStep};
use fleetpipe_processors::validate::Rules;
use fleetpipe_processors::{Decoded, Origin};

fn check(d: &Decoded, rules: &Rules) {
    assert_eq!(d.frames.len() + d.rejections.len(), d.received as usize, "a frame went missing");
    for f in &d.frames {
        assert!(fleetpipe_processors::validate::frame(f, rules).is_ok(), "an accepted frame fails validation");
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let rules = Rules::default();
    let origin = Origin::Teltonika { imei: "356307042441013".into() };
    let mut buf = data;
    loop {
        match next_tcp(buf, "356307042441013", &origin, 1_795_640_400_000_000, &rules) {
            TcpStep::Need => return,
            TcpStep::Skip { len } => {
                assert!(len > 0 && len <= buf.len());
                buf = &buf[len..];
            }
            TcpStep::Records { decoded, count, len } => {
                assert!(len > 0 && len <= buf.len());
                assert!(count >= 1 && decoded.received >= count, "each record gives a frame at least");
                check(&decoded, &rules);
                buf = &buf[len..];
            }
            TcpStep::Malformed { decoded, len } => {
                assert!(len > 0 && len <= buf.len());
                assert_eq!(decoded.rejections.len(), 1);
                assert_eq!(&decoded.rejections[0].raw[..], &buf[..len], "the packet's bytes kept");
                buf = &buf[len..];
            }
            TcpStep::Lost { decoded } => {
                assert_eq!(&decoded.rejections[0].raw[..], buf);
                return;
            }
        }
    }
});

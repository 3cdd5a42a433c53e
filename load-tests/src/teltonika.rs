//! `teltonika`: many simulated Teltonika trackers, each its own TCP connection: the IMEI
//! handshake, then Codec 8 Extended packets of `per_packet` records (a fix, ignition, movement,
//! odometer, external voltage, GSM signal), one at a time, each sent once the previous one is
//! answered — as a device does. Reports the acknowledged records per second and the
//! packet → answer latency. The records are encoded before the clock starts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use nom_teltonika::encoder::{encode_avl_frame, AvlRecordFields};
use nom_teltonika::protocol::{AvlCodec, AvlTimestamp, GpsElement, IoId, Priority};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub(crate) struct Trackers {
    pub(crate) server: SocketAddr,
    pub(crate) devices: usize,
    /// Records per device.
    pub(crate) records: u64,
    pub(crate) per_packet: usize,
}

/// Device `i`'s IMEI: 15 digits with a valid Luhn check digit.
pub(crate) fn imei(i: usize) -> String {
    let body = format!("35{:012}", i % 1_000_000_000_000);
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(k, b)| {
            let d = u32::from(b - b'0');
            if k % 2 == 0 {
                let x = d * 2;
                x / 10 + x % 10
            } else {
                d
            }
        })
        .sum();
    format!("{body}{}", (10 - sum % 10) % 10)
}

/// The packets device `i` sends: `records` records from `t0_ms`, one second apart, moving.
fn packets(i: usize, records: u64, per_packet: usize, t0_ms: u64) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut n = 0u64;
    while n < records {
        let k = (per_packet as u64).min(records - n);
        let io_u8 = [(IoId::from(239), 1u8), (IoId::from(240), 1u8), (IoId::from(21), 4u8)];
        let io_u16 = [(IoId::from(66), 13_800u16)];
        let odo: Vec<[(IoId, u32); 1]> =
            (0..k).map(|j| [(IoId::from(16), u32::try_from((n + j) * 14).unwrap_or(u32::MAX))]).collect();
        let fields: Vec<AvlRecordFields<'_>> = (0..k)
            .map(|j| {
                let step = (n + j) as i32;
                let gps = GpsElement {
                    longitude_raw: 102_000_000 + (i as i32 % 1000) * 1000 + step * 10,
                    latitude_raw: 561_000_000 + (i as i32 % 1000) * 1000,
                    altitude_meters: 40,
                    angle_degrees: 90,
                    satellites: 10,
                    speed_kph: 50,
                };
                AvlRecordFields::new(AvlTimestamp::from(t0_ms + (n + j) * 1000), Priority::Low, gps)
                    .with_io_u8(&io_u8)
                    .with_io_u16(&io_u16)
                    .with_io_u32(&odo[j as usize])
            })
            .collect();
        out.push(encode_avl_frame(AvlCodec::Codec8Extended, &fields).context("encoding a packet")?);
        n += k;
    }
    Ok(out)
}

async fn device(
    server: SocketAddr,
    i: usize,
    packets: Vec<Vec<u8>>,
    start: Arc<tokio::sync::Barrier>,
) -> anyhow::Result<(u64, Vec<u32>)> {
    let mut s = TcpStream::connect(server).await.with_context(|| format!("connecting to {server}"))?;
    s.set_nodelay(true)?;
    let id = imei(i);
    let mut login = (id.len() as u16).to_be_bytes().to_vec();
    login.extend_from_slice(id.as_bytes());
    s.write_all(&login).await?;
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await?;
    if answer[0] != 1 {
        bail!("IMEI {id} refused");
    }
    start.wait().await;
    let mut lat = Vec::with_capacity(packets.len());
    let mut acked = 0u64;
    for p in &packets {
        let t = Instant::now();
        s.write_all(p).await?;
        let mut count = [0u8; 4];
        s.read_exact(&mut count).await?;
        lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
        acked += u64::from(u32::from_be_bytes(count));
    }
    Ok((acked, lat))
}

pub(crate) async fn run(t: Trackers) -> anyhow::Result<()> {
    let t0_ms = u64::try_from(crate::now() as i64 * 1000 - 86_400_000).unwrap_or(0);
    let start = Arc::new(tokio::sync::Barrier::new(t.devices + 1));
    let mut tasks = Vec::with_capacity(t.devices);
    for i in 0..t.devices {
        let p = packets(i, t.records, t.per_packet.max(1), t0_ms)?;
        tasks.push(tokio::spawn(device(t.server, i, p, Arc::clone(&start))));
    }
    start.wait().await;
    println!("start {:.6}", crate::now());
    let began = Instant::now();
    let mut acked = 0u64;
    let mut lat = Vec::new();
    for task in tasks {
        let (a, l) = task.await??;
        acked += a;
        lat.extend(l);
    }
    let secs = began.elapsed().as_secs_f64();
    println!("end {:.6}", crate::now());
    lat.sort_unstable();
    let total = t.records * t.devices as u64;
    if acked != total {
        bail!("{acked} of {total} records acknowledged");
    }
    println!(
        "teltonika: {} devices x {} records = {total} in {secs:.3} s ({} per packet): {:.0} records/s acknowledged; answer p50 {:.2} ms p99 {:.2} ms",
        t.devices,
        t.records,
        t.per_packet,
        total as f64 / secs,
        crate::gateway::percentile(&lat, 0.5),
        crate::gateway::percentile(&lat, 0.99),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn imeis_pass_the_luhn_check() {
        assert_eq!(super::imei(0).len(), 15);
        for i in [0, 1, 7, 999_999] {
            let d: Vec<u32> = super::imei(i).bytes().map(|b| u32::from(b - b'0')).collect();
            let sum: u32 = d
                .iter()
                .rev()
                .enumerate()
                .map(|(k, &x)| if k % 2 == 1 { (x * 2) / 10 + (x * 2) % 10 } else { x })
                .sum();
            assert_eq!(sum % 10, 0, "{}", super::imei(i));
        }
    }
}

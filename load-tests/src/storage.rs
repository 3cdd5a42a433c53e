//! Storage measurements: the Postgres sink against `psql \copy` of the same rows into the same
//! table, the cost of one Redis L2 batch, and read latency per tier through the HTTP API.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleetpipe_pipeline::Sink;
use fleetpipe_processors::time::format_ts;
use fleetpipe_processors::Batch;
use fleetpipe_processors::{Body, Frame, Location};
use fleetpipe_sinks::parquet::ParquetConfig;
use fleetpipe_sinks::postgres::{self, PostgresConfig};
use fleetpipe_sinks::redis::{RedisConfig, RedisL2Sink};

/// `rows` location frames over `vehicles` vehicles, one second apart per vehicle, starting at
/// `start_ms` (whole milliseconds, so that the CSV's text timestamps are exact).
pub(crate) fn frames(rows: u64, vehicles: u64, start_ms: i64) -> Vec<Frame> {
    (0..rows)
        .map(|i| {
            let v = i % vehicles.max(1);
            let seq = i / vehicles.max(1) + 1;
            let ts = (start_ms + seq as i64 * 1000) * 1000;
            Frame {
                vehicle_id: format!("LOAD{v:08}"),
                ts,
                seq,
                received_at: ts + 250_000,
                body: Body::Location(Location {
                    lat: 56.0 + v as f64 * 1e-4 + seq as f64 * 1e-6,
                    lon: 10.213695,
                    speed_kmh: Some(33.8),
                    heading_deg: Some(273.0),
                    alt_m: Some(38.5),
                    accuracy_m: Some(3.2),
                    satellites: Some(9),
                    odometer_m: Some(2_077_000.0),
                    ignition: None,
                }),
            }
        })
        .collect()
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// The same rows as CSV for `psql \copy` (an empty field is NULL).
fn write_csv(path: &Path, frames: &[Frame]) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for f in frames {
        let Body::Location(l) = &f.body else { continue };
        writeln!(
            out,
            "{},{},{},{},{:?},{:?},{},{},{},{},{},{},{}",
            f.vehicle_id,
            format_ts(f.ts),
            f.seq,
            format_ts(f.received_at),
            l.lat,
            l.lon,
            opt(l.speed_kmh),
            opt(l.heading_deg),
            opt(l.alt_m),
            opt(l.accuracy_m),
            opt(l.satellites),
            opt(l.odometer_m),
            opt(l.ignition),
        )?;
    }
    out.flush()?;
    Ok(())
}

fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    let out = Command::new("psql")
        .arg(url)
        .arg("-qAtX")
        .arg("-v")
        .arg("ON_ERROR_STOP=1")
        .arg("-c")
        .arg(sql)
        .output()?;
    if !out.status.success() {
        bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Rounds of: empty table, `psql \copy` of the rows (timed); empty table, the sink writing the
/// same rows in batches (timed); then, once, the sink writing them all again (every batch meets
/// duplicates: the staging + `ON CONFLICT` path).
pub(crate) fn pg_sink(
    url: &str,
    schema: &str,
    rows: u64,
    vehicles: u64,
    batch: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    // Today (UTC), from midnight: the partitions the sink keeps ready.
    let start_ms = now_ms - now_ms % 86_400_000;
    let frames = frames(rows, vehicles, start_ms);
    let dir = tempfile::tempdir()?;
    let csv = dir.path().join("rows.csv");
    write_csv(&csv, &frames)?;

    let mut cfg = PostgresConfig::new(url);
    cfg.schema = schema.to_owned();
    let mut sink = postgres::open(&cfg).context("opening the postgres sink")?;
    let mut lsn = 1u64;
    // Connects, migrates, creates the day partitions: outside the timed part.
    sink.write(&Batch { lsn, ..Batch::default() })?;
    let table = format!("{schema}.locations");
    let columns = "vehicle_id, ts, seq, received_at, lat, lon, speed_kmh, heading_deg, alt_m, accuracy_m, \
                   satellites, odometer_m, ignition";
    let chunks: Vec<Vec<Frame>> = frames.chunks(batch.max(1)).map(<[Frame]>::to_vec).collect();
    let (mut copy_rates, mut sink_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        psql(url, &format!("TRUNCATE {table}"))?;
        let started = Instant::now();
        psql(url, &format!("\\copy {table} ({columns}) FROM '{}' WITH (FORMAT csv)", csv.display()))?;
        let copy_rate = rows as f64 / started.elapsed().as_secs_f64();

        psql(url, &format!("TRUNCATE {table}"))?;
        let started = Instant::now();
        for c in &chunks {
            lsn += 1;
            sink.write(&Batch { lsn, frames: c.clone(), ..Batch::default() })?;
        }
        let sink_rate = rows as f64 / started.elapsed().as_secs_f64();
        let stored: u64 = psql(url, &format!("SELECT count(*) FROM {table}"))?.parse()?;
        if stored != rows {
            bail!("round {round}: the sink stored {stored} rows of {rows}");
        }
        println!(
            "round {round}: psql \\copy {copy_rate:.0} rows/s, postgres sink {sink_rate:.0} rows/s, ratio {:.2}",
            sink_rate / copy_rate
        );
        ratios.push(sink_rate / copy_rate);
        copy_rates.push(copy_rate);
        sink_rates.push(sink_rate);
    }
    let started = Instant::now();
    for c in &chunks {
        lsn += 1;
        sink.write(&Batch { lsn, frames: c.clone(), ..Batch::default() })?;
    }
    let redo_rate = rows as f64 / started.elapsed().as_secs_f64();
    let stored: u64 = psql(url, &format!("SELECT count(*) FROM {table}"))?.parse()?;
    if stored != rows {
        bail!("a redelivery changed the row count to {stored}");
    }
    let (copy, sink_rate) = (median(copy_rates), median(sink_rates));
    println!(
        "postgres: {rows} rows, {vehicles} vehicles, batches of {batch}; median psql \\copy {copy:.0} rows/s, \
         sink {sink_rate:.0} rows/s; median ratio of the rounds {:.2}; full redelivery (all duplicates) \
         {redo_rate:.0} rows/s, rows still {stored}",
        median(ratios)
    );
    Ok(())
}

/// `batches` batches of one frame for each of `vehicles` vehicles through the L2 sink: time
/// per batch.
pub(crate) fn redis_l2(url: &str, prefix: &str, vehicles: u64, batches: u64) -> anyhow::Result<()> {
    let mut cfg = RedisConfig::new(url);
    cfg.prefix = prefix.to_owned();
    let mut sink = RedisL2Sink::open(cfg)?;
    let mut times = Vec::with_capacity(batches as usize);
    let start_ms = 1_795_640_400_000;
    for b in 0..batches {
        let mut frames = frames(vehicles, vehicles, start_ms + b as i64 * 1000);
        for f in &mut frames {
            f.seq = b + 1;
        }
        let started = Instant::now();
        sink.write(&Batch { lsn: b + 1, frames, ..Batch::default() })?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let stats = sink.stats();
    if stats.errors > 0 {
        bail!("redis L2 reported {} errors", stats.errors);
    }
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times.get(((times.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0.0);
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    println!(
        "redis l2: {batches} batches of {vehicles} frames ({vehicles} vehicles): per batch mean {mean:.2} ms, \
         p50 {:.2} ms, p99 {:.2} ms ({:.0} frames/s)",
        pct(0.5),
        pct(0.99),
        vehicles as f64 / (mean / 1e3)
    );
    let client = redis::Client::open(url)?;
    let mut con = client.get_connection()?;
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query(&mut con)?;
    for chunk in keys.chunks(1000) {
        redis::cmd("DEL").arg(chunk).query::<()>(&mut con)?;
    }
    Ok(())
}

/// Posts one location for each of `vehicles` vehicles (NDJSON, 1,000 per request).
pub(crate) async fn ingest(url: &str, vehicles: u64) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let all = frames(vehicles, vehicles, 1_795_640_400_000);
    for chunk in all.chunks(1000) {
        let mut body = String::new();
        for f in chunk {
            let Body::Location(l) = &f.body else { continue };
            body.push_str(&format!(
                r#"{{"vehicle_id":"{}","ts":{},"seq":{},"kind":"location","lat":{:?},"lon":{:?},"speed_kmh":33.8}}"#,
                f.vehicle_id,
                f.ts / 1000,
                f.seq,
                l.lat,
                l.lon
            ));
            body.push('\n');
        }
        let r = client
            .post(format!("{url}/v1/frames"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("ingest answered {}", r.status());
        }
    }
    Ok(())
}

/// GETs every vehicle once, one request at a time, and prints latency by `served_from`.
pub(crate) async fn read_latency(url: &str, vehicles: u64, label: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let mut by_tier: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for v in 0..vehicles {
        let started = Instant::now();
        let r = client.get(format!("{url}/v1/vehicles/LOAD{v:08}")).send().await?;
        let status = r.status();
        let text = r.text().await?;
        let us = started.elapsed().as_secs_f64() * 1e6;
        if !status.is_success() {
            bail!("LOAD{v:08}: {status} {text}");
        }
        let doc: serde_json::Value = serde_json::from_str(&text)?;
        let tier = doc["served_from"].as_str().unwrap_or("?").to_string();
        by_tier.entry(tier).or_default().push(us);
    }
    for (tier, mut t) in by_tier {
        t.sort_by(f64::total_cmp);
        let pct = |p: f64| t.get(((t.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0.0);
        println!(
            "read {label}: served_from={tier} n={} p50 {:.0} us p99 {:.0} us",
            t.len(),
            pct(0.5),
            pct(0.99)
        );
    }
    Ok(())
}

/// Location frames as one Arrow batch of the `locations` schema, built column by column.
fn location_batch(frames: &[Frame]) -> anyhow::Result<arrow::record_batch::RecordBatch> {
    use arrow::array::{
        ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray,
    };
    use std::sync::Arc;
    let locs: Vec<(&Frame, &Location)> = frames
        .iter()
        .filter_map(|f| match &f.body {
            Body::Location(l) => Some((f, l)),
            Body::Diagnostic(_) => None,
        })
        .collect();
    let ts = |v: Vec<i64>| -> ArrayRef { Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC")) };
    let f64s = |get: &dyn Fn(&Location) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from(locs.iter().map(|(_, l)| get(l)).collect::<Vec<_>>()))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(locs.iter().map(|(f, _)| f.vehicle_id.as_str()))),
        ts(locs.iter().map(|(f, _)| f.ts).collect()),
        Arc::new(Int64Array::from_iter_values(locs.iter().map(|(f, _)| f.seq as i64))),
        ts(locs.iter().map(|(f, _)| f.received_at).collect()),
        Arc::new(Float64Array::from_iter_values(locs.iter().map(|(_, l)| l.lat))),
        Arc::new(Float64Array::from_iter_values(locs.iter().map(|(_, l)| l.lon))),
        f64s(&|l| l.speed_kmh),
        f64s(&|l| l.heading_deg),
        f64s(&|l| l.alt_m),
        f64s(&|l| l.accuracy_m),
        Arc::new(Int64Array::from(locs.iter().map(|(_, l)| l.satellites.map(i64::from)).collect::<Vec<_>>())),
        f64s(&|l| l.odometer_m),
        Arc::new(BooleanArray::from(locs.iter().map(|(_, l)| l.ignition).collect::<Vec<_>>())),
    ];
    Ok(arrow::record_batch::RecordBatch::try_new(fleetpipe_sinks::parquet::location_schema(), columns)?)
}

/// Bytes of every `.parquet` file under `dir`.
fn parquet_bytes(dir: &std::path::Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            total += parquet_bytes(&e.path())?;
        } else if e.path().extension().is_some_and(|x| x == "parquet") {
            total += e.metadata()?.len();
        }
    }
    Ok(total)
}

/// The Parquet sink against the parquet crate alone writing the same rows (same schema, ZSTD 3,
/// 128 Ki-row row groups, the crate's other defaults, batches of 8,192 frames, one file,
/// fsync'd), in rounds; and the bytes per row of each.
pub(crate) fn parquet_bench(rows: u64, rounds: usize) -> anyhow::Result<()> {
    use parquet::arrow::ArrowWriter;
    use parquet::basic::{Compression, ZstdLevel};
    use parquet::file::properties::WriterProperties;
    // Within one hour, so that the sink writes one file too.
    let start_ms = 1_795_640_400_000; // 2026-11-25T21:00:00Z, on the hour
    let all = frames(rows, 1000, start_ms);
    let chunks: Vec<&[Frame]> = all.chunks(8192).collect();
    let batches: Vec<Batch> = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| Batch { lsn: i as u64 + 1, frames: c.to_vec(), ..Batch::default() })
        .collect();
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let dir = tempfile::tempdir()?;
        let started = Instant::now();
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
            .set_max_row_group_row_count(Some(128 * 1024))
            .build();
        let path = dir.path().join("limit.parquet");
        let mut writer = ArrowWriter::try_new(
            std::fs::File::create(&path)?,
            fleetpipe_sinks::parquet::location_schema(),
            Some(props),
        )?;
        for c in &chunks {
            writer.write(&location_batch(c)?)?;
        }
        writer.into_inner()?.sync_all()?;
        let limit = rows as f64 / started.elapsed().as_secs_f64();

        let mut sink = fleetpipe_sinks::parquet::open(&ParquetConfig::default(), &dir.path().join("sink"))?;
        let started = Instant::now();
        for b in &batches {
            sink.write(b)?;
        }
        sink.flush()?;
        let ours = rows as f64 / started.elapsed().as_secs_f64();
        if sink.durable_lsn() != batches.len() as u64 {
            bail!("the sink did not commit every batch");
        }
        let (limit_bytes, sink_bytes) =
            (std::fs::metadata(&path)?.len(), parquet_bytes(&dir.path().join("sink"))?);
        println!(
            "round {round}: parquet crate alone {limit:.0} rows/s, parquet sink {ours:.0} rows/s, ratio {:.2}; bytes per row {:.1} alone, {:.1} sink",
            ours / limit,
            limit_bytes as f64 / rows as f64,
            sink_bytes as f64 / rows as f64
        );
        ratios.push(ours / limit);
    }
    println!("parquet: {rows} rows, median ratio of the rounds {:.2}", median(ratios));
    Ok(())
}

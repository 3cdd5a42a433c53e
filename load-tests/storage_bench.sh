#!/usr/bin/env bash
# Storage measurements, in one run on one machine:
#   1. the Postgres sink against `psql \copy` of the same rows into the same table (same
#      partitions, same unique index), in rounds, plus a full redelivery (every row a duplicate);
#   2. the Redis L2 sink: time per batch of 1,000 frames of 1,000 vehicles;
#   3. GET /v1/vehicles/{id} latency p50/p99 per tier: fleetpipe with Postgres and Redis takes
#      one location for each of V vehicles; a new instance with an empty L1 then reads each
#      vehicle twice (L2, then L1); after Redis is emptied, another reads them from Postgres.
#
#   load-tests/storage_bench.sh [ROWS] [VEHICLES_FOR_READS]   (defaults 200000, 5000)
#
# Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust) and Redis on 127.0.0.1:6379, as
# scripts/test.sh starts them. Uses a schema and a Redis key prefix of its own, removed after.
set -euo pipefail
cd "$(dirname "$0")/.."
source load-tests/lib.sh
ROWS="${1:-200000}"
READS="${2:-5000}"
PG="${FLEETPIPE_BENCH_PG:-postgres://postgres@127.0.0.1:5432/postgres}"
REDIS="${FLEETPIPE_BENCH_REDIS:-redis://127.0.0.1:6379}"
build_release
SCHEMA="fp_bench_$$"
PREFIX="fpbench:$$:"
WORK="$(mktemp -d)"
PID=""
stop_fleetpipe() { if [ -n "$PID" ]; then kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=""; fi; }
cleanup() {
  stop_fleetpipe
  psql "$PG" -qAtX -c "SET client_min_messages = warning; DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true
  redis-cli -u "$REDIS" --scan --pattern "${PREFIX}*" | xargs -r -n 500 redis-cli -u "$REDIS" DEL >/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== postgres sink vs psql \\copy ($ROWS rows)"
# Batches of 1,000 frames, as the sink gets them from busy MQTT traffic; of 8,192, as it gets
# them while catching up from the log. Each batch is one transaction (one commit, one fsync).
for batch in 1000 8192; do
  "$BIN/fleetpipe-load" pg-sink --url "$PG" --schema "${SCHEMA}_copy" --rows "$ROWS" --batch "$batch" --rounds 3
  psql "$PG" -qAtX -c "SET client_min_messages = warning; DROP SCHEMA IF EXISTS ${SCHEMA}_copy CASCADE" >/dev/null
done

echo "== redis l2"
"$BIN/fleetpipe-load" redis-l2 --url "$REDIS" --prefix "${PREFIX}l2:" --vehicles 1000 --batches 300

echo "== read latency ($READS vehicles)"
HTTP_PORT="$(free_port)"
URL="http://127.0.0.1:$HTTP_PORT"
# Starts fleetpipe on a fresh data directory (an empty write-ahead log, hence an empty L1).
start_fleetpipe() {
  local dir="$WORK/data.$1"
  mkdir -p "$dir"
  cat > "$WORK/fleetpipe.toml" <<CONF
data_dir = "$dir"
[http]
addr = "127.0.0.1:$HTTP_PORT"
[gateway]
listen = "127.0.0.1:$(free_port)"
[postgres]
url = "$PG"
schema = "$SCHEMA"
[redis]
url = "$REDIS"
prefix = "$PREFIX"
CONF
  "$FLEETPIPE" run --config "$WORK/fleetpipe.toml" > "$WORK/fleetpipe.$1.log" 2>&1 & PID=$!
  wait_ready "$URL" && return 0
  echo "fleetpipe did not become ready" >&2; cat "$WORK/fleetpipe.$1.log" >&2; return 1
}
start_fleetpipe 1
"$BIN/fleetpipe-load" ingest --url "$URL" --vehicles "$READS"
for _ in $(seq 1 1500); do
  n=$(psql "$PG" -qAtX -c "SELECT count(*) FROM $SCHEMA.locations" 2>/dev/null || echo 0)
  [ "$n" -ge "$READS" ] && break
  sleep 0.02
done
stop_fleetpipe
start_fleetpipe 2
"$BIN/fleetpipe-load" read-latency --url "$URL" --vehicles "$READS" --label "first (empty L1)"
"$BIN/fleetpipe-load" read-latency --url "$URL" --vehicles "$READS" --label "again"
stop_fleetpipe
redis-cli -u "$REDIS" --scan --pattern "${PREFIX}*" | xargs -r -n 500 redis-cli -u "$REDIS" DEL >/dev/null
start_fleetpipe 3
"$BIN/fleetpipe-load" read-latency --url "$URL" --vehicles "$READS" --label "after redis flush"
stop_fleetpipe

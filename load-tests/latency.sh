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
source load-tests/lib.sh
RATE="${1:-45000}"
VEHICLES="${2:-1000}"
SECS="${3:-20}"
build_release
setup_work
ON_LOAD=(); ON_FP=()
if [ "${PIN:-0}" = 1 ]; then ON_LOAD=(taskset -c 0); ON_FP=(taskset -c 1); fi
start_mosquitto "${ON_LOAD[@]}"
HTTP_PORT="$(free_port)"
FLEETPIPE_MQTT_URL="mqtt://127.0.0.1:$MQTT_PORT" FLEETPIPE_MQTT_CLIENT_ID="fleetpipe-latency-$$" \
  FLEETPIPE_HTTP_ADDR="127.0.0.1:$HTTP_PORT" FLEETPIPE_DATA_DIR="$WORK/data" RUST_LOG=warn \
  "${ON_FP[@]}" "$FLEETPIPE" run > "$WORK/fleetpipe.log" 2>&1 & fp=$!
PIDS+=($fp)
wait_ready "http://127.0.0.1:$HTTP_PORT" || true
"${ON_LOAD[@]}" "$BIN/fleetpipe-load" latency --port "$MQTT_PORT" --http "http://127.0.0.1:$HTTP_PORT" \
  --rate "$RATE" --vehicles "$VEHICLES" --duration "$SECS" --publishers "${PUBLISHERS:-1}"
# What fleetpipe made durable while the load ran, against what was offered: past saturation the
# rest waits in the broker (acks withheld), it is not dropped.
durable=$(curl -sf "http://127.0.0.1:$HTTP_PORT/metrics" | awk '$1=="fleetpipe_frames_written_total{sink=\"wal\"}" {print $2}')
echo "fleetpipe: ${durable:-0} frames durable in ${SECS} s ($(( ${durable:-0} / SECS ))/s)"
echo "fleetpipe peak RSS: $(( $(awk '/VmHWM/{print $2}' "/proc/$fp/status") / 1024 )) MiB"

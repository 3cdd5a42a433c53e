#!/usr/bin/env bash
# Reproduces the gateway's known stall (README, "Vehicles and credentials": a held connection): `fleetpipe replay` of the
# recorded drive against the gateway, RUNS times, one mosquitto_pub -l burst before each; a run
# that takes the 120 s acknowledgement deadline instead of under a second is a stall.
#   load-tests/gateway_stall_repro.sh [RUNS]   (default 12; LOG=ntex_mqtt=trace for the trace)
set -euo pipefail
cd "$(dirname "$0")/.."
source load-tests/lib.sh
RUNS="${1:-12}"
build_release
setup_work
GW="$(free_port)"; HTTP="$(free_port)"
DRIVE=tests/data/css-drive-aarhus-2021-07-26-am.ndjson
FLEETPIPE_DATA_DIR="$WORK/data" FLEETPIPE_GATEWAY_LISTEN="127.0.0.1:$GW" FLEETPIPE_HTTP_ADDR="127.0.0.1:$HTTP" \
  RUST_LOG="${LOG:-warn}" "$FLEETPIPE" run 2> "$WORK/fleetpipe.log" & PIDS+=("$!")
wait_ready "http://127.0.0.1:$HTTP"
for i in $(seq 1 "$RUNS"); do
  start=$(date +%s.%N)
  mosquitto_pub -p "$GW" -q 1 -t "vehicles/X$i/location" -l < "$DRIVE" 2>/dev/null || true
  "$FLEETPIPE" replay "$DRIVE" --target "mqtt://127.0.0.1:$GW" > "$WORK/replay.out" 2> "$WORK/replay.err" || true
  end=$(date +%s.%N)
  printf 'run %2d  %7.2f s  %s\n' "$i" "$(echo "$end - $start" | bc)" "$(tail -1 "$WORK/replay.out" "$WORK/replay.err" | grep -v '^==' | tr '\n' ' ')"
done
[ -n "${LOG:-}" ] && cp "$WORK/fleetpipe.log" ./gateway_stall_trace.log && echo "trace in ./gateway_stall_trace.log"

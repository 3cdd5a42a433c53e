#!/usr/bin/env bash
# Steady-load soak: `fleetpipe simulate` publishing VEHICLES vehicles at HZ over MQTT QoS 1 for
# SECONDS through our own Mosquitto (unlimited queues, no persistence) into fleetpipe, whose
# resident memory is sampled every 10 s. Flat RSS = the second half's samples stay within a few
# percent of each other. EMBEDDED=1 uses fleetpipe's embedded broker instead, whose per-topic
# buffer (mqtt.embedded_topic_buffer_kib) then counts in fleetpipe's RSS.
#   load-tests/soak.sh [SECONDS] [VEHICLES] [HZ]       (defaults 300, 1000, 10)
set -euo pipefail
cd "$(dirname "$0")/.."
source load-tests/lib.sh
SECONDS_TOTAL="${1:-300}"; VEHICLES="${2:-1000}"; HZ="${3:-10}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fleetpipe/target}"
cargo build --release -q -p fleetpipe
BIN="$CARGO_TARGET_DIR/release/fleetpipe"
setup_work
MQTT="$(free_port)"; HTTP="$(free_port)"
export FLEETPIPE_DATA_DIR="$WORK/data" FLEETPIPE_HTTP_ADDR="127.0.0.1:$HTTP" FLEETPIPE_MQTT_CLIENT_ID="fleetpipe-soak-$$"
if [ "${EMBEDDED:-0}" = 1 ]; then
  export FLEETPIPE_MQTT_LISTEN="127.0.0.1:$MQTT"
else
  printf 'listener %s 127.0.0.1\nuser root\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 0\nlog_dest none\n' "$MQTT" > "$WORK/mosquitto.conf"
  "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$WORK/mosquitto.conf" & PIDS+=($!)
  sleep 0.5
  export FLEETPIPE_MQTT_URL="mqtt://127.0.0.1:$MQTT"
fi
RUST_LOG=warn "$BIN" run & FP=$!; PIDS+=($FP)
wait_ready "http://127.0.0.1:$HTTP" || true
env -u FLEETPIPE_MQTT_URL "$BIN" simulate --vehicles "$VEHICLES" --hz "$HZ" --duration "$SECONDS_TOTAL" --target "mqtt://127.0.0.1:$MQTT" > "$WORK/sim.out" 2>/dev/null & SIM=$!
echo "soak: $VEHICLES vehicles x $HZ Hz for $SECONDS_TOTAL s, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
printf '%8s %10s %14s\n' t_s rss_mib frames_durable
samples=()
for t in $(seq 10 10 "$SECONDS_TOTAL"); do
  sleep 10
  rss=$(awk '/VmRSS/{printf "%.1f", $2/1024}' "/proc/$FP/status")
  n=$(curl -sf "http://127.0.0.1:$HTTP/metrics" | awk '/^fleetpipe_frames_written_total\{sink="wal"\}/{print $2}')
  printf '%8s %10s %14s\n' "$t" "$rss" "${n:-0}"
  samples+=("$rss")
done
wait $SIM || true
cat "$WORK/sim.out"
python3 - "${samples[@]}" <<'PY'
import sys
s = [float(x) for x in sys.argv[1:]]
half = s[len(s)//2:]
print(f"rss second half: min {min(half):.1f} MiB, max {max(half):.1f} MiB, spread {100*(max(half)-min(half))/max(half):.1f} %")
PY

#!/usr/bin/env bash
# Past saturation: an offered load fleetpipe cannot keep up with, on purpose. fleetpipe subscribes
# once (persistent MQTT session) and stops; FRAMES QoS 1 frames are published into its queue at
# the broker; then fleetpipe starts again and faces all of them at once, delivered as fast as
# Mosquitto can. What should hold: every frame made durable exactly once, at a steady rate, with
# fleetpipe's memory bounded by its in-flight window and queues (the backlog waits in the broker,
# unacknowledged), not by the backlog's size. Two backlog sizes show whether memory follows it.
#
#   load-tests/backlog.sh [FRAMES] [VEHICLES]   (defaults 2000000, 1000; also runs FRAMES / 4)
#   FLEETPIPE_TOML=$'[parquet]\nenabled = false' load-tests/backlog.sh    extra config lines
set -euo pipefail
cd "$(dirname "$0")/.."
source load-tests/lib.sh
FRAMES="${1:-2000000}"
VEHICLES="${2:-1000}"
build_release
setup_work
start_mosquitto

# Prints "seconds peak_rss_mib" for a backlog of $1 frames.
run() {
  local n=$1 tag=$2 http; http="$(free_port)"
  cat > "$WORK/fp.$tag.toml" <<CONF
data_dir = "$WORK/data.$tag"
[http]
addr = "127.0.0.1:$http"
[mqtt]
url = "mqtt://127.0.0.1:$MQTT_PORT"
client_id = "fleetpipe-backlog-$tag-$$"
qos = 1
${FLEETPIPE_TOML:-}
CONF
  start_fp() {
    RUST_LOG=warn "$FLEETPIPE" run --config "$WORK/fp.$tag.toml" >> "$WORK/fp.$tag.log" 2>&1 & fp=$!
    PIDS+=($fp)
    wait_ready "http://127.0.0.1:$http" || true
  }
  # Subscribe once (the broker keeps the session and queues for it), then go away.
  start_fp; kill -TERM "$fp"; wait "$fp" || true
  "$BIN/fleetpipe-load" publish --port "$MQTT_PORT" --frames "$n" --vehicles "$VEHICLES" --qos 1 > /dev/null
  local started; started=$(python3 -c 'import time; print(time.time())')
  start_fp
  local done_at; done_at=$("$BIN/fleetpipe-load" wait-metric --timeout 600 --url "http://127.0.0.1:$http/metrics" \
    --name 'fleetpipe_frames_written_total{sink="wal"}' --value "$n" | awk '/^end/{print $2}')
  local written; written=$(curl -sf "http://127.0.0.1:$http/metrics" | awk '$1=="fleetpipe_frames_written_total{sink=\"wal\"}" {print $2}')
  local rss; rss=$(awk '/VmHWM/{printf "%.0f", $2/1024}' "/proc/$fp/status")
  kill -TERM "$fp"; wait "$fp" || true
  python3 -c "print(f'{$done_at - $started:.2f} $rss $written')"
}

printf '\nfleetpipe draining a backlog queued at the broker, %s vehicles, %s, %s cores\n' "$VEHICLES" "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc)"
printf '%12s %10s %14s %16s %14s\n' 'backlog' 'seconds' 'frames/s' 'durable frames' 'peak RSS MiB'
for n in $(( FRAMES / 4 )) "$FRAMES"; do
  read -r secs rss written < <(run "$n" "$n")
  python3 -c "print(f'{$n:>12} {$secs:>10} {$n / $secs:>14.0f} {int(float(\"$written\")):>16} {$rss:>14}')"
done
echo "broker peak RSS (the backlog waits there): $(( $(awk '/VmHWM/{print $2}' "/proc/$MOSQ_PID/status") / 1024 )) MiB"

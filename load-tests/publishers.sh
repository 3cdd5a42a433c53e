#!/usr/bin/env bash
# Many publishers, as a new user would set it up: N separate `mosquitto_pub` processes, one per
# vehicle topic (`mosquitto_pub -l`, one frame per line), into our own Mosquitto, in one run:
#   limit     = a bare `mosquitto_sub` of `vehicles/+/location` (stdout to /dev/null)
#   fleetpipe = `fleetpipe run` subscribed to the same broker (every sink of the default
#               configuration: log, Parquet, dead-letter, L1), frames durable (acknowledged)
#               and rows in Parquet, counted from its /metrics
# and, for each, the CPU it spent (user + system, from its rusage or /proc/PID/stat) per
# million frames, plus the broker's.
#
#   load-tests/publishers.sh [PUBLISHERS] [FRAMES_PER_PUBLISHER] [ROUNDS] [QOS...]
#   (defaults 20 15000 3 "0 1": 300,000 frames per run)
#
# mosquitto_pub's defaults otherwise (MQTT 3.1.1; at QoS 1 its window of 20 in flight).
# PERF_DIR=dir records fleetpipe's CPU (perf, cpu-clock samples; PERF_CALLS=1 with call
# graphs) into dir/perf.ROUND.QOS.data; its figures are then not the ones to report.
# Broker settings as in mqtt_ratio.sh (no persistence, unlimited queues and in-flight windows).
set -euo pipefail
cd "$(dirname "$0")/.."
source load-tests/lib.sh
PUBS="${1:-20}"
PER="${2:-15000}"
ROUNDS="${3:-3}"
shift $(( $# < 3 ? $# : 3 ))
QOSES="${*:-0 1}"
TOTAL=$((PUBS * PER))
build_release
setup_work
MOSQ_LOG="$WORK/mosquitto.log" start_mosquitto
for v in $(seq 0 $((PUBS - 1))); do
  "$BIN/fleetpipe-load" lines --vehicle "$v" --vehicles "$PUBS" --frames "$PER" > "$WORK/v$v.ndjson"
done
MOSQ_PUB="$(command -v mosquitto_pub)"

# Starts the publishers (one process per vehicle); sets START (epoch seconds) and PUB_PIDS.
publishers() {
  local qos=$1
  PUB_PIDS=()
  START=$(date +%s.%N)
  for v in $(seq 0 $((PUBS - 1))); do
    "$MOSQ_PUB" -h 127.0.0.1 -p "$MQTT_PORT" -q "$qos" -i "pub-$$-$v" \
      -t "vehicles/$(printf 'LOAD%08d' "$v")/location" -l < "$WORK/v$v.ndjson" &
    PUB_PIDS+=($!)
  done
}

# CPU seconds (user + system) of a running process so far.
cpu_sum() { cpu_of "$1" | awk '{printf "%.3f", $1 + $2}'; }

# Prints "seconds user system broker_cpu" of a bare-subscriber run.
bare() {
  local qos=$1 id="bare-$$-$RANDOM"
  cpu_run "$WORK/bare.cpu" "$(command -v mosquitto_sub)" -h 127.0.0.1 -p "$MQTT_PORT" -q "$qos" -i "$id" \
    -t 'vehicles/+/location' -C "$TOTAL" > /dev/null & local sub=$!
  for _ in $(seq 1 500); do grep -q "$id" "$WORK/mosquitto.log" 2>/dev/null && break; sleep 0.01; done
  local b0; b0=$(cpu_sum "$MOSQ_PID")
  publishers "$qos"; local start=$START
  wait "$sub"; wait "${PUB_PIDS[@]}"
  local b1; b1=$(cpu_sum "$MOSQ_PID")
  read -r _ end _ user _ sys _ < "$WORK/bare.cpu"
  echo "$(python3 -c "print(f'{$end - $start:.3f}')") $user $sys $(python3 -c "print(f'{$b1 - $b0:.3f}')")"
}

# Prints "durable_seconds parquet_seconds cpu_durable cpu_parquet broker_cpu peak_rss_mib
# user system" (user and system: at Parquet).
fleet() {
  local qos=$1 round=$2 http; http="$(free_port)"
  local data="$WORK/data.$round.$qos"
  cat > "$WORK/fleetpipe.toml" <<CONF
data_dir = "$data"
[http]
addr = "127.0.0.1:$http"
[mqtt]
url = "mqtt://127.0.0.1:$MQTT_PORT"
client_id = "fleetpipe-pubs-$round-$qos-$$"
qos = $qos
[parquet]
roll_secs = 1.0
CONF
  RUST_LOG=warn "$FLEETPIPE" run --config "$WORK/fleetpipe.toml" & local fp=$!
  PIDS+=($fp)
  wait_ready "http://127.0.0.1:$http" || true
  local c0 b0 u0 s0; c0=$(cpu_sum "$fp"); b0=$(cpu_sum "$MOSQ_PID"); read -r u0 s0 < <(cpu_of "$fp")
  local perf=""
  if [ -n "${PERF_DIR:-}" ]; then
    mkdir -p "$PERF_DIR"
    perf record -q -e cpu-clock -F 1999 ${PERF_CALLS:+--call-graph dwarf,16384} -p "$fp" -o "$PERF_DIR/perf.$round.$qos.data" 2>/dev/null & perf=$!
    sleep 0.3  # perf attaching; the publishers have not started, nothing is timed yet
  fi
  publishers "$qos"; local start=$START
  local wait=("$BIN/fleetpipe-load" wait-metric --timeout 300 --interval-ms 10 --url "http://127.0.0.1:$http/metrics")
  local durable; durable=$("${wait[@]}" --name 'fleetpipe_frames_written_total{sink="wal"}' --value "$TOTAL" | awk '/^end/{print $2}')
  local c1; c1=$(cpu_sum "$fp")
  local parquet; parquet=$("${wait[@]}" --name 'fleetpipe_frames_written_total{sink="parquet"}' --value "$TOTAL" | awk '/^end/{print $2}')
  local c2 b1 u1 s1; c2=$(cpu_sum "$fp"); b1=$(cpu_sum "$MOSQ_PID"); read -r u1 s1 < <(cpu_of "$fp")
  [ -z "$perf" ] || { kill -INT "$perf"; wait "$perf" || true; }
  wait "${PUB_PIDS[@]}"
  local rss; rss=$(awk '/VmHWM/{printf "%.0f", $2/1024}' "/proc/$fp/status")
  kill -TERM "$fp"; wait "$fp" || true
  python3 -c "print(f'{$durable - $start:.3f} {$parquet - $start:.3f} {$c1 - $c0:.3f} {$c2 - $c0:.3f} {$b1 - $b0:.3f} $rss {$u1 - $u0:.3f} {$s1 - $s0:.3f}')"
}

printf '\nfleetpipe with many publishers: %s mosquitto_pub processes x %s frames (%s per run), %s rounds, %s, %s cores\n' \
  "$PUBS" "$PER" "$TOTAL" "$ROUNDS" "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc)"
echo "cpu = user + system CPU seconds per million frames (fleetpipe: to durable / to Parquet); broker = Mosquitto's"
printf '%-6s %-4s %12s %14s %14s %7s %7s %10s %10s %10s %8s %12s %12s %8s\n' round qos 'bare /s' 'durable /s' 'parquet /s' ratio ratio_pq \
  'cpu bare' 'cpu dur' 'cpu pq' cpu_ratio 'broker bare' 'broker fp' 'rss MiB'
: > "$WORK/rows"; : > "$WORK/cpu"
for round in $(seq 1 "$ROUNDS"); do
  for qos in $QOSES; do
    read -r bs bu bsys bb < <(bare "$qos")
    bc=$(python3 -c "print(f'{$bu + $bsys:.3f}')")
    read -r d p cd cp fb rss fu fs < <(fleet "$qos" "$round")
    echo "$round $qos $bs $bc $bb $d $p $cd $cp $fb $rss" >> "$WORK/rows"
    echo "qos$qos $bu $bsys $fu $fs" >> "$WORK/cpu"
    python3 - "$TOTAL" $round $qos $bs $bc $bb $d $p $cd $cp $fb $rss <<'PY'
import sys
n = int(sys.argv[1]); r, q = sys.argv[2], sys.argv[3]
bs, bc, bb, d, p, cd, cp, fb = map(float, sys.argv[4:12]); rss = sys.argv[12]
m = 1e6 / n
print(f"{r:<6} {q:<4} {n/bs:12.0f} {n/d:14.0f} {n/p:14.0f} {bs/d:7.2f} {bs/p:7.2f} {bc*m:10.2f} {cd*m:10.2f} {cp*m:10.2f} {cp/bc:8.2f} {bb*m:12.2f} {fb*m:12.2f} {rss:>8}")
PY
  done
done
python3 - "$WORK/rows" "$TOTAL" <<'PY'
import sys, statistics as st
n = int(sys.argv[2]); m = 1e6 / n
rows = [l.split() for l in open(sys.argv[1])]
for q in sorted({r[1] for r in rows}):
    rs = [[float(x) for x in r[2:]] for r in rows if r[1] == q]
    col = lambda i: [r[i] for r in rs]
    med = st.median
    print(f"{'median':<6} {q:<4} {med([n/x for x in col(0)]):12.0f} {med([n/x for x in col(3)]):14.0f} {med([n/x for x in col(4)]):14.0f} "
          f"{med([r[0]/r[3] for r in rs]):7.2f} {med([r[0]/r[4] for r in rs]):7.2f} {med(col(1))*m:10.2f} {med(col(5))*m:10.2f} "
          f"{med(col(6))*m:10.2f} {med([r[6]/r[1] for r in rs]):8.2f} {med(col(2))*m:12.2f} {med(col(7))*m:12.2f} {max(col(8)):8.0f}")
PY
echo
cpu_table "$WORK/cpu" "$TOTAL" "bare mosquitto_sub"

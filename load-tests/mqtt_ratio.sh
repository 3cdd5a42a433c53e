#!/usr/bin/env bash
# End-to-end MQTT measurement, in one run on one machine:
#   limit     = what Mosquitto alone delivers to a bare subscriber (fleetpipe-load subscribe)
#   fleetpipe = what fleetpipe makes durable (acknowledged: in its fsync'd log) and then
#               commits to Parquet, from the same publisher and the same frames
# for QoS 0 and QoS 1, and prints both and the ratio, plus fleetpipe's peak RSS.
#
#   load-tests/mqtt_ratio.sh [FRAMES] [VEHICLES] [ROUNDS]   (defaults 300000, 1000, 3)
#
# Each round measures the bare subscriber and fleetpipe back to back; the table shows every
# round and the median of the rounds (these machines are noisy: compare within a round).
#
# Broker settings (stated, identical for both): our own Mosquitto on a free port, no
# persistence, max_queued_messages 0 and max_inflight_messages 0 (unlimited), so neither side
# is throttled by the stock 20-message window or loses messages to the 1,000-message queue.
# The publisher is one MQTT 3.1.1 connection with 1,000 messages in flight; fleetpipe and the
# bare subscriber connect with MQTT 5 and a Receive Maximum of 65,535.
set -euo pipefail
cd "$(dirname "$0")/.."
source load-tests/lib.sh
FRAMES="${1:-300000}"
VEHICLES="${2:-1000}"
ROUNDS="${3:-3}"
build_release
setup_work

start_mosquitto

# Prints "elapsed_seconds user system" of a bare-subscriber run (its CPU seconds).
bare() {
  local qos=$1 ready="$WORK/ready.$1"
  rm -f "$ready"
  cpu_run "$WORK/sub.cpu" "$BIN/fleetpipe-load" subscribe --port "$MQTT_PORT" --count "$FRAMES" --qos "$qos" --ready-file "$ready" > "$WORK/sub.out" & local sub=$!
  for _ in $(seq 1 500); do [ -f "$ready" ] && break; sleep 0.01; done
  local start; start=$("$BIN/fleetpipe-load" publish --port "$MQTT_PORT" --frames "$FRAMES" --vehicles "$VEHICLES" --qos "$qos" | awk '/^start/{print $2}')
  wait "$sub"
  local end; end=$(awk '/^end/{print $2}' "$WORK/sub.out")
  read -r _ _ _ user _ sys _ < "$WORK/sub.cpu"
  echo "$(python3 -c "print(f'{$end - $start:.3f}')") $user $sys"
}

# Prints "durable_seconds parquet_seconds peak_rss_mib user system" of a fleetpipe run (its CPU
# seconds from the first frame published until every frame is in Parquet).
fleet() {
  local qos=$1 round=$2 http; http="$(free_port)"
  # A fresh data directory and session per run: the same frames again would (rightly) be
  # recognised as duplicates of the previous run's.
  local data="$WORK/data.$round.$qos"
  cat > "$WORK/fleetpipe.$qos.toml" <<CONF
data_dir = "$data"
[http]
addr = "127.0.0.1:$http"
[mqtt]
url = "mqtt://127.0.0.1:$MQTT_PORT"
client_id = "fleetpipe-bench-$round-$qos-$$"
qos = $qos
[parquet]
roll_secs = 1.0
CONF
  RUST_LOG=warn "$FLEETPIPE" run --config "$WORK/fleetpipe.$qos.toml" & local fp=$!
  PIDS+=($fp)
  wait_ready "http://127.0.0.1:$http" || true
  local u0 s0; read -r u0 s0 < <(cpu_of "$fp")
  "$BIN/fleetpipe-load" publish --port "$MQTT_PORT" --frames "$FRAMES" --vehicles "$VEHICLES" --qos "$qos" > "$WORK/pub.$qos.out" &
  local pub=$!
  local wait=("$BIN/fleetpipe-load" wait-metric --timeout 300 --url "http://127.0.0.1:$http/metrics")
  local durable; durable=$("${wait[@]}" --name 'fleetpipe_frames_written_total{sink="wal"}' --value "$FRAMES" | awk '/^end/{print $2}')
  local parquet; parquet=$("${wait[@]}" --name 'fleetpipe_frames_written_total{sink="parquet"}' --value "$FRAMES" | awk '/^end/{print $2}')
  local u1 s1; read -r u1 s1 < <(cpu_of "$fp")
  wait "$pub"
  local start; start=$(awk '/^start/{print $2}' "$WORK/pub.$qos.out")
  local rss; rss=$(awk '/VmHWM/{printf "%.0f", $2/1024}' "/proc/$fp/status")
  kill -TERM "$fp"; wait "$fp" || true
  python3 -c "print(f'{$durable - $start:.3f} {$parquet - $start:.3f} $rss {$u1 - $u0:.3f} {$s1 - $s0:.3f}')"
}

printf '\nfleetpipe MQTT end to end: %s frames, %s vehicles, %s rounds, %s, %s cores\n' "$FRAMES" "$VEHICLES" "$ROUNDS" "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc)"
printf '%-8s %-6s %14s %18s %18s %8s %8s %9s\n' round qos 'bare frames/s' 'durable frames/s' 'parquet frames/s' ratio ratio_pq 'rss MiB'
: > "$WORK/rows"; : > "$WORK/cpu"
for round in $(seq 1 "$ROUNDS"); do
  for qos in 0 1; do
    read -r b bu bs < <(bare "$qos")
    read -r d p rss fu fs < <(fleet "$qos" "$round")
    echo "$round $qos $b $d $p $rss" >> "$WORK/rows"
    echo "qos$qos $bu $bs $fu $fs" >> "$WORK/cpu"
    python3 - "$round" "$qos" "$b" "$d" "$p" "$rss" "$FRAMES" <<'PY'
import sys
r, qos, b, d, p, rss, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6], int(sys.argv[7])
print(f"{r:<8} {qos:<6} {n/b:14.0f} {n/d:18.0f} {n/p:18.0f} {b/d:8.2f} {b/p:8.2f} {rss:>9}")
PY
  done
done
python3 - "$WORK/rows" "$FRAMES" <<'PY'
import sys, statistics
n = int(sys.argv[2])
rows = [l.split() for l in open(sys.argv[1])]
for qos in ("0", "1"):
    rs = [r for r in rows if r[1] == qos]
    med = lambda xs: statistics.median(xs)
    b = med([n / float(r[2]) for r in rs]); d = med([n / float(r[3]) for r in rs]); p = med([n / float(r[4]) for r in rs])
    ratio = med([float(r[2]) / float(r[3]) for r in rs]); ratio_pq = med([float(r[2]) / float(r[4]) for r in rs])
    rss = max(int(r[5]) for r in rs)
    print(f"{'median':<8} {qos:<6} {b:14.0f} {d:18.0f} {p:18.0f} {ratio:8.2f} {ratio_pq:8.2f} {rss:>9}")
PY
echo
cpu_table "$WORK/cpu" "$FRAMES" "bare subscriber (fleetpipe-load subscribe)"

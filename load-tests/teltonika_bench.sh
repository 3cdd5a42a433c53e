#!/usr/bin/env bash
# Teltonika trackers end to end, against the same records sent as JSON over the vehicle
# gateway, in one run on one machine:
#
#   load-tests/teltonika_bench.sh [ROUNDS] [DEVICES] [RECORDS]   (defaults 3, 200, 1000)
#
# teltonika = `fleetpipe-load teltonika`: DEVICES trackers, one TCP connection each, the IMEI
#             handshake, then Codec 8 Extended packets of 10 records (a fix and six IO
#             elements), each sent once the previous one is answered — answered by fleetpipe
#             once durable. Each record is stored as two frames (location + diagnostic).
# json      = `fleetpipe-load fleet`: DEVICES vehicles over the gateway (MQTT 3.1.1, QoS 1, 20 in
#             flight each), 2 x RECORDS JSON frames each: the same frames as JSON.
# Reports stored frames per second for each and the ratio teltonika / json, per round, with
# fleetpipe's CPU seconds per million frames (from /proc) for each. The decoder alone is in the
# criterion benchmark (`cargo bench -p fleetpipe-benches -- teltonika`).
set -euo pipefail
cd "$(dirname "$0")/.."
source load-tests/lib.sh
ROUNDS="${1:-3}"
DEVICES="${2:-200}"
RECORDS="${3:-1000}"
build_release
setup_work
ulimit -n "$(ulimit -Hn)"
LOAD="$BIN/fleetpipe-load"
FRAMES=$((DEVICES * RECORDS * 2))

# Starts fleetpipe with the gateway and the Teltonika listener on free ports, auth off.
up() {
  local http; http="$(free_port)"; GW_PORT="$(free_port)"; TT_PORT="$(free_port)"
  local data; data="$(mktemp -d -p "$WORK" data.XXXX)"
  cat > "$WORK/fleetpipe.toml" <<CONF
data_dir = "$data"
[http]
addr = "127.0.0.1:$http"
[gateway]
listen = "127.0.0.1:$GW_PORT"
[teltonika]
listen = "127.0.0.1:$TT_PORT"
[auth]
mode = "none"
[parquet]
roll_secs = 1.0
CONF
  RUST_LOG=warn "$FLEETPIPE" run --config "$WORK/fleetpipe.toml" 2>> "$WORK/fleetpipe.log" & FP=$!
  PIDS+=("$FP")
  HTTP_URL="http://127.0.0.1:$http"
  wait_ready "$HTTP_URL"
}
down() { kill -TERM "$FP" 2>/dev/null || true; wait "$FP" 2>/dev/null || true; }
cpu() { awk '{print ($14 + $15) / 100}' "/proc/$FP/stat"; }

# Runs one side ($1 = teltonika|json); prints "frames/s cpu_s_per_million_frames".
side() {
  up
  local c0 c1 out
  c0=$(cpu)
  if [ "$1" = teltonika ]; then
    out=$("$LOAD" teltonika --server "127.0.0.1:$TT_PORT" --devices "$DEVICES" --records "$RECORDS" --per-packet 10)
  else
    out=$("$LOAD" fleet --server "127.0.0.1:$GW_PORT" --vehicles "$DEVICES" --frames $((RECORDS * 2)) --inflight 20 --qos 1)
  fi
  c1=$(cpu)
  local start end
  start=$(awk '/^start/{print $2}' <<< "$out"); end=$(awk '/^end/{print $2}' <<< "$out")
  down
  awk -v f="$FRAMES" -v s="$start" -v e="$end" -v c0="$c0" -v c1="$c1" \
    'BEGIN { printf "%.0f %.2f\n", f / (e - s), (c1 - c0) / (f / 1e6) }'
}

echo "# $DEVICES devices x $RECORDS records (2 frames each) = $FRAMES frames; $ROUNDS rounds"
printf '%-6s %14s %14s %8s %16s %16s\n' round teltonika_f/s json_f/s ratio tt_cpu_s/Mfr json_cpu_s/Mfr
for r in $(seq 1 "$ROUNDS"); do
  read -r tt ttc < <(side teltonika)
  read -r js jsc < <(side json)
  printf '%-6s %14s %14s %8.2f %16s %16s\n' "$r" "$tt" "$js" "$(awk -v a="$tt" -v b="$js" 'BEGIN{print a/b}')" "$ttc" "$jsc"
done

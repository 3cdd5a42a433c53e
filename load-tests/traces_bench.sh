#!/usr/bin/env bash
# What OpenTelemetry traces cost: the same load against fleetpipe with traces off, and on at
# 1 % sampling (exported over OTLP/HTTP to a receiver that accepts and counts), in one run:
#
#   load-tests/traces_bench.sh [ROUNDS] [VEHICLES] [FRAMES]   (defaults 3, 200, 1000)
#
# Load: `fleetpipe-load fleet`, VEHICLES vehicles over the gateway (MQTT 3.1.1, QoS 1, 20 in
# flight each, acknowledged once durable), FRAMES frames each. "on" is
# OTEL_EXPORTER_OTLP_ENDPOINT set, OTEL_TRACES_SAMPLER=parentbased_traceidratio with
# OTEL_TRACES_SAMPLER_ARG=0.01 (no publisher sends a traceparent: every log commit is a root
# sampled at 1 %). Reports frames/s and fleetpipe's CPU seconds per million frames (from /proc)
# for each side, the ratio on / off, and the spans the receiver got.
set -euo pipefail
cd "$(dirname "$0")/.."
source load-tests/lib.sh
ROUNDS="${1:-3}"
VEHICLES="${2:-200}"
PER="${3:-1000}"
build_release
setup_work
ulimit -n "$(ulimit -Hn)"
LOAD="$BIN/fleetpipe-load"
FRAMES=$((VEHICLES * PER))

# An OTLP/HTTP receiver that answers 200 and counts requests and bytes.
OTLP_PORT="$(free_port)"
python3 - "$OTLP_PORT" "$WORK/otlp.count" <<'PY' & PIDS+=("$!")
import http.server, sys
port, out = int(sys.argv[1]), sys.argv[2]
n = {"requests": 0, "bytes": 0}
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        n["requests"] += 1; n["bytes"] += len(body)
        open(out, "w").write(f"{n['requests']} {n['bytes']}\n")
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY

up() { # $1 = off|on
  local http; http="$(free_port)"; GW_PORT="$(free_port)"
  local data; data="$(mktemp -d -p "$WORK" data.XXXX)"
  cat > "$WORK/fleetpipe.toml" <<CONF
data_dir = "$data"
[http]
addr = "127.0.0.1:$http"
[gateway]
listen = "127.0.0.1:$GW_PORT"
[auth]
mode = "none"
[parquet]
roll_secs = 1.0
CONF
  if [ "$1" = on ]; then
    OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$OTLP_PORT" OTEL_TRACES_SAMPLER=parentbased_traceidratio \
      OTEL_TRACES_SAMPLER_ARG=0.01 OTEL_BSP_SCHEDULE_DELAY=500 \
      RUST_LOG=warn "$FLEETPIPE" run --config "$WORK/fleetpipe.toml" 2>> "$WORK/fleetpipe.log" & FP=$!
  else
    RUST_LOG=warn "$FLEETPIPE" run --config "$WORK/fleetpipe.toml" 2>> "$WORK/fleetpipe.log" & FP=$!
  fi
  PIDS+=("$FP")
  wait_ready "http://127.0.0.1:$http"
}
down() { kill -TERM "$FP" 2>/dev/null || true; wait "$FP" 2>/dev/null || true; }
cpu() { awk '{print ($14 + $15) / 100}' "/proc/$FP/stat"; }

side() { # $1 = off|on; prints "frames/s cpu_s_per_million_frames"
  up "$1"
  local c0 c1 out start end
  c0=$(cpu)
  out=$("$LOAD" fleet --server "127.0.0.1:$GW_PORT" --vehicles "$VEHICLES" --frames "$PER" --inflight 20 --qos 1)
  c1=$(cpu)
  start=$(awk '/^start/{print $2}' <<< "$out"); end=$(awk '/^end/{print $2}' <<< "$out")
  down
  awk -v f="$FRAMES" -v s="$start" -v e="$end" -v c0="$c0" -v c1="$c1" \
    'BEGIN { printf "%.0f %.2f\n", f / (e - s), (c1 - c0) / (f / 1e6) }'
}

echo "# $VEHICLES vehicles x $PER frames = $FRAMES frames, QoS 1 over the gateway; $ROUNDS rounds"
printf '%-6s %12s %12s %8s %14s %14s\n' round off_f/s on_f/s on/off off_cpu_s/Mfr on_cpu_s/Mfr
for r in $(seq 1 "$ROUNDS"); do
  read -r off offc < <(side off)
  read -r on onc < <(side on)
  printf '%-6s %12s %12s %8.2f %14s %14s\n' "$r" "$off" "$on" "$(awk -v a="$on" -v b="$off" 'BEGIN{print a/b}')" "$offc" "$onc"
done
echo "# the OTLP receiver got (requests bytes): $(cat "$WORK/otlp.count" 2>/dev/null || echo '0 0')"

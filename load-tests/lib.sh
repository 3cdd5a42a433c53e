# shellcheck shell=bash
# Shared by the load-test scripts (sourced from the repository root, which each script cd's to
# first): building the binaries, a scratch directory cleaned up on exit, free ports, waiting for a
# port or for fleetpipe to be ready, our own Mosquitto.

# Builds fleetpipe and fleetpipe-load in release mode into CARGO_TARGET_DIR (exported; default
# ~/.cache/fleetpipe/target, shared by every checkout), exports RUST_BACKTRACE=0, sets BIN to
# the directory holding the binaries and FLEETPIPE to the fleetpipe binary under test:
# $FLEETPIPE_BIN if set (e.g. an earlier build, to measure before and after with the same
# harness), else $BIN/fleetpipe.
build_release() {
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fleetpipe/target}"
  export RUST_BACKTRACE=0
  cargo build --release -q -p fleetpipe -p fleetpipe-load
  # shellcheck disable=SC2034  # used by the sourcing script
  BIN="$CARGO_TARGET_DIR/release"
  # shellcheck disable=SC2034
  FLEETPIPE="${FLEETPIPE_BIN:-$BIN/fleetpipe}"
}

# Makes a scratch directory WORK and an empty PIDS, and on exit kills every pid in PIDS, waits
# for the script's children and removes WORK.
setup_work() {
  WORK="$(mktemp -d)"
  PIDS=()
  trap cleanup_work EXIT
}
cleanup_work() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 500); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.02; done; echo "port $1 not open" >&2; return 1; }
# Polls $1/ready (fleetpipe's base URL) every 20 ms, 500 times at most; returns 1 if it never
# answered with success (callers that carry on regardless add `|| true`).
wait_ready() { for _ in $(seq 1 500); do curl -sf "$1/ready" >/dev/null 2>&1 && return 0; sleep 0.02; done; return 1; }

# Starts our own Mosquitto on a free port, with no persistence and unlimited queues and in-flight
# windows (the stock 20-message window and 1,000-message queue would throttle or drop), and
# waits for it. Sets MQTT_PORT and MOSQ_PID and adds the pid to PIDS; needs WORK. Arguments,
# if any, prefix the command (e.g. `taskset -c 0`). With MOSQ_LOG set, the broker logs each
# subscription to that file (how a script knows a bare `mosquitto_sub` is subscribed).
start_mosquitto() {
  local mosq; mosq="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
  MQTT_PORT="$(free_port)"
  cat > "$WORK/mosquitto.conf" <<CONF
listener $MQTT_PORT 127.0.0.1
user root
allow_anonymous true
persistence false
max_queued_messages 0
max_inflight_messages 0
max_queued_bytes 0
CONF
  if [ -n "${MOSQ_LOG:-}" ]; then
    printf 'log_dest file %s\nlog_type subscribe\n' "$MOSQ_LOG" >> "$WORK/mosquitto.conf"
  else
    echo "log_dest none" >> "$WORK/mosquitto.conf"
  fi
  "$@" "$mosq" -c "$WORK/mosquitto.conf" 2>/dev/null & MOSQ_PID=$!
  PIDS+=("$MOSQ_PID")
  wait_port "$MQTT_PORT"
}

# CPU seconds a running process has used so far, from /proc/PID/stat: "user system".
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); printf "%.3f %.3f\n", $12 / hz, $13 / hz }' "/proc/$1/stat"; }

# cpu_run FILE CMD...: runs CMD to its end (its stdout is the caller's) and writes
# "end <epoch seconds> user <s> system <s> status <n>" to FILE, from the child's rusage as it
# exits.
cpu_run() {
  local out=$1; shift
  python3 -c '
import os, subprocess, sys, time
p = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(p.pid, 0)
open(sys.argv[1], "w").write(f"end {time.time():.6f} user {ru.ru_utime:.3f} system {ru.ru_stime:.3f} status {status}\n")
' "$out" "$@"
}

# cpu_table FILE FRAMES BARE_NAME: FILE holds one line per run, "KEY BARE_USER BARE_SYS FP_USER
# FP_SYS" (CPU seconds over FRAMES frames); prints, per KEY, the median CPU seconds per million
# frames (user + system, and each) of the bare client and of fleetpipe, and their ratio.
cpu_table() {
  python3 - "$@" <<'PY'
import statistics as st, sys
path, n, bare = sys.argv[1], int(sys.argv[2]), sys.argv[3]
m = 1e6 / n
rows = [l.split() for l in open(path) if l.strip()]
print(f"CPU seconds per million frames (user + system; median of the runs): {bare} vs fleetpipe")
print(f"{'run':<12} {'bare u+s':>9} {'(user':>7} {'sys)':>6} {'fleetpipe u+s':>14} {'(user':>7} {'sys)':>6} {'ratio':>6}")
for key in dict.fromkeys(r[0] for r in rows):
    rs = [[float(x) for x in r[1:5]] for r in rows if r[0] == key]
    med = lambda i: st.median(r[i] for r in rs) * m
    tot = lambda i: st.median(r[i] + r[i + 1] for r in rs) * m
    ratio = st.median((r[2] + r[3]) / (r[0] + r[1]) for r in rs if r[0] + r[1] > 0) if any(r[0] + r[1] > 0 for r in rs) else float("nan")
    print(f"{key:<12} {tot(0):9.2f} {med(0):7.2f} {med(1):6.2f} {tot(2):14.2f} {med(2):7.2f} {med(3):6.2f} {ratio:6.2f}")
PY
}

# shellcheck shell=bash
# Shared by the load-test scripts (sourced from the repository root, which each script cd's to
# first): building the binaries, a scratch directory cleaned up on exit, free ports, waiting for a
# port or for fleetpipe to be ready, our own Mosquitto.

# Builds fleetpipe and fleetpipe-load in release mode into CARGO_TARGET_DIR (exported; default
# ~/.cache/fleetpipe/target, shared by every checkout), exports RUST_BACKTRACE=0, and sets BIN to
# the directory holding the binaries.
build_release() {
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fleetpipe/target}"
  export RUST_BACKTRACE=0
  cargo build --release -q -p fleetpipe -p fleetpipe-load
  # shellcheck disable=SC2034  # used by the sourcing script
  BIN="$CARGO_TARGET_DIR/release"
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
# if any, prefix the command (e.g. `taskset -c 0`).
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
log_dest none
CONF
  "$@" "$mosq" -c "$WORK/mosquitto.conf" 2>/dev/null & MOSQ_PID=$!
  PIDS+=("$MOSQ_PID")
  wait_port "$MQTT_PORT"
}

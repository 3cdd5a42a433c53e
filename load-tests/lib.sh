# Shared by the load-test scripts (sourced): free ports, waiting for a port, our own Mosquitto.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 500); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.02; done; echo "port $1 not open" >&2; return 1; }

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

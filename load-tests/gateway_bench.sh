#!/usr/bin/env bash
# The vehicle gateway's measurements, in one run on one machine:
#
#   load-tests/gateway_bench.sh [ROUNDS] [FRAMES]   (defaults 3, 300000)
#
# 1. Throughput. The same publishers and frames, QoS 0 and 1, against three servers:
#      gateway   = fleetpipe's gateway, token auth, ack after durable (fsync'd log); the end is
#                  the last PUBACK (QoS 1) or the log holding every frame (QoS 0)
#      mosquitto = our own Mosquitto (no persistence, unlimited queues and windows) delivering to
#                  a bare subscriber (fleetpipe-load subscribe, MQTT 5); the end is the N-th
#                  message at the subscriber
#      null      = an MQTT server (ntex-mqtt, like the gateway) that acknowledges at once and
#                  keeps nothing: the publishers' own limit; the end is the N-th PUBLISH
#    Publishers: `fleetpipe-load fleet` (1,000 vehicles, one MQTT 3.1.1 connection each, 20
#    messages in flight each) and 20 `mosquitto_pub -l` processes (one vehicle each, QoS 1 only).
#    Ratios: gateway / mosquitto (goal >= 1.0) and gateway / null (goal >= 0.90), per round.
# 2. Latency at half the gateway's QoS 1 capacity (1,000 vehicles at an even rate): publish ->
#    PUBACK p50/p99, and GET /health p50/p99 meanwhile; then publish -> visible in
#    GET /v1/vehicles/{id} (fleetpipe-load latency, auth off: its probe has no credentials).
# 3. Connections: idle authenticated connections at 5k, 10k, 18k (client processes of at most
#    9,000 connections each, over 20 source addresses in 127.0.0.0/8): connect rate, the
#    gateway's resident memory per connection, GET /health p99 while 18k are held; then 10,000
#    vehicles publishing at 1 Hz each for 30 s.
#
# Needs mosquitto and mosquitto_pub (scripts/test.sh installs them). Everything listens on free
# loopback ports and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
source load-tests/lib.sh
ROUNDS="${1:-3}"
FRAMES="${2:-300000}"
VEHICLES=1000
INFLIGHT=20
MOSQ_PUBS=20
build_release
setup_work
# Every connection is a descriptor, in the gateway and in its clients.
ulimit -n "$(ulimit -Hn)"
LOAD="$BIN/fleetpipe-load"

# Vehicles: FLEET000000… (fleet), FLEET001000… (mosquitto_pub), FLEET002000… (idle),
# FLEET020000… (1 Hz). Credentials for all of them, with their load-test tokens.
"$LOAD" credentials --vehicles 30000 --out "$WORK/credentials"

start_mosquitto

# Starts a fleetpipe gateway with a fresh data directory: sets FP, GW_PORT, HTTP_URL.
# $1 = auth mode (token|none), $2 = max_connections.
gateway_up() {
  local http admin; http="$(free_port)"; admin="$(free_port)"; GW_PORT="$(free_port)"
  local data; data="$(mktemp -d -p "$WORK" data.XXXX)"
  cat > "$WORK/fleetpipe.toml" <<CONF
data_dir = "$data"
[http]
addr = "127.0.0.1:$http"
# With token auth /metrics asks for a token; the open admin listener does not.
admin_addr = "127.0.0.1:$admin"
[gateway]
listen = "127.0.0.1:$GW_PORT"
max_connections = ${2:-18000}
[auth]
mode = "$1"
credentials_file = "$WORK/credentials"
[parquet]
roll_secs = 1.0
CONF
  RUST_LOG=warn "$FLEETPIPE" run --config "$WORK/fleetpipe.toml" 2>> "$WORK/fleetpipe.log" & FP=$!
  PIDS+=("$FP")
  HTTP_URL="http://127.0.0.1:$http"
  METRICS_URL="http://127.0.0.1:$admin/metrics"
  wait_ready "$HTTP_URL"
}
gateway_down() { kill -TERM "$FP" 2>/dev/null || true; wait "$FP" 2>/dev/null || true; }

# One NDJSON file of frames per mosquitto_pub process (vehicle FLEET001000 + p).
python3 - "$WORK" "$MOSQ_PUBS" "$FRAMES" <<'PY'
import sys
work, pubs, frames = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for p in range(pubs):
    vid = f"FLEET{1000 + p:06d}"
    with open(f"{work}/mp.{p}", "w") as f:
        for seq in range(1, frames // pubs + 1):
            f.write(f'{{"vehicle_id":"{vid}","ts":{1795640400000 + seq * 1000},"seq":{seq},"lat":56.1{seq % 10000:04d},"lon":10.213695,"speed_kmh":33.8}}\n')
PY

# Runs publishers of kind $1 (fleet|mosquitto_pub) at QoS $2 against port $3, authenticating
# if $4 = auth; prints "start end" (epoch seconds: publishing began, publishers finished).
# At QoS 0 the fleet keeps its connections open afterwards (closing a connection may discard
# what the server has read but not yet handled; at QoS 0 nothing says so): `release` closes them.
publishers() {
  local kind=$1 qos=$2 port=$3 auth=${4:-}
  if [ "$kind" = fleet ]; then
    local flag=(); [ "$auth" = auth ] && flag+=(--auth); [ "$qos" = 0 ] && flag+=(--hold)
    rm -f "$WORK/fleet.out"
    "$LOAD" fleet --server "127.0.0.1:$port" --vehicles "$VEHICLES" --frames $((FRAMES / VEHICLES)) \
      --inflight "$INFLIGHT" --qos "$qos" --ips 20 "${flag[@]}" > "$WORK/fleet.out" &
    echo $! > "$WORK/fleet.pid"
    until grep -q '^fleet' "$WORK/fleet.out" 2>/dev/null; do
      kill -0 "$(cat "$WORK/fleet.pid")" 2>/dev/null || break; sleep 0.01
    done
    echo "$(awk '/^start/{print $2}' "$WORK/fleet.out") $(awk '/^end/{print $2}' "$WORK/fleet.out")"
  else
    local start; start=$(date +%s.%N) pids=()
    for p in $(seq 0 $((MOSQ_PUBS - 1))); do
      local vid; vid=$(printf 'FLEET%06d' $((1000 + p)))
      local cred=(); [ "$auth" = auth ] && cred=(-u "$vid" -P "$(printf 'load-token-%021d' $((1000 + p)))")
      mosquitto_pub -h 127.0.0.1 -p "$port" -q "$qos" -i "$vid" -t "vehicles/$vid/location" "${cred[@]}" -l < "$WORK/mp.$p" & pids+=($!)
    done
    wait "${pids[@]}"
    echo "$start $(date +%s.%N)"
  fi
}
release() {
  [ -f "$WORK/fleet.pid" ] || return 0
  kill "$(cat "$WORK/fleet.pid")" 2>/dev/null || true; rm -f "$WORK/fleet.pid"
}

# Seconds for all FRAMES to reach server $1 (gateway|mosquitto|null) from publishers $2 at QoS $3.
measure() {
  local server=$1 kind=$2 qos=$3 start end
  case "$server" in
    gateway)
      gateway_up token
      local u0 s0 u1 s1; read -r u0 s0 < <(cpu_of "$FP")
      if [ "$qos" = 1 ]; then
        read -r start end < <(publishers "$kind" 1 "$GW_PORT" auth)
      else
        "$LOAD" wait-metric --timeout 300 --url "$METRICS_URL" \
          --name 'fleetpipe_frames_written_total{sink="wal"}' --value "$FRAMES" > "$WORK/wal.out" & local w=$!
        read -r start _ < <(publishers "$kind" 0 "$GW_PORT" auth)
        wait "$w"; end=$(awk '/^end/{print $2}' "$WORK/wal.out")
      fi
      read -r u1 s1 < <(cpu_of "$FP")
      python3 -c "print(f'{$u1 - $u0:.3f} {$s1 - $s0:.3f}')" > "$WORK/gw.cpu"
      release; gateway_down ;;
    mosquitto)
      rm -f "$WORK/ready"
      cpu_run "$WORK/sub.cpu" "$LOAD" subscribe --port "$MQTT_PORT" --count "$FRAMES" --qos "$qos" --ready-file "$WORK/ready" > "$WORK/sub.out" & local s=$!
      for _ in $(seq 1 500); do [ -f "$WORK/ready" ] && break; sleep 0.01; done
      local b0 c0 b1 c1; read -r b0 c0 < <(cpu_of "$MOSQ_PID")
      read -r start _ < <(publishers "$kind" "$qos" "$MQTT_PORT")
      wait "$s"; end=$(awk '/^end/{print $2}' "$WORK/sub.out"); release
      read -r b1 c1 < <(cpu_of "$MOSQ_PID")
      local su ss; read -r _ _ _ su _ ss _ < "$WORK/sub.cpu"
      # The gateway is broker and subscriber in one: compared with both.
      python3 -c "print(f'{$b1 - $b0 + $su:.3f} {$c1 - $c0 + $ss:.3f}')" > "$WORK/mq.cpu" ;;
    null)
      # A fresh server per measurement: it prints "end" at its FRAMES-th PUBLISH.
      local port; port="$(free_port)"
      "$LOAD" null-mqtt --port "$port" --workers 2 --every "$FRAMES" > "$WORK/null.out" & local n=$!
      wait_port "$port"
      read -r start _ < <(publishers "$kind" "$qos" "$port")
      for _ in $(seq 1 3000); do grep -q '^end' "$WORK/null.out" && break; sleep 0.01; done
      end=$(awk '/^end/{print $2; exit}' "$WORK/null.out"); release; kill "$n"; wait "$n" 2>/dev/null || true ;;
  esac
  python3 -c "print(f'{$end - $start:.3f}')"
}

printf '\nfleetpipe vehicle gateway: %s frames, %s rounds, %s, %s cores\n' "$FRAMES" "$ROUNDS" "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc)"
printf '\n1. throughput (frames/s; ratios per round, then the median)\n'
printf '%-6s %-14s %-4s %12s %12s %12s %10s %10s\n' round publishers qos gateway mosquitto null 'gw/mosq' 'gw/null'
: > "$WORK/rows"; : > "$WORK/cpu"
for round in $(seq 1 "$ROUNDS"); do
  for kind in fleet mosquitto_pub; do
    # mosquitto_pub closes its connection as soon as its last QoS 0 PUBLISH is written: what is
    # still in flight then may be lost anywhere (QoS 0 is at most once), so it runs at QoS 1 only.
    qoss="1 0"; [ "$kind" = mosquitto_pub ] && qoss=1
    for qos in $qoss; do
      g=$(measure gateway "$kind" "$qos"); m=$(measure mosquitto "$kind" "$qos"); n=$(measure null "$kind" "$qos")
      echo "$round $kind $qos $g $m $n" >> "$WORK/rows"
      echo "$kind-q$qos $(cat "$WORK/mq.cpu") $(cat "$WORK/gw.cpu")" >> "$WORK/cpu"
      python3 -c "
n=$FRAMES; g,m,u=$g,$m,$n
print(f'{$round:<6} {\"$kind\":<14} {$qos:<4} {n/g:12.0f} {n/m:12.0f} {n/u:12.0f} {m/g:10.2f} {u/g:10.2f}')"
    done
  done
done
python3 - "$WORK/rows" "$FRAMES" > "$WORK/medians" <<'PY'
import sys, statistics as st
n = int(sys.argv[2]); rows = [l.split() for l in open(sys.argv[1])]
for kind in ("fleet", "mosquitto_pub"):
    for qos in ("1", "0"):
        rs = [r for r in rows if r[1] == kind and r[2] == qos]
        if not rs:
            continue
        g, m, u = (st.median(n / float(r[i]) for r in rs) for i in (3, 4, 5))
        rm = st.median(float(r[4]) / float(r[3]) for r in rs); ru = st.median(float(r[5]) / float(r[3]) for r in rs)
        print(f"{'median':<6} {kind:<14} {qos:<4} {g:12.0f} {m:12.0f} {u:12.0f} {rm:10.2f} {ru:10.2f}")
PY
cat "$WORK/medians"
echo
cpu_table "$WORK/cpu" "$FRAMES" "Mosquitto + bare subscriber (fleetpipe-load subscribe)"
CAPACITY=$(awk '$2=="fleet" && $3=="1"{print $4}' "$WORK/medians")

printf '\n2. latency at half capacity (%s frames/s of %s, 1,000 vehicles, 20 s)\n' $((CAPACITY / 2)) "$CAPACITY"
gateway_up token
"$LOAD" probe --url "$HTTP_URL/health" --secs 18 > "$WORK/probe.out" & probe=$!
RATE=$(python3 -c "print($CAPACITY / 2 / $VEHICLES)")
"$LOAD" fleet --server "127.0.0.1:$GW_PORT" --vehicles "$VEHICLES" --frames "$(python3 -c "print(int($RATE * 20))")" --rate "$RATE" --inflight 1000 --qos 1 --ips 20 --auth \
  | grep '^fleet' | sed 's/^/   /'
wait "$probe"; sed 's/^/   /' "$WORK/probe.out"
gateway_down
gateway_up none
"$LOAD" latency --port "$GW_PORT" --http "$HTTP_URL" --rate $((CAPACITY / 2)) --vehicles "$VEHICLES" --duration 15 | sed 's/^/   /'
gateway_down

printf '\n3. connections (idle, authenticated, keep-alive 60 s)\n'
gateway_up token 18000
rss() { awk '/VmRSS/{print $2}' "/proc/$FP/status"; }
BASE=$(rss)
printf '   %-8s %14s %16s %18s\n' held 'connects/s' 'gateway RSS MiB' 'bytes/connection'
held=0
for step in 5000:0 5000:5000 8000:10000; do
  n=${step%%:*}; first=$((${step##*:} + 2000))
  # At most 9,000 per client process (its own descriptor limit), started together.
  per=$(( (n + 8999) / 9000 )); chunk=$(( n / per )); t0=$(date +%s.%N); ready=()
  for k in $(seq 0 $((per - 1))); do
    out="$WORK/idle.$first.$k"
    "$LOAD" idle --server "127.0.0.1:$GW_PORT" --first $((first + k * chunk)) --count "$chunk" --ips 20 --auth > "$out" & PIDS+=($!)
    ready+=("$out")
  done
  for out in "${ready[@]}"; do
    for _ in $(seq 1 6000); do grep -q '^idle' "$out" && break; sleep 0.01; done
    grep -q '^idle' "$out" || { echo "idle connections did not open: $(cat "$out")" >&2; exit 1; }
  done
  t1=$(date +%s.%N); held=$((held + n))
  sleep 1 # let the last CONNACKs' buffers settle before reading RSS
  now=$(rss)
  python3 -c "print(f'   {$held:<8} {$n/($t1-$t0):14.0f} {$now/1024:16.1f} {($now-$BASE)*1024/$held:18.0f}')"
done
"$LOAD" probe --url "$HTTP_URL/health" --secs 10 | sed 's/^/   with 18,000 held: /'
gateway_down
for p in "${PIDS[@]}"; do case "$(ps -o args= -p "$p" 2>/dev/null)" in *" idle "*) kill "$p" ;; esac; done

printf '\n   10,000 vehicles at 1 Hz for 30 s (one connection each):\n'
gateway_up token 18000
c0=$(awk '{print $14+$15}' "/proc/$FP/stat")
"$LOAD" fleet --server "127.0.0.1:$GW_PORT" --first 20000 --vehicles 10000 --frames 30 --rate 1 --inflight 10 --qos 1 --ips 20 --auth --threads 1 \
  | grep -E '^(fleet|connected)' | sed 's/^/   /'
c1=$(awk '{print $14+$15}' "/proc/$FP/stat")
python3 -c "print(f'   gateway CPU: {($c1-$c0)/100:.1f} s for 300,000 frames ({($c1-$c0)*10000/300000:.1f} us per frame)')"
gateway_down

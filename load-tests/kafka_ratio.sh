#!/usr/bin/env bash
# Kafka end to end, in one run on one machine, on the same broker and the same topic:
#   limit     = a bare consumer (rdkafka, new group, from the earliest offset) that only counts
#               the records: time from its launch to the N-th record;
#   fleetpipe = fleetpipe consuming the same topic in a new group: time from its launch until
#               the N-th frame is durable (in its write-ahead log, so committable), and until
#               the N-th row is committed to Parquet.
#
#   load-tests/kafka_ratio.sh [FRAMES] [VEHICLES] [ROUNDS]   (defaults 300000, 1000, 3)
#
# Broker: tansu (Kafka-compatible, in-memory storage; installed by scripts/test.sh) on a free
# port; one topic of 4 partitions filled once with FRAMES JSON location frames (~200 bytes,
# key = vehicle_id) before the rounds. Both sides include joining their group.
set -euo pipefail
cd "$(dirname "$0")/.."
source load-tests/lib.sh
FRAMES="${1:-300000}"
VEHICLES="${2:-1000}"
ROUNDS="${3:-3}"
build_release
TANSU="${FLEETPIPE_TANSU:-$HOME/.cache/fleetpipe/tansu/bin/tansu}"
PY="${FLEETPIPE_PYTHON:-$HOME/.cache/fleetpipe/py/bin/python}"
setup_work
now() { date +%s.%N; }

PORT="$(free_port)"
"$TANSU" broker --storage-engine memory://tansu/ --listener-url "tcp://127.0.0.1:$PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$PORT" > "$WORK/tansu.log" 2>&1 & PIDS+=($!)
wait_port "$PORT"
BROKERS="127.0.0.1:$PORT"
"$PY" tests/kafka_client.py create "$BROKERS" vehicle-frames 4
"$BIN/fleetpipe-load" kafka-produce --brokers "$BROKERS" --frames "$FRAMES" --vehicles "$VEHICLES"

peak_rss=0
: > "$WORK/cpu"
printf '%-6s %14s %16s %8s %18s %8s\n' round "bare (rec/s)" "durable (fr/s)" ratio "parquet (fr/s)" ratio
bare_rates=(); fp_rates=(); pq_rates=()
for round in $(seq 1 "$ROUNDS"); do
  start=$(now)
  end=$(cpu_run "$WORK/consume.cpu" "$BIN/fleetpipe-load" kafka-consume --brokers "$BROKERS" --count "$FRAMES" | awk '/^end/{print $2}')
  read -r _ _ _ bu _ bs _ < "$WORK/consume.cpu"
  bare=$(python3 -c "print($FRAMES / ($end - $start))")

  HTTP_PORT="$(free_port)"
  cat > "$WORK/fleetpipe.toml" <<CONF
data_dir = "$WORK/data.$round"
[http]
addr = "127.0.0.1:$HTTP_PORT"
[gateway]
listen = "127.0.0.1:$(free_port)"
[parquet]
roll_secs = 1.0
[kafka]
brokers = "$BROKERS"
group = "fleetpipe-bench-$round-$$"
clean_topic = ""
dlq_topic = ""
CONF
  start=$(now)
  RUST_LOG=warn "$FLEETPIPE" run --config "$WORK/fleetpipe.toml" > "$WORK/fleetpipe.$round.log" 2>&1 & fp=$!
  wait_port "$HTTP_PORT"
  # Its CPU from its start (subscribing and consuming begin at once).
  durable=$("$BIN/fleetpipe-load" wait-metric --url "http://127.0.0.1:$HTTP_PORT/metrics" \
    --name 'fleetpipe_frames_written_total{sink="wal"}' --value "$FRAMES" | awk '/^end/{print $2}')
  rss=$(awk '/VmHWM/{print $2}' "/proc/$fp/status")
  parquet=$("$BIN/fleetpipe-load" wait-metric --url "http://127.0.0.1:$HTTP_PORT/metrics" \
    --name 'fleetpipe_frames_written_total{sink="parquet"}' --value "$FRAMES" | awk '/^end/{print $2}')
  read -r fu fs < <(cpu_of "$fp")
  echo "kafka $bu $bs $fu $fs" >> "$WORK/cpu"
  kill -TERM "$fp"; wait "$fp" || true
  fpr=$(python3 -c "print($FRAMES / ($durable - $start))")
  pqr=$(python3 -c "print($FRAMES / ($parquet - $start))")
  [ "$rss" -gt "$peak_rss" ] && peak_rss=$rss
  printf '%-6s %14.0f %16.0f %8.2f %18.0f %8.2f\n' "$round" "$bare" "$fpr" "$(python3 -c "print($fpr/$bare)")" \
    "$pqr" "$(python3 -c "print($pqr/$bare)")"
  bare_rates+=("$bare"); fp_rates+=("$fpr"); pq_rates+=("$pqr")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
b=$(median "${bare_rates[@]}"); f=$(median "${fp_rates[@]}"); q=$(median "${pq_rates[@]}")
printf '%-6s %14.0f %16.0f %8.2f %18.0f %8.2f\n' median "$b" "$f" "$(python3 -c "print($f/$b)")" "$q" "$(python3 -c "print($q/$b)")"
echo "fleetpipe peak RSS: $((peak_rss / 1024)) MiB"
echo
cpu_table "$WORK/cpu" "$FRAMES" "bare rdkafka consumer (fleetpipe-load kafka-consume)"

#!/usr/bin/env bash
# Instructions per frame, by stage: a deterministic figure (valgrind counts instructions, not
# seconds, so the machine's other load does not move it), for judging a change without noise.
#
#   load-tests/callgrind.sh [FRAMES] [VEHICLES] [QOS]     (defaults 50000, 1000, 0)
#
# `fleetpipe run` on its default configuration (log, Parquet, dead-letter, events, L1) with an
# external Mosquitto runs under `valgrind --tool=callgrind --separate-threads=yes`. The counters
# are zeroed once it is ready (callgrind_control --zero), the same fixed frames as
# mqtt_ratio.sh's are published (fleetpipe-load publish), and the counters are dumped once every
# frame is in Parquet: the window is exactly "frames arrive → every sink has them", start-up and
# shutdown excluded. The harness's own /metrics polls (every 500 ms) are counted under the
# tokio workers and reported on their own line.
#
# Per thread (each thread's own instructions: they add up to the total), then inclusive costs of
# the functions that are the stages. Raw data: load-tests/results/callgrind/ (the head of each
# thread's annotated profile, annotate_qosN[_TAG].txt with TAG=name; KEEP=dir keeps each
# thread's whole annotation there). FLEETPIPE_BIN=path measures another build.
#
# Work that runs by the clock, not by the frame, is held off so that the figure is per frame:
# the events sink commits (and snapshots its state) once an hour here instead of every second
# (under valgrind's ~50x slowdown it would run 50x as often per frame as in a real run), and
# Parquet rolls every second (a few dozen rolls in the window).
set -euo pipefail
cd "$(dirname "$0")/.."
source load-tests/lib.sh
FRAMES="${1:-50000}"
VEHICLES="${2:-1000}"
QOS="${3:-0}"
command -v valgrind >/dev/null || { echo "callgrind.sh needs valgrind (apt-get install valgrind)" >&2; exit 1; }
build_release
setup_work
start_mosquitto
OUT=load-tests/results/callgrind
mkdir -p "$OUT"
http="$(free_port)"
cat > "$WORK/fleetpipe.toml" <<CONF
data_dir = "$WORK/data"
[http]
addr = "127.0.0.1:$http"
[mqtt]
url = "mqtt://127.0.0.1:$MQTT_PORT"
client_id = "fleetpipe-callgrind-$$"
qos = $QOS
[parquet]
roll_secs = 1.0
[events]
commit_secs = 3600.0
CONF
mkdir -p "$WORK/cg"
RUST_LOG=warn valgrind --tool=callgrind --separate-threads=yes --dump-instr=no \
  --callgrind-out-file="$WORK/cg/callgrind.out.%p" \
  "$FLEETPIPE" run --config "$WORK/fleetpipe.toml" 2> "$WORK/valgrind.log" & fp=$!
PIDS+=($fp)
for _ in $(seq 1 1200); do curl -sf "http://127.0.0.1:$http/ready" >/dev/null 2>&1 && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$http/ready" >/dev/null || { echo "fleetpipe under valgrind never became ready" >&2; cat "$WORK/valgrind.log" >&2; exit 1; }
callgrind_control --zero "$fp" >/dev/null
"$BIN/fleetpipe-load" publish --port "$MQTT_PORT" --frames "$FRAMES" --vehicles "$VEHICLES" --qos "$QOS" > "$WORK/pub.out"
# Every frame in Parquet, or (at QoS 0 the broker may drop some while fleetpipe runs 50x slower
# under valgrind) every frame that arrived: the received count unchanged for 10 s and all of
# it in Parquet. Per frame means per frame received.
metric() { curl -sf "http://127.0.0.1:$http/metrics" | awk -v k="$1" '$1==k {print $2}'; }
got=0; still=0
for _ in $(seq 1 1200); do
  now=$(metric 'fleetpipe_frames_received_total{source="mqtt"}'); pq=$(metric 'fleetpipe_frames_written_total{sink="parquet"}')
  [ "${pq:-0}" -ge "$FRAMES" ] && { got=$pq; break; }
  if [ "${now:-0}" = "$got" ] && [ "${pq:-0}" = "$now" ]; then still=$((still + 1)); else still=0; fi
  got=${now:-0}
  [ "$still" -ge 10 ] && break
  sleep 1
done
callgrind_control --dump=measured "$fp" >/dev/null
[ "$got" -lt "$FRAMES" ] && echo "note: $got of $FRAMES frames arrived (QoS $QOS); figures are per frame received"
FRAMES=$got
kill -TERM "$fp"; wait "$fp" || true

# The files of the dump named "measured" (one per thread; the exit dump is another part).
python3 - "$WORK/cg" "$FRAMES" "$QOS" "$OUT" <<'PY'
import glob, os, re, subprocess, sys
cg, n, qos, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
if os.environ.get("KEEP"):
    os.makedirs(os.environ["KEEP"], exist_ok=True)
def trigger(f):
    with open(f, errors="replace") as fh:
        for line in fh:
            if line.startswith("desc: Trigger:"):
                return line
    return ""
files = [f for f in glob.glob(os.path.join(cg, "callgrind.out.*")) if "measured" in trigger(f)]
# The thread each file belongs to, told by the function it runs (inclusive, in that thread).
markers = [
    ("wal-writer (log: group commit, fsync, dispatch)", "fleetpipe_pipeline::writer::Writer::run"),
    ("shards (dedup, L1)", "fleetpipe_pipeline::shard::run_shard"),
    ("resequencer", "fleetpipe_pipeline::shard::resequence"),
    ("sink-parquet", "parquet::arrow::arrow_writer::ArrowWriter"),
    ("sink-events", "fleetpipe_sinks::events::EventsSink"),
    ("sink-dead-letter", "fleetpipe_pipeline::driver::spawn_draining"),
    ("acker", "fleetpipe_pipeline::acker::"),
]
TOKIO = "tokio workers (MQTT source, HTTP, timers)"
# (what, symbol, the thread it is counted in: None for any)
stages = [
    ("MQTT packet parsing (rumqttc)", "rumqttc::v5::mqttbytes::v5::Packet::read", None),
    ("MQTT session state (rumqttc)", "rumqttc::v5::state::MqttState::handle_incoming_packet", None),
    ("MQTT message → log entry (decode included)", "fleetpipe_ingest::mqtt::build_submission", None),
    ("  decode + validate (JSON → frames)", "fleetpipe_processors::codec::decode_message", None),
    ("log record encoding (protobuf)", "fleetpipe_pipeline::record::encode", None),
    ("log append (fdatasync: no instructions)", "fleetpipe_pipeline::wal::Wal::append_group", None),
    ("dedup", "<fleetpipe_processors::dedup::Dedup as", None),
    ("L1 latest-state update", "fleetpipe_processors::latest::LatestCache::apply", None),
    ("Parquet: encode and append", "as fleetpipe_pipeline::sink::Sink>::write", "sink-parquet"),
    ("Parquet: roll (close, fsync, publish)", "RollingSink<F>::roll", "sink-parquet"),
    ("events: engine (trips, faults)", "fleetpipe_processors::events::Engine::push", None),
    ("events: write (engine and store)", "<fleetpipe_sinks::events::EventsSink as fleetpipe_pipeline::sink::Sink>::write", None),
    ("/metrics render (the harness's polls)", "metrics_exporter_prometheus::recorder::PrometheusHandle::render", None),
]
def annotate(f):
    return subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", f],
                          capture_output=True, text=True, check=True).stdout
def total(text):
    m = re.search(r"^\s*([\d,]+)\s+\(100\.0%\)\s+PROGRAM TOTALS", text, re.M) or re.search(r"^([\d,]+)\s+PROGRAM TOTALS", text, re.M)
    return int(m.group(1).replace(",", "")) if m else 0
def incl(text, sym):
    best = 0
    for line in text.splitlines():
        m = re.match(r"^\s*([\d,]+)\s.*?\s(\S.*)$", line)
        if m and sym in line:
            best = max(best, int(m.group(1).replace(",", "")))
    return best
threads, per_stage, grand = {}, {s: 0 for s, _, _ in stages}, 0
full = os.environ.get("KEEP")
tag = f"_{os.environ['TAG']}" if os.environ.get("TAG") else ""
with open(os.path.join(out, f"annotate_qos{qos}{tag}.txt"), "w") as keep:
    for f in sorted(files):
        text = annotate(f)
        t = total(text); grand += t
        label = next((l for l, sym in markers if incl(text, sym) > 0), TOKIO)
        threads[label] = threads.get(label, 0) + t
        for s, sym, only in stages:
            if only is None or only == label:
                per_stage[s] += incl(text, sym)
        if full:
            open(os.path.join(full, os.path.basename(f) + ".txt"), "w").write(text)
        keep.write(f"==== {os.path.basename(f)}: {label}\n")
        # Without this machine's paths (the repository, the crate registry, scratch files).
        head = "\n".join(text.splitlines()[:80]) + "\n"
        head = re.sub(r"/\S*?/registry/src/[^/]+/", "<registry>/", head)
        head = head.replace(os.getcwd() + "/", "").replace(os.path.dirname(cg) + "/", "<scratch>/").replace(os.path.expanduser("~"), "~")
        keep.write(head)
print(f"fleetpipe instructions per frame (callgrind), {n} frames, QoS {qos}, MQTT source, default sinks")
print(f"{'thread':<52} {'instr/frame':>12} {'share':>7}")
for label, t in sorted(threads.items(), key=lambda kv: -kv[1]):
    print(f"{label:<52} {t / n:12.0f} {t / grand:7.1%}")
print(f"{'total':<52} {grand / n:12.0f} {1:7.1%}")
print(f"{'stage (inclusive)':<52} {'instr/frame':>12} {'share':>7}")
for s, _, _ in stages:
    print(f"{s:<52} {per_stage[s] / n:12.0f} {per_stage[s] / grand:7.1%}")
PY

#!/usr/bin/env bash
# Scale curves, in one run on one machine:
#
#  1. Tracked vehicles: 1k, 10k, 100k, 1M vehicles publishing FRAMES frames over MQTT (QoS 0 and
#     QoS 1, mqtt_ratio.sh: bare subscriber vs fleetpipe durable, same run), fleetpipe's peak RSS,
#     and the bytes per tracked vehicle its L1 cache holds (`fleetpipe-load l1-bytes`).
#  2. Frame rate: 0.25, 0.5, 1, 1.5 and 2 × the QoS 1 capacity fleetpipe showed in (1) at 1k
#     vehicles, offered for SECS seconds each from two publisher connections (latency.sh, one
#     connection tops out near 80 k frames/s here): frames made durable per second,
#     frame→queryable p50/p99 and peak RSS. Past saturation fleetpipe should hold its rate and its
#     memory while the excess waits in the broker (acks withheld): backpressure, not collapse.
#
#   load-tests/scale.sh              full sizes (about 15 minutes on 2 cores)
#   SMOKE=1 load-tests/scale.sh      tiny sizes: proves the script works, judges nothing
#
# Raw outputs go to load-tests/results/scale/ (replaced on each run), the tables to table.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
source load-tests/lib.sh
if [ "${SMOKE:-0}" = 1 ]; then
  FRAMES=20000; ALL="1000 10000"; SECS=3
else
  FRAMES=2000000; ALL="1000 10000 100000 1000000"; SECS=20
fi
L1_LIST="$ALL"
# VEHICLES_LIST="1000000" re-runs only those counts, keeping the other counts' earlier outputs.
VEHICLES_LIST="${VEHICLES_LIST:-$ALL}"
build_release
OUT=load-tests/results/scale
if [ "$VEHICLES_LIST" = "$ALL" ]; then rm -rf "$OUT"; fi
mkdir -p "$OUT"; rm -f "$OUT"/l1_* "$OUT"/rate_* "$OUT"/table.txt

for n in $VEHICLES_LIST; do
  echo "== $n vehicles"
  load-tests/mqtt_ratio.sh "$FRAMES" "$n" 1 2>&1 | grep -v Warning | tee "$OUT/vehicles_$n.txt" | tail -2
done
for n in $L1_LIST; do
  { "$BIN/fleetpipe-load" l1-bytes --vehicles "$n"; "$BIN/fleetpipe-load" l1-bytes --bare-moka --vehicles "$n"; } | tee "$OUT/l1_$n.txt"
done

first=${ALL%% *}
capacity=$(awk '$1=="median" && $2==1 {print $4}' "$OUT/vehicles_$first.txt")
for f in 0.25 0.5 1 1.5 2; do
  rate=$(python3 -c "print(int($capacity * $f))")
  echo "== $rate frames/s offered ($f × capacity)"
  PUBLISHERS=2 load-tests/latency.sh "$rate" 1000 "$SECS" 2>&1 | grep -v Warning | tee "$OUT/rate_$f.txt" | tail -3
done

{
  echo
  echo "fleetpipe scale curves, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $FRAMES frames per vehicle count${SMOKE:+ (SMOKE: sizes too small to judge)}"
  printf '%-10s %5s %14s %16s %7s %9s %14s %18s\n' vehicles qos "bare /s" "durable /s" ratio "RSS MiB" "L1 B/vehicle" "moka alone B/entry"
  for n in $ALL; do
    [ -f "$OUT/vehicles_$n.txt" ] || continue
    l1=$(sed -nE 's/.* ([0-9]+) bytes per vehicle.*/\1/p' "$OUT/l1_$n.txt" 2>/dev/null || true)
    mk=$(sed -nE 's/.* ([0-9]+) bytes per entry.*/\1/p' "$OUT/l1_$n.txt" 2>/dev/null || true)
    for q in 0 1; do
      awk -v n="$n" -v q="$q" -v l1="${l1:--}" -v mk="${mk:--}" '$1=="median" && $2==q {printf "%-10s %5s %14s %16s %7s %9s %14s %18s\n", n, q, $3, $4, $6, $8, (q==1 ? l1 : ""), (q==1 ? mk : "")}' "$OUT/vehicles_$n.txt"
    done
  done
  echo
  echo "frame rate sweep, 1000 vehicles, QoS 1, $SECS s per step; capacity = $capacity frames/s durable at $first vehicles above"
  printf '%-8s %12s %12s %14s %10s %10s %9s\n' "× cap" "offered /s" "sent /s" "durable /s" "p50 ms" "p99 ms" "RSS MiB"
  for f in 0.25 0.5 1 1.5 2; do
    python3 - "$f" "$OUT/rate_$f.txt" <<'PY'
import re, sys
f, text = sys.argv[1], open(sys.argv[2]).read()
lat = re.search(r"at (\d+)/s target \((\d+)/s sent\), \d+ probes, p50 ([\d.]+) ms, p99 ([\d.]+) ms", text)
dur = re.search(r"durable in \d+ s \((\d+)/s\)", text)
rss = re.search(r"peak RSS: (\d+) MiB", text)
g = lambda m, i: m.group(i) if m else "-"
print(f"{f:<8} {g(lat,1):>12} {g(lat,2):>12} {g(dur,1):>14} {g(lat,3):>10} {g(lat,4):>10} {g(rss,1):>9}")
PY
  done
} | tee "$OUT/table.txt"

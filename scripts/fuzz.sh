#!/usr/bin/env bash
# Fuzzes every decoder fleetpipe has, SECS seconds per target (default 20):
#
#   ./scripts/fuzz.sh [SECS] [TARGET...]
#
# Targets (fuzz/fuzz_targets/): decode_json, decode_ndjson, decode_protobuf, decode_mqtt (topic
# parsing and payload), stored (Redis values and stored Protobuf, the trusted path), log_record
# (a write-ahead log record as the replay reads it), decode_teltonika_tcp (a tracker's TCP stream
# after the handshake, packet after packet) and decode_teltonika_udp (a datagram). Each decoding target also checks that no
# frame goes missing (accepted + rejected = received) and that every accepted frame validates.
#
# cargo-fuzz and libFuzzer on the stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc take the
# -Z flags cargo-fuzz passes; no sanitizer (the code is safe Rust: `unsafe_code` is forbidden),
# so a finding is a panic, an abort or a timeout. The corpus starts from the committed seeds
# (fuzz/seeds/, taken from tests/data and the contract's examples) and grows under
# ~/.cache/fleetpipe/fuzz-corpus; a crash is written to fuzz/artifacts/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-20}"
shift || true
CACHE="$HOME/.cache/fleetpipe"
if ! command -v cargo-fuzz >/dev/null 2>&1 && [ ! -x "$CACHE/cargo-fuzz/bin/cargo-fuzz" ]; then
  echo "installing cargo-fuzz into $CACHE/cargo-fuzz (once)"
  env -u CARGO_TARGET_DIR cargo install --locked --quiet cargo-fuzz --root "$CACHE/cargo-fuzz"
fi
export PATH="$CACHE/cargo-fuzz/bin:$PATH"
export RUSTC_BOOTSTRAP=1
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode_json decode_ndjson decode_protobuf decode_mqtt stored log_record decode_teltonika_tcp decode_teltonika_udp)
for t in "${targets[@]}"; do
  corpus="$CACHE/fuzz-corpus/$t"
  mkdir -p "$corpus" "fuzz/seeds/$t"
  echo "== fuzz $t for ${SECS}s"
  cargo fuzz run --fuzz-dir fuzz --target-dir "$CACHE/fuzz-target" --sanitizer none "$t" \
    "$corpus" "fuzz/seeds/$t" -- -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1 2>&1 | grep -E "^(stat::number_of_executed_units|stat::new_units_added|==|INFO: -max_total_time|Done)|panicked|ERROR|SUMMARY" || true
  test "${PIPESTATUS[0]}" -eq 0 || { echo "fuzz target $t failed (see fuzz/artifacts/$t)" >&2; exit 1; }
done

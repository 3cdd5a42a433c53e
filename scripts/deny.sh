#!/usr/bin/env bash
# Licences, bans (duplicate versions, wildcards) and sources of every dependency, by cargo deny
# (deny.toml); installs cargo-deny into ~/.cache/fleetpipe once. Needs only the crates registry (for
# crate manifests not downloaded yet), not the advisory database. The
# advisory check is not run here: see deny.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="$HOME/.cache/fleetpipe"
if ! command -v cargo-deny >/dev/null 2>&1 && [ ! -x "$CACHE/cargo-deny/bin/cargo-deny" ]; then
  echo "installing cargo-deny into $CACHE/cargo-deny (once)"
  env -u CARGO_TARGET_DIR cargo install --locked --quiet cargo-deny --root "$CACHE/cargo-deny"
fi
export PATH="$CACHE/cargo-deny/bin:$PATH"
cargo deny check licenses bans sources

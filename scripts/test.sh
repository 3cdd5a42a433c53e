#!/usr/bin/env bash
# Installs (Debian packages) what fleetpipe's tests need, reuses what is already running, and
# runs the whole test suite: Mosquitto and tansu (tests start their own brokers on free ports),
# PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 (tests use their own schemas and key
# prefixes), Python confluent-kafka (the independent Kafka client of the tests).
# Tests leave nothing behind. A full run also validates the Kubernetes manifests under deploy/.
#   ./scripts/test.sh            # everything
#   ./scripts/test.sh crash      # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
need_pkgs=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_pkgs+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_pkgs+=(mosquitto-clients)
command -v cc >/dev/null 2>&1 || need_pkgs+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need_pkgs+=(pkg-config)
# librdkafka's TLS (rdkafka's `ssl` feature) links the system OpenSSL.
pkg-config --exists openssl 2>/dev/null || need_pkgs+=(libssl-dev)
# The TLS terminator in front of the test Kafka broker.
command -v socat >/dev/null 2>&1 || need_pkgs+=(socat)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi
port_open() { (echo > "/dev/tcp/127.0.0.1/$1") >/dev/null 2>&1; }
wait_port() { for _ in $(seq 1 150); do port_open "$1" && return 0; sleep 0.2; done; echo "nothing on port $1" >&2; return 1; }

# PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth for local TCP): reuse, else install/start.
if ! port_open 5432; then
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    echo "installing postgresql"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql
  fi
  ver=$(ls /etc/postgresql | sort -V | tail -1)
  hba="/etc/postgresql/$ver/main/pg_hba.conf"
  # The tests connect as postgres over TCP without a password, as on the development machines.
  grep -q "fleetpipe tests" "$hba" || $SUDO sed -i "1i # fleetpipe tests: trust local TCP\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust" "$hba"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start || $SUDO pg_ctlcluster "$ver" main start
  wait_port 5432
fi
# Redis on 127.0.0.1:6379: reuse, else install/start (nothing kept on disk).
if ! port_open 6379; then
  command -v redis-server >/dev/null 2>&1 || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server; }
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  wait_port 6379
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (https://rustup.rs) first" >&2
  exit 1
fi

# Kafka: the tests start their own tansu broker (Kafka-compatible, in-memory) on free ports, and
# check fleetpipe's topics with an independent client, Python confluent-kafka; the gateway tests
# use Python Paho as an independent MQTT client. All are installed once under ~/.cache/fleetpipe
# (tansu builds from crates.io in several minutes).
CACHE="$HOME/.cache/fleetpipe"
if [ -z "${FLEETPIPE_TANSU:-}" ] && [ ! -x "$CACHE/tansu/bin/tansu" ]; then
  echo "installing tansu into $CACHE/tansu (once)"
  env -u CARGO_TARGET_DIR cargo install --locked --quiet tansu --features dynostore --root "$CACHE/tansu"
fi
if [ -z "${FLEETPIPE_PYTHON:-}" ] && ! "$CACHE/py/bin/python" -c 'import confluent_kafka, paho.mqtt' >/dev/null 2>&1; then
  command -v python3 >/dev/null 2>&1 || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-venv; }
  [ -x "$CACHE/py/bin/pip" ] || python3 -m venv "$CACHE/py"
  "$CACHE/py/bin/pip" install --quiet --disable-pip-version-check confluent-kafka 'paho-mqtt>=2,<3'
fi
# The console's browser test: Debian's chromium, Node.js, and playwright-core from npm (pinned in
# tests/console/package-lock.json; it drives that chromium, no browser download).
browser_pkgs=()
[ -x /usr/bin/chromium ] || [ -n "${CHROMIUM:-}" ] || browser_pkgs+=(chromium)
command -v node >/dev/null 2>&1 || browser_pkgs+=(nodejs)
command -v npm >/dev/null 2>&1 || browser_pkgs+=(npm)
if [ ${#browser_pkgs[@]} -gt 0 ]; then
  echo "installing: ${browser_pkgs[*]}"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${browser_pkgs[@]}"
fi
if ! cmp -s tests/console/package-lock.json "$CACHE/node/package-lock.json" || [ ! -d "$CACHE/node/node_modules/playwright-core" ]; then
  mkdir -p "$CACHE/node"
  cp tests/console/package.json tests/console/package-lock.json "$CACHE/node/"
  npm ci --prefix "$CACHE/node" --ignore-scripts --no-audit --no-fund --loglevel=error
fi
command -v openssl >/dev/null 2>&1 || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openssl; }

# Build outside the clone so repeated runs reuse it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fleetpipe/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets "$@"

# The Kubernetes manifests, offline (yamllint, kubernetes-validate, structural checks), on a
# full run only.
if [ $# -eq 0 ]; then
  deploy/validate.sh
fi

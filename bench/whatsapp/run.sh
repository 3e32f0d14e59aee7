#!/usr/bin/env bash
# Builds wa-session (as the image does) and wa-emulator in release mode and measures the
# whatsapp engine's resident memory: fresh store without network, connected and idle, and after 1,000 sends,
# against the WhatsApp protocol emulator. Figures go to BENCHMARKS.md ("whatsapp engine")
# together with this command.
#
#   bench/whatsapp/run.sh [bench.py options, e.g. --sends 1000 --settle 10]
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# wa-session exactly as docker/Dockerfile builds it (features are unified across the packages
# of one invocation; building it together with the emulator would give another binary).
cargo build --release --locked -p wa-operator -p wa-gateway -p wa-session --bin wa-session >&2
cargo build --release --locked -p wa-emulator >&2
# Whether the binary's functions sit in the order session-pod/wa-session.order lists them.
python3 bench/session-pod/order.py --check --bin "$CARGO_TARGET_DIR/release/wa-session"
exec python3 bench/whatsapp/bench.py \
  --bin "$CARGO_TARGET_DIR/release/wa-session" \
  --emulator "$CARGO_TARGET_DIR/release/wa-emulator" "$@"

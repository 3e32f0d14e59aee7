#!/usr/bin/env bash
# Regenerates session-pod/wa-session.order (the functions a session runs, which the release
# link places together; see bench/session-pod/order.py). Builds wa-session as the image does,
# without the current list (so the recording does not depend on it), and wa-emulator, then
# records the scenarios under valgrind's callgrind (a few minutes).
#
#   bench/session-pod/order.sh [order.py options]
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
command -v valgrind >/dev/null || { echo "order.sh: needs valgrind (apt-get install valgrind)" >&2; exit 2; }
WA_SESSION_ORDER=0 cargo build --release --locked -p wa-operator -p wa-gateway -p wa-session --bin wa-session >&2
cargo build --release --locked -p wa-emulator >&2
exec python3 bench/session-pod/order.py \
  --bin "$CARGO_TARGET_DIR/release/wa-session" \
  --emulator "$CARGO_TARGET_DIR/release/wa-emulator" "$@"

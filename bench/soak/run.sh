#!/usr/bin/env bash
# Load and soak: open-loop sends through `wa-gateway local` to sandbox sessions (one
# `wa-session` process each), then an accounting of every message and the memory of every
# process. Release builds. The load generator is `wa-soak` (tests/src/bin/wa-soak.rs, a
# Rust program: one tokio thread, requests due at a fixed rate whatever the answers do).
#
#   bench/soak/run.sh                                   # 50 sessions, 1000/s, 600 s, SQLite
#   bench/soak/run.sh --rate 400 --duration 120         # any wa-soak flag passes through
#   bench/soak/run.sh --postgres postgres://postgres@127.0.0.1:5432/postgres
#   NO_BUILD=1 bench/soak/run.sh ...                    # use the release binaries as they are
#
# Writes the report (Markdown) to bench/out/soak-<time>/report.md, with the gateway's and the
# sessions' logs next to it; exits 1 when a check fails. `wa-soak --help` lists the bounds.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/wa-operator/target}"
if [ -z "${NO_BUILD:-}" ]; then
  cargo build --release --locked -q -p wa-gateway --bin wa-gateway -p wa-session --bin wa-session -p wa-tests --bin wa-soak
fi
BIN="$CARGO_TARGET_DIR/release"
OUT="bench/out/soak-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
echo "bench/soak: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) before the run; output in $OUT" >&2
exec "$BIN/wa-soak" --gateway-bin "$BIN/wa-gateway" --session-bin "$BIN/wa-session" --work-dir "$OUT" \
  --sessions 50 --rate 1000 --duration 600 --warmup 60 "$@"

#!/usr/bin/env bash
# Load (issue 7, item 3), short: the same program and checks as the 10-minute soak
# (bench/soak/run.sh), on the debug build, with 10 sandbox sessions at 100 sends/s for 40 s:
# the rate is held with no error, every accepted message ends `read` in the gateway's store
# (so its `sent` answer and both receipts arrived), the gateway's and the pods' counters
# agree with the store, no process restarted, and neither the gateway's nor any pod's VmRSS
# grows past its bound after the warm-up. About 55 s. RELIABILITY.md ("Load and soak") says
# what this proves and what it does not.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${CARGO_TARGET_DIR:-target}/debug"
if [ ! -x "$BIN/wa-soak" ] || [ ! -x "$BIN/wa-gateway" ] || [ ! -x "$BIN/wa-session" ]; then
  cargo build -q --locked -p wa-gateway --bin wa-gateway -p wa-session --bin wa-session -p wa-tests --bin wa-soak
fi
timeout 150 "$BIN/wa-soak" --gateway-bin "$BIN/wa-gateway" --session-bin "$BIN/wa-session" \
  --sessions 10 --rate 100 --duration 40 --warmup 15 --drain-timeout 30 \
  --max-p99-ms 2000 --gateway-growth-mib 16 --pod-growth-mib 4

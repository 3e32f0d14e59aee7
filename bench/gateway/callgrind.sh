#!/usr/bin/env bash
# The gateway's CPU cost per send in instructions, counted by valgrind's callgrind: the same
# whatever else the machine is doing (wall-clock CPU figures on a shared machine are not).
# `wa-gateway local` runs under callgrind (its session process does not); after the session
# is connected the counters are zeroed, N sends go through the gateway from C client threads,
# then the run waits until the pod's events for them have been applied, and the counters are
# dumped. The gateway's idle work over the same time (outbox poll, metrics collector) is
# measured first and subtracted.
#
#   bench/gateway/callgrind.sh                      # N=2000 C=1, receipts pushed an hour out (as run.sh)
#   N=2000 C=16 RECEIPTS=1 bench/gateway/callgrind.sh   # with delivered+read receipts (3 events per send)
#   WA_GATEWAY_BIN=/path/to/wa-gateway bench/gateway/callgrind.sh
#
# Prints instructions per send; leaves the callgrind profile in bench/out/callgrind-<label>/
# (callgrind_annotate --inclusive=yes <file> | head -80 shows where they go).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
N=${N:-2000}
C=${C:-1}
IDLE=${IDLE:-10}
RECEIPTS=${RECEIPTS:-0}
DB=${DB:-sqlite}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/wa-operator/target}"
BIN="${WA_GATEWAY_BIN:-$CARGO_TARGET_DIR/release/wa-gateway}"
LABEL="${LABEL:-n$N-c$C-r$RECEIPTS-$DB}"
OUT="$ROOT/bench/out/callgrind-$LABEL"
rm -rf "$OUT"; mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/wa-callgrind.XXXXXX)
GW_PID=""; PG_DB=""
ADMIN_URL="${WA_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
cleanup() {
  [ -n "$GW_PID" ] && kill -TERM "$GW_PID" 2>/dev/null && wait "$GW_PID" 2>/dev/null || true
  [ -n "$PG_DB" ] && psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GW_PORT=$(free_port)
KEY=bench-admin-key-0123456789
unset DATABASE_URL
if [ "$DB" = postgres ]; then
  PG_DB="wa_callgrind_$$"
  psql -q "$ADMIN_URL" -c "CREATE DATABASE $PG_DB" >/dev/null
  export DATABASE_URL="${ADMIN_URL%/*}/$PG_DB"
fi
if [ "$RECEIPTS" = 1 ]; then
  RECEIPT_ENV=(--session-env WA_SANDBOX_DELIVERED_MS=50 --session-env WA_SANDBOX_READ_MS=100)
else
  RECEIPT_ENV=(--session-env WA_SANDBOX_DELIVERED_MS=3600000 --session-env WA_SANDBOX_READ_MS=3600000)
fi
WA_ADMIN_KEY=$KEY WA_GATEWAY_LOG=warn valgrind --tool=callgrind --trace-children=no \
  --callgrind-out-file="$OUT/callgrind.out.%p" \
  "$BIN" local --data-dir "$WORK/data" --listen "127.0.0.1:$GW_PORT" \
  --scrape-interval-seconds 15 \
  --session-env WA_RATE_PER_MINUTE=6000000 --session-env WA_RATE_BURST=1000000 \
  "${RECEIPT_ENV[@]}" --session-env WA_LOG=warn >"$OUT/gateway.out" 2>"$OUT/gateway.err" &
GW_PID=$!
GW="http://127.0.0.1:$GW_PORT"
. bench/gateway/session.sh
connect_bench_session 60

total() { # instructions counted since the last zeroing: dump and read the newest file's totals
  rm -f "$OUT"/callgrind.out.*.[0-9]* 2>/dev/null || true
  callgrind_control -d "$GW_PID" >/dev/null 2>&1
  local f; f=$(ls -t "$OUT"/callgrind.out.*.* | head -1)
  awk '/^(summary|totals):/ {print $2; exit}' "$f"
}
# Warm-up: connections, caches, the statement cache.
python3 bench/gateway/sends.py "$GW" "$SEND_KEY" 50 "$C" >/dev/null
sleep 2

callgrind_control -z "$GW_PID" >/dev/null 2>&1
sleep "$IDLE"
idle_total=$(total)
cp "$(ls -t "$OUT"/callgrind.out.*.* | head -1)" "$OUT/idle.callgrind"
events_before=$(curl -sf "$GW/metrics" | awk '/^wa_gateway_events_total\{type="receipt",result="accepted"\}/ {print $2}')
events_before=${events_before:-0}
per_send=$((RECEIPTS == 1 ? 3 : 1))
callgrind_control -z "$GW_PID" >/dev/null 2>&1
start=$(date +%s.%N)
python3 bench/gateway/sends.py "$GW" "$SEND_KEY" "$N" "$C"
# Wait until every send's events were applied.
want=$((events_before + N * per_send))
for _ in $(seq 1 1200); do
  got=$(curl -sf "$GW/metrics" | awk '/^wa_gateway_events_total\{type="receipt",result="accepted"\}/ {print $2}')
  [ "${got:-0}" -ge "$want" ] && break
  sleep 0.25
done
end=$(date +%s.%N)
load_total=$(total)
cp "$(ls -t "$OUT"/callgrind.out.*.* | head -1)" "$OUT/sends.callgrind"
python3 - "$load_total" "$idle_total" "$IDLE" "$start" "$end" "$N" "$got" "$want" <<'PY' | tee "$OUT/result.txt"
import sys
load, idle, idle_s, start, end, n, got, want = (float(x) for x in sys.argv[1:])
wall = end - start
idle_rate = idle / idle_s
net = load - idle_rate * wall
print(f"instructions: {load:,.0f} during {wall:.1f} s of sends (idle {idle_rate:,.0f}/s subtracted: {idle_rate*wall:,.0f})")
print(f"receipt events applied: {got:.0f} of {want:.0f} expected")
print(f"per send: {net/n:,.0f} instructions")
PY
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/result.txt"

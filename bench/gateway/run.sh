#!/usr/bin/env bash
# Gateway overhead: sends through the gateway vs straight to the session pod vs through
# nginx to the same pod, with wrk at a fixed concurrency. Release build, local mode, SQLite,
# one sandbox session with its rate limit raised for the run.
#
#   bench/gateway/run.sh                 # defaults: 2 wrk threads, 32 connections, 20 s per run
#   CONNECTIONS=64 DURATION=30 bench/gateway/run.sh
#   WA_GATEWAY_BIN=target/release/wa-gateway bench/gateway/run.sh   # skip the build
#   DB=postgres bench/gateway/run.sh     # the gateway on PostgreSQL (a fresh database on
#                                        # WA_TEST_POSTGRES_URL's server, dropped afterwards)
#
# Prints a Markdown table (also written to bench/out/gateway-<db>.md) with requests/s and the
# latency percentiles wrk reports, and the ratios the targets are stated in.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-32}
DURATION=${DURATION:-20}
WARMUP=${WARMUP:-5}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/wa-operator/target}"

for tool in wrk nginx curl python3; do
  command -v "$tool" >/dev/null || { echo "bench/gateway: $tool is needed (Debian: wrk, nginx-light)" >&2; exit 1; }
done
# WA_GATEWAY_BIN=<path> measures an already built release binary instead of building one.
BIN="${WA_GATEWAY_BIN:-}"
if [ -z "$BIN" ]; then
  cargo build --release -q -p wa-gateway --bin wa-gateway
  BIN="$CARGO_TARGET_DIR/release/wa-gateway"
fi

WORK=$(mktemp -d /tmp/wa-bench-gateway.XXXXXX)
OUT="$ROOT/bench/out"; mkdir -p "$OUT"
GW_PID=""; NGINX_STARTED=""; PG_DB=""
ADMIN_URL="${WA_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
cleanup() {
  [ -n "$NGINX_STARTED" ] && nginx -c "$WORK/nginx.conf" -p "$WORK" -s stop 2>/dev/null || true
  [ -n "$GW_PID" ] && kill -TERM "$GW_PID" 2>/dev/null && wait "$GW_PID" 2>/dev/null || true
  [ -n "$PG_DB" ] && psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GW_PORT=$(free_port); NGINX_PORT=$(free_port)
KEY=bench-admin-key-0123456789
unset DATABASE_URL
if [ "${DB:-sqlite}" = postgres ]; then
  PG_DB="wa_bench_$$"
  psql -q "$ADMIN_URL" -c "CREATE DATABASE $PG_DB" >/dev/null
  export DATABASE_URL="${ADMIN_URL%/*}/$PG_DB"
fi
# Receipts far in the future: no event traffic competes with the sends being measured.
WA_ADMIN_KEY=$KEY WA_GATEWAY_LOG=warn "$BIN" local --data-dir "$WORK/data" --listen "127.0.0.1:$GW_PORT" \
  --scrape-interval-seconds 15 \
  --session-env WA_RATE_PER_MINUTE=6000000 --session-env WA_RATE_BURST=1000000 \
  --session-env WA_SANDBOX_DELIVERED_MS=3600000 --session-env WA_SANDBOX_READ_MS=3600000 \
  --session-env WA_LOG=warn >"$WORK/gateway.out" 2>"$WORK/gateway.err" &
GW_PID=$!
GW="http://127.0.0.1:$GW_PORT"
. bench/gateway/session.sh
connect_bench_session 10

# The pod's address and token, from its environment (the same user started it).
POD_PID=$(cat "$WORK/data/run/bench.pid")
pod_env() { tr '\0' '\n' <"/proc/$POD_PID/environ" | sed -n "s/^$1=//p"; }
POD_ADDR=$(pod_env WA_LISTEN); POD_TOKEN=$(pod_env WA_TOKEN)
POD="http://$POD_ADDR"; POD_PORT=${POD_ADDR##*:}

sed -e "s|@DIR@|$WORK|g" -e "s|@POD_PORT@|$POD_PORT|g" -e "s|@NGINX_PORT@|$NGINX_PORT|g" \
  bench/gateway/nginx.conf.in >"$WORK/nginx.conf"
nginx -c "$WORK/nginx.conf" -p "$WORK" -e "$WORK/nginx-error.log"
NGINX_STARTED=1
NGINX="http://127.0.0.1:$NGINX_PORT"

# CPU time (ticks of 1/CLK_TCK s) used so far by the given processes.
TICK_HZ=$(getconf CLK_TCK)
cpu_ticks() {
  local total=0 pid
  for pid in "$@"; do
    [ -r "/proc/$pid/stat" ] || continue
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$total"
}
nginx_pids() { pgrep -P "$(cat "$WORK/nginx.pid")" | tr '\n' ' '; }

# run <label> <connections> <url> <path> <bearer> <idempotency 0|1> <proxy pids…>
declare -A RPS P50 P90 P99 PROXY_US POD_US GW_US
run() {
  local label=$1 conns=$2 url=$3 path=$4 bearer=$5 idem=$6; shift 6
  local proxies=("$@")
  WA_PATH=$path WA_KEY=$bearer WA_IDEM=$idem wrk -t"$THREADS" -c"$conns" -d"${WARMUP}s" -s bench/gateway/send.lua "$url" >/dev/null
  local log="$OUT/gateway-wrk-$label.txt"
  local proxy0 pod0 proxy1 pod1 gw0 gw1
  proxy0=$(cpu_ticks "${proxies[@]}"); pod0=$(cpu_ticks "$POD_PID"); gw0=$(cpu_ticks "$GW_PID")
  WA_PATH=$path WA_KEY=$bearer WA_IDEM=$idem wrk -t"$THREADS" -c"$conns" -d"${DURATION}s" --latency -s bench/gateway/send.lua "$url" >"$log"
  proxy1=$(cpu_ticks "${proxies[@]}"); pod1=$(cpu_ticks "$POD_PID"); gw1=$(cpu_ticks "$GW_PID")
  if grep -q "Non-2xx" "$log"; then echo "bench/gateway: $label got errors:" >&2; cat "$log" >&2; exit 1; fi
  local requests
  requests=$(awk '/requests in/ {print $1}' "$log")
  RPS[$label]=$(awk '/^Requests\/sec/ {print $2}' "$log")
  P50[$label]=$(awk '$1=="50%" {print $2}' "$log")
  P90[$label]=$(awk '$1=="90%" {print $2}' "$log")
  P99[$label]=$(awk '$1=="99%" {print $2}' "$log")
  PROXY_US[$label]=$(python3 -c "print(round(($proxy1-$proxy0)/$TICK_HZ*1e6/$requests, 1))")
  POD_US[$label]=$(python3 -c "print(round(($pod1-$pod0)/$TICK_HZ*1e6/$requests, 1))")
  # The gateway works in every run: the pod delivers each send's "sent" receipt to it.
  GW_US[$label]=$(python3 -c "print(round(($gw1-$gw0)/$TICK_HZ*1e6/$requests, 1))")
  echo "  $label: ${RPS[$label]} req/s, p50 ${P50[$label]}, p99 ${P99[$label]}, CPU/request: proxy ${PROXY_US[$label]} us, pod ${POD_US[$label]} us, gateway ${GW_US[$label]} us" >&2
}

LOW=${LOW_CONNECTIONS:-1}
echo "wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s (after ${WARMUP}s warm-up), one sandbox session; then -c$LOW" >&2
NG=$(nginx_pids)
run pod           "$CONNECTIONS" "$POD"   /v1/messages                "$POD_TOKEN" 0
run pod-idem      "$CONNECTIONS" "$POD"   /v1/messages                "$POD_TOKEN" 1
run nginx         "$CONNECTIONS" "$NGINX" /v1/messages                "$POD_TOKEN" 0 $NG
run nginx-idem    "$CONNECTIONS" "$NGINX" /v1/messages                "$POD_TOKEN" 1 $NG
run gateway       "$CONNECTIONS" "$GW"    /v1/sessions/bench/messages "$SEND_KEY"  0 "$GW_PID"
# One request at a time: the latency each hop adds, without queueing at the pod.
THREADS_SAVED=$THREADS; THREADS=1
run pod-idem-c$LOW   "$LOW" "$POD"   /v1/messages                "$POD_TOKEN" 1
run nginx-idem-c$LOW "$LOW" "$NGINX" /v1/messages                "$POD_TOKEN" 1 $NG
run gateway-c$LOW    "$LOW" "$GW"    /v1/sessions/bench/messages "$SEND_KEY"  0 "$GW_PID"
THREADS=$THREADS_SAVED

# Every gateway send was recorded.
RECORDED=$(api "$GW/metrics" | awk -F' ' '/^wa_gateway_messages_accepted_total/ {s+=$2} END {print s}')

to_ms() { python3 -c "import sys; v=sys.argv[1]; u={'us':1e-3,'ms':1,'s':1000}; n=v.rstrip('usm'); print(round(float(n)*u[v[len(n):]],3))" "$1"; }
{
  echo "| path | connections | requests/s | p50 ms | p90 ms | p99 ms | proxy CPU µs/req | pod CPU µs/req | gateway CPU µs/req |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for l in pod pod-idem nginx nginx-idem gateway "pod-idem-c$LOW" "nginx-idem-c$LOW" "gateway-c$LOW"; do
    case $l in *-c$LOW) c=$LOW ;; *) c=$CONNECTIONS ;; esac
    echo "| $l | $c | ${RPS[$l]} | $(to_ms "${P50[$l]}") | $(to_ms "${P90[$l]}") | $(to_ms "${P99[$l]}") | ${PROXY_US[$l]} | ${POD_US[$l]} | ${GW_US[$l]} |"
  done
  echo
  python3 - "${RPS[gateway]}" "${RPS[nginx]}" "${RPS[nginx-idem]}" "$(to_ms "${P99[gateway]}")" "$(to_ms "${P99[pod]}")" "$(to_ms "${P99[pod-idem]}")" \
    "$(to_ms "${P50[gateway-c$LOW]}")" "$(to_ms "${P99[gateway-c$LOW]}")" "$(to_ms "${P50[pod-idem-c$LOW]}")" "$(to_ms "${P99[pod-idem-c$LOW]}")" <<'PY'
import sys
gw, ng, ngi, p99g, p99p, p99pi, l50g, l99g, l50p, l99p = map(float, sys.argv[1:])
print(f"gateway / nginx throughput: {gw/ng:.2f}x; against nginx forwarding the same Idempotency-Key per send: {gw/ngi:.2f}x (target >= 0.8x)")
print(f"p99 added over the pod: {p99g-p99p:.3f} ms (pod without keys), {p99g-p99pi:.3f} ms (pod with keys) at the high concurrency")
print(f"one request at a time: the gateway adds {l50g-l50p:.3f} ms at p50 and {l99g-l99p:.3f} ms at p99 (target <= 1 ms)")
PY
  echo "sends recorded by the gateway (wa_gateway_messages_accepted_total): $RECORDED"
  echo "gateway database: ${DB:-sqlite}"
  echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"
} | tee "$OUT/gateway-${DB:-sqlite}.md"

# Sourced by bench/gateway/run.sh and callgrind.sh: a connected sandbox session "bench" on the
# gateway at $GW (admin key $KEY), and SEND_KEY, a stored key that may only send on it.
# $1: seconds to allow each step (longer under valgrind).
api() { curl -sf -H "Authorization: Bearer $KEY" -H 'content-type: application/json' "$@"; }

connect_bench_session() {
  local tries=$(($1 * 10))
  for _ in $(seq 1 "$tries"); do curl -sf "$GW/healthz" >/dev/null && break; sleep 0.1; done
  api -X POST "$GW/v1/sessions" -d '{"name":"bench","engine":"sandbox"}' >/dev/null
  for _ in $(seq 1 "$tries"); do api "$GW/v1/sessions/bench" | grep -q '"phase":"AwaitingScan","ready":true' && break; sleep 0.1; done
  api -X POST "$GW/v1/sessions/bench/sandbox/scan" >/dev/null
  for _ in $(seq 1 "$tries"); do api "$GW/v1/sessions/bench" | grep -q '"phase":"Connected"' && break; sleep 0.1; done
  # Sends go with a stored key scoped to the session, as a client's would (not the admin key
  # from the environment): the gateway verifies it like any key.
  SEND_KEY=$(api -X POST "$GW/v1/keys" -d '{"name":"bench","permissions":["send"],"sessions":["bench"]}' \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
}

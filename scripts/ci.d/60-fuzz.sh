#!/usr/bin/env bash
# API fuzzing: schemathesis (pinned in scripts/requirements.txt) against the committed
# gateway/openapi.json, on a real `wa-gateway local` with sandbox sessions. At least 1,000
# generated cases; fails on any 5xx, any answer that does not match the document (status,
# content type, headers, body), any schema-invalid request that is accepted, and any panic
# logged by the gateway or a session process. See scripts/checks/fuzz_api.py and
# RELIABILITY.md ("API fuzzing") for what it covers and the figures of the last run.
# Budget: about 2 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v schemathesis >/dev/null; then
  python3 -m pip install -q --disable-pip-version-check "$(grep "^schemathesis==" scripts/requirements.txt)"
fi

BIN="${CARGO_TARGET_DIR:-target}/debug/wa-gateway"
if [ ! -x "$BIN" ]; then
  cargo build -q --locked -p wa-gateway --bin wa-gateway
fi
timeout 300 python3 scripts/checks/fuzz_api.py "$BIN" \
  --max-examples "${WA_FUZZ_MAX_EXAMPLES:-5}" --seed "${WA_FUZZ_SEED:-1}" --min-cases 1000

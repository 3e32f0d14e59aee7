#!/usr/bin/env bash
# The gateway's web page, clicked through in headless Chromium: Debian's chromium driven by
# Playwright (PyPI; its own browser download is never used). The test starts a real
# `wa-gateway local` with sandbox sessions; see gateway/tests/browser/test_web.py.
# Idempotent: installs chromium (apt) and playwright (pip) when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v chromium >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if ! python3 -c 'import playwright' 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check "$(grep "^playwright==" scripts/requirements.txt || echo playwright==1.65.2)"
fi

BIN="${CARGO_TARGET_DIR:-target}/debug/wa-gateway"
if [ ! -x "$BIN" ]; then
  cargo build -q -p wa-gateway --bin wa-gateway
fi
CHROMIUM="$(command -v chromium)" timeout 300 python3 gateway/tests/browser/test_web.py "$BIN"

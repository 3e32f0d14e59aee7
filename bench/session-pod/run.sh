#!/usr/bin/env bash
# Builds wa-session in release mode and measures its resident memory and start-to-ready time.
# Figures go to BENCHMARKS.md ("Session pod") together with this command.
#
#   bench/session-pod/run.sh [bench.py options, e.g. --sends 10000 --starts 30]
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# Features resolved for the same packages as docker/Dockerfile builds in one invocation (cargo
# unifies features across them), but only the wa-session binary is built: the shipped binary
# differs from a `-p wa-session` build (with the gateway's sqlx, SQLite is compiled in instead
# of linking the system's libsqlite3).
cargo build --release --locked -p wa-operator -p wa-gateway -p wa-session --bin wa-session >&2
# Whether the binary's functions sit in the order session-pod/wa-session.order lists them.
python3 bench/session-pod/order.py --check --bin "$CARGO_TARGET_DIR/release/wa-session"
exec python3 bench/session-pod/bench.py --bin "$CARGO_TARGET_DIR/release/wa-session" "$@"

#!/usr/bin/env bash
# The GPU end-to-end check (bench/gpu_e2e.py) on any CUDA machine, no network needed:
#   bash bench/gpu_e2e.sh OUT_DIR [--parts recipe,pool,bash,resume,fast,flags,inference]
# Writes OUT_DIR/e2e.json; commit it as docs/perf/<device>-<date>.json with its table in
# docs/performance.md. Parts can be split over several calls: the JSON is merged.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_e2e.sh OUT_DIR [gpu_e2e.py flags]}
shift
# shellcheck source=bench/gpu_env.sh
. bench/gpu_env.sh
PYTHON="$PY" exec "$PY" bench/gpu_e2e.py --out "$OUT" "$@"

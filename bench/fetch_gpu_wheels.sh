#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels a GPU box without network needs for the
# benchmark: diffusers (and importlib_metadata, its one requirement such images often lack) and
# bitsandbytes (the adam8bit rows). They land in .whl/ (git-ignored); bench/run_gpu.sh installs
# them into /tmp/site when it finds the folder, so `carry: [".whl"]` is all a remote run needs.
#   bash bench/fetch_gpu_wheels.sh [PYTHON_VERSION]      (default 3.12, the GPU image's)
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PY=${PYTHON:-python3}
mkdir -p .whl
for spec in "diffusers>=0.32,<0.50" importlib_metadata bitsandbytes; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
done
ls -la .whl

# Sourced by the GPU scripts: PY, and diffusers/bitsandbytes from .whl/ on an image without them
# (bench/fetch_gpu_wheels.sh downloads the wheels on a machine with PyPI access).
PY=${PYTHON:-python3}
if [ -d .whl ] && ! "$PY" -c "import diffusers" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

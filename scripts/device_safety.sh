#!/usr/bin/env bash
# The safety issue's checks on the lent GPU, in one call (device tool: bash scripts/device_safety.sh):
# the kernels compiled by this machine's Triton, the repro of the silently-wrong patterns on this
# tree and on an older checkout in .base/ (if carried), then pytest (PYTEST_ARGS, default: every
# test) with long adversarial runs. Logs go to $OUT.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=32 CUDA_MODULE_LOADING=EAGER
OUT=${OUT:-/tmp/a2a-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
python3 -m tests.support.compile_for_gpu 2>&1 | grep -v '^#' | tail -8
if [ "${REPRO:-1}" = 1 ]; then
  if [ -d .base ]; then
    echo "== repro on .base"; (cd .base && PYTHONPATH=$PWD timeout 200 python3 ../scripts/repro_safety.py --runs 6) 2>&1 \
      | tee "$OUT/repro_base.log" | grep -v Warning | tail -10
  fi
  echo "== repro on this tree"; timeout 200 python3 scripts/repro_safety.py --runs 6 2>&1 | tee "$OUT/repro_new.log" \
    | grep -v Warning | tail -10
fi
A2A_TRAFFIC_ROUNDS=${TRAFFIC_ROUNDS:-3000} A2A_GRAPH_REPLAYS=${GRAPH_REPLAYS:-300} timeout ${SUITE_TIMEOUT:-420} \
  python3 -m pytest ${PYTEST_ARGS:-tests} -q -x -p no:cacheprovider --durations=25 -o faulthandler_timeout=150 -s \
  2>&1 | tee "$OUT/pytest.log" | grep -v "^\.\|Warning\|warn" | tail -45
echo "pytest rc=${PIPESTATUS[0]}"

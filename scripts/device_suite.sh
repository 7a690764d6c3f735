#!/usr/bin/env bash
# Everything to check on a lent GPU in one call: the test suite (CPU and CUDA parametrizations),
# the demo, and the kernel report. Logs go to $OUT. Usage (device tool): bash scripts/device_suite.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/a2a-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/device.txt"
timeout ${SUITE_TIMEOUT:-420} python3 -m pytest ${PYTEST_ARGS:-tests} -q -x -p no:cacheprovider --durations=10 \
  -o faulthandler_timeout=120 2>&1 | tee "$OUT/pytest.log" | tail -40
echo "pytest rc=${PIPESTATUS[0]}"
timeout 120 python3 -m examples.demo 2>&1 | tee "$OUT/demo.log"
timeout 120 python3 -m bench.profile.kernel_report 2>&1 | tail -6

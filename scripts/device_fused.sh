#!/usr/bin/env bash
# A fused launch on the lent GPU, in one call (device tool: bash scripts/device_fused.sh): the
# fused limits for the benchmark's round, the GPU tests (PYTEST_ARGS), then bench.run with the
# switch SWITCH (A2A_FUSED_COMBINE, or A2A_FUSED_DISPATCH) on and off, alternated PASSES times,
# FlashInfer next to the first pass (BASELINE=fi_functional with .fi/ carried), and a timeline of
# one round (TIMELINE_TOKENS).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=32 CUDA_MODULE_LOADING=EAGER
OUT=${OUT:-/tmp/a2a-out}; mkdir -p "$OUT"
TOKENS=${TOKENS:-1,16,128}
BASELINE=${BASELINE:-none}
SWITCH=${SWITCH:-A2A_FUSED_COMBINE}
if [ "$BASELINE" = fi_functional ]; then source .fi/setup.sh; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
timeout 120 python3 -m bench.profile.fused_limit 1 16 128 2>&1 | grep "^fused" | tee "$OUT/fused_limit.log"
if [ -n "${PYTEST_ARGS:-}" ]; then
  A2A_TRAFFIC_ROUNDS=${TRAFFIC_ROUNDS:-800} A2A_GRAPH_REPLAYS=${GRAPH_REPLAYS:-200} timeout ${SUITE_TIMEOUT:-300} \
    python3 -m pytest $PYTEST_ARGS -q -x -p no:cacheprovider -o faulthandler_timeout=120 2>&1 | tee "$OUT/pytest.log" \
    | grep -v "^\.\|Warning\|warn" | tail -25
  echo "pytest rc=${PIPESTATUS[0]}"
fi
timeout 120 python3 -m bench.run --ranks 8 --tokens 16 --iterations 5 --out /tmp/warmup >/dev/null 2>&1
for pass in $(seq 1 "${PASSES:-2}"); do
  for fused in 1 0; do
    baseline=none; if [ "$pass" = 1 ] && [ "$fused" = 1 ]; then baseline=$BASELINE; fi
    echo "== pass $pass: $SWITCH=$fused (baseline $baseline)"
    env "$SWITCH=$fused" timeout 200 python3 -m bench.run --ranks 8 --tokens "$TOKENS" --iterations 20 \
      --out "$OUT/fused${fused}_pass$pass" --baseline "$baseline" 2>&1 | grep -v Warning | tail -14
  done
done
for tokens in ${TIMELINE_TOKENS:-16}; do
  for fused in 1 0; do
    echo "== timeline $tokens tokens, $SWITCH=$fused"
    env "$SWITCH=$fused" timeout 100 python3 -m bench.profile.round_timeline "$tokens" 2>&1 \
      | tee "$OUT/timeline_fused${fused}_$tokens.txt" | grep -E "round span|_kernel" | head -40
  done
done

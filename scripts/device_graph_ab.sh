#!/usr/bin/env bash
# Trees against each other in one process on the lent GPU (device tool: bash scripts/device_graph_ab.sh):
# each argument is one bench.profile.graph_ab run, "TREES... -- GRAPH_AB_OPTIONS", e.g.
#   bash scripts/device_graph_ab.sh ".base . .tile1024 -- --tokens 1024 --phases dispatch"
# The trees (git archives of other commits or of variants) must be carried. Logs go to $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/a2a-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
run=0
for spec in "$@"; do
  run=$((run + 1))
  trees=${spec%% -- *}; options=${spec#* -- }
  echo "== graph_ab $run: $trees $options"
  start=$(date +%s)
  # shellcheck disable=SC2086
  PYTHONPATH=$PWD timeout "${AB_TIMEOUT:-280}" python3 -m bench.profile.graph_ab $trees $options 2>&1 \
    | grep -v Warning | tee "$OUT/graph_ab_$run.log" | grep -E "graph ab|Error|Traceback|error"
  echo "   ($(( $(date +%s) - start )) s)"
done

#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over the demo (4 simulated ranks on one GPU, every a2a
# kernel: route, dispatch copy with its barrier, sanitize, combine barrier, gather-reduce) and over a
# staged-combine round. Logs under $OUT. Usage (device tool): bash scripts/sanitize_check.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 A2A_SIGNAL_TIMEOUT_S=120
OUT=${OUT:-/tmp/a2a-out}; mkdir -p "$OUT"
for tool in memcheck racecheck; do
  log="$OUT/sanitizer_$tool.log"
  timeout ${SANITIZER_TIMEOUT:-200} compute-sanitizer --tool $tool --target-processes all --print-limit 10000 \
    python3 -m examples.demo --ranks 3 --tokens 5,0,9 > "$log" 2>&1
  echo "$tool rc=$? : $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|result:' "$log" | tr '\n' ' ')"
  # Device-side findings (kernel memory errors, races) versus host API return codes the driver
  # reports while CUDA libraries probe for entry points (not memory errors).
  echo "  kernel memory errors / hazards: $(grep -cE 'Invalid (__global__|__shared__|__local__)|Race reported|Hazard' "$log")"
  grep -oE 'Program hit [A-Z_]+ \(error [0-9]+\) due to "[^"]+" on CUDA API call to [A-Za-z0-9_]+' "$log" | sort | uniq -c
done

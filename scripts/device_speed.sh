#!/usr/bin/env bash
# Before / after speed on the lent GPU, in one call (device tool: bash scripts/device_speed.sh):
# the benchmark sweep of the base tree in .base/ (git archive of the base commit, carried) and of
# this tree, interleaved base / this / base / this, then each tree's per-kernel durations of one
# round (bench/profile/round_timeline.py, summarised per kernel). Results and logs go to $OUT.
#   BRIEF (0; 1 prints one short line per phase instead of bench.run's: the device tool keeps only the last
#   12,000 characters of a call's output) BASE_DIR (.base: the base tree, carried) BASE_COMMIT (default 544fef1) TOKENS (16,128,1024,4096) TIMELINE_TOKENS (16 1024) PASSES (1) BASELINE (none)
#   HOST_TOKENS (none: e.g. "16 128" times one functional call's host cost in both trees, HOST_RUNS times each,
#   alternated, pinned to one core: bench/profile/host_breakdown.py) HOST_TREE (.base: the older tree to compare,
#   e.g. .pre12) HOST_RUNS (4: one run of a tree can be 2x slower than the next, so compare the fastest runs)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/a2a-out}; mkdir -p "$OUT"
BASE_COMMIT=${BASE_COMMIT:-544fef1}
HEAD_COMMIT=${HEAD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo worktree)}
TOKENS=${TOKENS:-16,128,1024,4096}
# BASELINE: a module with FlashInfer's functional API run next to this tree (bench/baseline.py);
# fi_functional when the prebuilt FlashInfer of ../shared/fi-baseline is carried in .fi/.
BASELINE=${BASELINE:-none}
if [ "$BASELINE" = fi_functional ]; then source .fi/setup.sh; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

brief() {  # bench.run's lines, or with BRIEF=1 "tokens= N phase graph US [baseline US]" only
  if [ "${BRIEF:-0}" = 1 ]; then  # errors are kept
    awk '/tokens=/ { match($0, /tokens= *[0-9]+ [a-z_]+ +graph +[0-9.]+/); line = substr($0, RSTART, RLENGTH)
                     if (match($0, /baseline [0-9.]+/)) line = line " " substr($0, RSTART, RLENGTH)
                     gsub(/ +/, " ", line); print line }
         /Error|Traceback|Timeout/ { print }'
  else
    tail -30
  fi
}

summarise() {  # kernel name -> median duration over the ranks of one replay
  python3 -c '
import collections, statistics, sys
durations = collections.defaultdict(list)
for line in sys.stdin:
    parts = line.split()
    if "round span" in line:
        print(line.strip())
    elif len(parts) >= 4 and parts[0].replace(".", "").replace("-", "").isdigit():
        durations[parts[3]].append(float(parts[2]))
for name, values in durations.items():
    print(f"  {name:40s} x{len(values):2d} median {statistics.median(values):7.1f} us")'
}

# A throw-away round first: on a freshly started machine the first pass's small rounds ran ~3x
# slower on the pure-torch path too (pair 5: 29.9 vs 9.5 us at 1 token), so they compared nothing.
PYTHONPATH=$PWD timeout 120 python3 -m bench.run --ranks 8 --tokens 16 --iterations 5 --out /tmp/warmup >/dev/null 2>&1
for pass in $(seq 1 "${PASSES:-1}"); do
  echo "== pass $pass: base $BASE_COMMIT"
  (cd "${BASE_DIR:-.base}" && PYTHONPATH=$PWD timeout 280 python3 -m bench.run --ranks 8 --tokens "$TOKENS" --iterations 20 \
    --commit "$BASE_COMMIT" --out "$OUT/base$pass") 2>&1 | grep -v Warning | brief
  echo "== pass $pass: this tree $HEAD_COMMIT"
  PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 280 python3 -m bench.run --ranks 8 --tokens "$TOKENS" --iterations 20 --commit "$HEAD_COMMIT" \
    --out "$OUT/new$pass" --baseline "$BASELINE" 2>&1 | grep -v Warning | brief
done
if [ -n "${HOST_TOKENS:-}" ]; then  # host time per functional call, an older tree then this one, alternated
  for run in $(seq 1 "${HOST_RUNS:-4}"); do
    echo "== host per call, run $run: ${HOST_TREE:-.base}, then this tree"
    (cd "${HOST_TREE:-.base}" && PYTHONPATH=$PWD timeout 60 taskset -c 5 python3 ../bench/profile/host_breakdown.py $HOST_TOKENS) \
      2>&1 | grep "^host" | sed "s|^|${HOST_TREE:-.base} |"
    PYTHONPATH=$PWD timeout 60 taskset -c 5 python3 -m bench.profile.host_breakdown $HOST_TOKENS 2>&1 | grep "^host" | sed "s|^|this |"
  done | tee "$OUT/host.log"
fi
for tokens in ${TIMELINE_TOKENS:-16 1024}; do
  echo "== timeline $tokens tokens, base"
  # Older trees kept the timeline script in scripts/, newer ones in bench/profile/.
  timeline=scripts/round_timeline.py; [ -f "${BASE_DIR:-.base}/bench/profile/round_timeline.py" ] && timeline=bench/profile/round_timeline.py
  (cd "${BASE_DIR:-.base}" && PYTHONPATH=$PWD timeout 100 python3 "$timeline" "$tokens") 2>&1 | tee "$OUT/timeline_base_$tokens.txt" | summarise
  echo "== timeline $tokens tokens, this tree"
  PYTHONPATH=$PWD timeout 100 python3 -m bench.profile.round_timeline "$tokens" 2>&1 | tee "$OUT/timeline_new_$tokens.txt" | summarise
done

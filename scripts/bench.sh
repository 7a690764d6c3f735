#!/usr/bin/env bash
# Benchmarks on a lent GPU; results under $OUT. Usage: bash scripts/bench.sh [extra bench.run args]
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/a2a-out}; mkdir -p "$OUT"
timeout ${BENCH_TIMEOUT:-500} python3 -m bench.run --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"

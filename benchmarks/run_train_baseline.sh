#!/usr/bin/env bash
# One device call: our LoRA training throughput per remat policy, then ../shared/bench (HF+PEFT and
# Unsloth) on the same shapes, so every ratio comes from one run. Needs .bench carried (see README).
#   OURS="llama-1b:full,unsloth llama-8b:full,unsloth,selective" BENCH_BUDGET_S=240 bash benchmarks/run_train_baseline.sh
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUTDIR=${OUT:-/tmp/out}; mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/gpu.txt"
for spec in ${OURS:-"llama-1b:full,unsloth,none llama-8b:full,unsloth,selective"}; do
  shape=${spec%%:*}; policies=${spec#*:}
  python3 benchmarks/train_throughput.py --matrix --shapes "$shape" --policies "$policies" \
      --quants "${QUANTS:-bf16}" --steps "${STEPS:-6}" --timeout "${RUN_TIMEOUT:-150}" --out "$OUTDIR/ours_$shape.jsonl" \
      2>&1 | grep -v "^RESULT" | tee -a "$OUTDIR/ours.txt"
done
if [ "${BENCH_BUDGET_S:-0}" -gt 0 ]; then
  SITE=$PWD/.bench/.site BENCH_QUANTS="${BENCH_QUANTS:-bf16}" BENCH_STEPS="${BENCH_STEPS:-6}" \
      bash .bench/run_baselines.sh > "$OUTDIR/bench.log" 2>&1
  cat "$OUTDIR/summary.txt" 2>/dev/null
fi

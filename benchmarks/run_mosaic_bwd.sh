#!/usr/bin/env bash
# GPU: the Mosaic GPU backward kernels, each launch variant in its own process under a timeout
# (a hang costs one variant), then flash_attention end to end (checks + timings vs cuDNN).
#   bash benchmarks/run_mosaic_bwd.sh                 # all
#   PHASES=variants bash benchmarks/run_mosaic_bwd.sh # only the kernel variants
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PHASES=${PHASES:-variants,e2e}
run() { echo "== $*"; timeout "${VT:-150}" python3 benchmarks/bench_mosaic_bwd.py "$@" || echo "   (exit $?)"; }
if [[ $PHASES == *variants* ]]; then
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
  run --kernel dq
  run --kernel dq --kwargs '{"regs": [200, 104]}' --no-baseline
  # the default (pipelined, P^T in registers, setmaxnreg 200/104), then the rows of RESULTS.md 0000
  dkv_variants=('{}' '{"regs": null}' '{"regs": [208, 96]}' '{"p_regs": false, "regs": null}'
                '{"p_regs": false, "regs": [216, 80]}' '{"pipelined": false}')
  for kw in "${dkv_variants[@]}"; do
    run --kernel dkv --kwargs "$kw" --no-baseline
  done
fi
if [[ $PHASES == *e2e* ]]; then
  timeout "${ET:-300}" python3 benchmarks/bench_attention.py --budget 240 --no-sweep --skip-32k \
    --impls "${IMPLS:-ours;ours, RoPE in kernel;ours, Triton dk/dv;ours, Triton bwd;cudnn (pre-rotated);cudnn + XLA RoPE}"
fi

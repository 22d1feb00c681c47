#!/usr/bin/env bash
# Session 13's device call (attention_NOTES.md "Session 13"): the forward with the next softmax under
# PV (overlap) against the default in one process, then end to end with the backward kernels
# un-rotating dq / dk (rope_grad_in_kernel) and the overlapped forward, next to cuDNN + XLA RoPE,
# after their GPU checks; then Nsight Compute kernel times at 2k.
#   bash benchmarks/run_session13.sh     (device tool; BUDGET seconds for bench_attention, default 300)
set -u
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
K='{"ctas": "sms", "key_block": 128'
timeout 200 python3 benchmarks/bench_mosaic_bwd.py --kernel fwd --no-rope --with-32k \
  --kwargs "[$K}, $K, \"overlap\": true}, $K, \"overlap\": true, \"regs\": [240, 24]}]" 2>&1 | grep -v "^W1\|^I1"
timeout $((${BUDGET:-300} + 60)) python3 benchmarks/bench_attention.py --timing-only --checks rope_grad --budget ${BUDGET:-300} \
  --impls "ours;ours, RoPE grad in kernel;ours, fwd overlap;cudnn + XLA RoPE" --seqs 2048,8192,32768 2>&1 | grep -v "^W1\|^I1" | tail -20
timeout 120 python3 benchmarks/ncu_kernel_times.py --attention 2048x8 --impls ours,ours-ropegrad 2>&1 | tail -3

#!/usr/bin/env bash
# Session 13's second device call (attention_NOTES.md "Session 13"): the backward kernels un-rotating
# dq / dk (Tuning.rope_grad_in_kernel) after their GPU checks, end to end next to the default and
# cuDNN + XLA RoPE, then Nsight Compute kernel times of one fwd+bwd call at 2k and 8k.
# (The first call also timed mosaic_forward(overlap=True), commit c424b2d, since removed.)
#   bash benchmarks/run_session13.sh     (device tool)
set -u
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout 300 python3 benchmarks/bench_attention.py --timing-only --checks rope_grad --budget 200 \
  --impls "ours;ours, RoPE grad in kernel;cudnn + XLA RoPE" --seqs 2048,8192,32768 2>&1 | grep -v "^W1\|^I1" | tail -14
for tb in 2048x8 8192x2; do
  timeout 150 python3 benchmarks/ncu_kernel_times.py --attention $tb --impls ours,ours-ropegrad 2>&1 | tail -2
done

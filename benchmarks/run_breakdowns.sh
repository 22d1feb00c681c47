#!/usr/bin/env bash
# Where the time goes, on the GPU (device tool): the NF4 M <= 16 table, then every kernel of one call
# (Nsight Compute durations) of the NF4 op and bf16 matmul at 1024x4096, and of attention fwd+bwd at
# 2k (ours / cuDNN, with and without XLA RoPE), plus their optimized HLO under $OUT.
#   bash benchmarks/run_breakdowns.sh
set -u
OUT=${OUT:-/tmp/breakdowns}; mkdir -p "$OUT"
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
echo "== NF4 table"
timeout 230 python3 benchmarks/bench_nf4.py --out $OUT/nf4 --phases check,table --ms 1,16 --repeat 2 --budget 190 2>&1 | grep -v "cuda_timer\|^W1\|^I1" | tail -45
echo "== NF4 breakdown"
for m in 1 16; do timeout 100 python3 benchmarks/ncu_kernel_times.py --breakdown --shapes 1024x4096 --m $m 2>&1 | tail -4; done
echo "== attention breakdown"
timeout 150 python3 benchmarks/ncu_kernel_times.py --attention 2048x8 2>&1 | tail -6
timeout 60 python3 benchmarks/profile_attention.py --T 2048 --B 8 --impl ours --impl cudnn-rope --impl cudnn --hlo $OUT/hlo_ 2>&1 | tail -3

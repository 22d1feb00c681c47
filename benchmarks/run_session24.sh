#!/usr/bin/env bash
# Session 24 device calls (attention_NOTES.md "Session 24").
#   bash benchmarks/run_session24.sh first   # the fused default's SASS spill map; every kernel of one fwd+bwd at 8k
#                                            # (Nsight durations, ours and cuDNN + XLA RoPE); GPU checks of
#                                            # session 23's cleanup and the standing figures (its `repro`)
. "$(dirname "$0")/device_helpers.sh"
HERE=$(dirname "$0")
case ${1:-first} in
  first)
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
    bash "$HERE/run_session23.sh" spills
    for tb in 8192x2; do
      echo "== breakdown $tb"
      timeout 110 python3 benchmarks/ncu_kernel_times.py --attention $tb --impls ours,cudnn-rope 2>&1 | grep -v "^W1\|^I1" | tail -6
    done
    ROUNDS=10 REPS=2 CHECKS=mosaic_causal_rope_gqa4,mosaic_fused_bwd_rope_gqa4,mosaic_packed_fused_bwd,mosaic_packed_rows_early \
      e2e_group repro_short 180 2048,8192 "ours;cudnn + XLA RoPE"
    ROUNDS=10 REPS=2 e2e_group repro_long 170 16384,32768 "ours;cudnn + XLA RoPE;ours, auto barriers" ;;
  *) echo "usage: $0 first" >&2; exit 2 ;;
esac

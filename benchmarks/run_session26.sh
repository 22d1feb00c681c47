#!/usr/bin/env bash
# Device calls prepared in session 26 (attention_NOTES.md "Session 26"): D = 256 (Gemma) on the Mosaic forward,
# dq and wide dk/dv kernels (RoPE by XLA), and sliding windows on the Mosaic kernels: both opt-in
# (Tuning(mosaic_wide_heads=True, mosaic_windows=True)) until these checks pass; "ours" is the default (Triton there).
#   bash benchmarks/run_session26.sh d256   # (~9 min) the D = 256 and sliding-window checks, then T = 8k, B = 2,
#                                           # Hq/Hkv 16/8 in interleaved rounds: the Mosaic path against cuDNN
#                                           # + XLA RoPE, the default (Triton), the Triton kernels in its place
#                                           # one by one (dk/dv, dq), the forward / dq variants, a window of 1024
. "$(dirname "$0")/device_helpers.sh"
D256_IMPLS="ours, Mosaic D=256 / windows;cudnn + XLA RoPE;ours;ours, Triton dk/dv;ours, Triton bwd;ours, fwd early QK^T;ours, dq V with K;ours, window 1024;ours, Triton, window 1024;cudnn + XLA RoPE, window 1024"
case ${1:-d256} in
  d256)
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
    timeout 540 python3 benchmarks/bench_attention.py --d256-only --checks "d256,window" --budget ${BUDGET:-300} --rounds ${ROUNDS:-3} \
      --reps ${REPS:-5} --d256-impls "${IMPLS:-$D256_IMPLS}" > "$OUT/d256.log" 2>&1
    echo "== d256 rc=$?"; grep -E "FAIL|PASS|correctness|Error|budget" "$OUT/d256.log" | cut -c1-200 | head -20
    grep -E "compiling|spill stores" "$OUT/d256.log" | sed -E 's/.*function .entry_mosaic_gpu_kernel., //' | cut -c1-90
    grep -E "^  T=" "$OUT/d256.log" | cut -c1-230 ;;
  *) echo "usage: $0 d256" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Device calls prepared in session 26 (attention_NOTES.md "Session 26"): D = 256 (Gemma) on the Mosaic forward,
# dq and wide dk/dv kernels (RoPE by XLA), and sliding windows and logit softcaps on the Mosaic kernels: all
# opt-in (Tuning(mosaic_wide_heads=True, mosaic_windows=True, mosaic_softcap=True)) until these checks pass;
# "ours" is the default (Triton there). T = 8k, B = 2, Hq/Hkv 16/8, D = 256, interleaved rounds.
#   bash benchmarks/run_session26.sh d256     # (~8 min) the D = 256 checks; the Mosaic path against cuDNN + XLA
#                                             # RoPE, the default (Triton), the Triton dk/dv or whole backward in
#                                             # its place, and the forward / dq variants
#   bash benchmarks/run_session26.sh checks   # (~4 min; first if the device is scarce) every check of the three
#                                             # opt-in paths, then one short D = 256 round: opt-in, default, cuDNN
#   bash benchmarks/run_session26.sh windows  # (~8 min) the window and softcap checks (D = 128 and 256); a window
#                                             # of 1024 (ours, Triton, cuDNN) and Gemma-2's local layers (window
#                                             # 4096, softcap 50: ours, Triton)
. "$(dirname "$0")/device_helpers.sh"
D256_IMPLS="ours, opt-in Mosaic paths;cudnn + XLA RoPE;ours;ours, Triton dk/dv;ours, Triton bwd;ours, fwd early QK^T;ours, dq V with K"
WINDOW_IMPLS="ours, window 1024;cudnn + XLA RoPE, window 1024;ours, Triton, window 1024;ours, window 4096, softcap 50;ours, Triton, window 4096, softcap 50;cudnn + XLA RoPE"
group() {  # name, checks, impls
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
  timeout 540 python3 benchmarks/bench_attention.py --d256-only --checks "$2" --budget ${BUDGET:-300} --rounds ${ROUNDS:-3} \
    --reps ${REPS:-5} --d256-impls "${IMPLS:-$3}" > "$OUT/$1.log" 2>&1
  echo "== $1 rc=$?"; grep -E "FAIL|PASS|correctness|Error|budget" "$OUT/$1.log" | cut -c1-200 | head -20
  grep -E "compiling|spill stores" "$OUT/$1.log" | sed -E 's/.*function .entry_mosaic_gpu_kernel., //' | cut -c1-90
  grep -E "^  T=" "$OUT/$1.log" | cut -c1-230
}
case ${1:-d256} in
  d256) group d256 d256 "$D256_IMPLS" ;;
  checks) ROUNDS=${ROUNDS:-2} BUDGET=${BUDGET:-90} group checks d256,window,softcap "ours, opt-in Mosaic paths;cudnn + XLA RoPE;ours" ;;
  windows) group windows window,softcap "$WINDOW_IMPLS" ;;
  *) echo "usage: $0 checks|d256|windows" >&2; exit 2 ;;
esac

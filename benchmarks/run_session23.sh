#!/usr/bin/env bash
# (Session 23 removed dq_lag, dq_behind_dk, dq_atomic, static_slots and their impls / checks after timing them; the
# modes that name them, or "ours, fused bwd, no auto barriers" (now "ours, fused bwd"), are refused: run them at 7d53fe3.)
# Session 23 device calls (attention_NOTES.md "Session 23"): dS^T from the 16-bit P^T (ds_from_rounded_p,
# fewer live registers in the dk/dv and fused kernels) and no_auto_barriers re-timed, fwd+bwd against
# cuDNN + XLA RoPE (B*T = 16k, Hq/Hkv 32/8, D 128, causal), in interleaved rounds (bench_attention --rounds:
# every impl in turn each round, the ratio to cuDNN taken per round). Each impl's ptxas spill lines
# follow its "compiling" line in the logs.
#   bash benchmarks/run_session23.sh e2e    # GPU checks of ds_from_rounded_p, then 2k / 8k, 16k, 32k (ran: 3-13%
#                                           # slower; the switch is at d5e3a2b, removed after)
#   bash benchmarks/run_session23.sh slots  # the fused kernel's static_slots (never timed alone) with and without
#                                           # its auto barriers, 8k and 32k, 10 rounds of 2 calls; 2k and the
#                                           # separate kernel's static slots at 8k beside (ran: static slots
#                                           # 1.3-1.9x slower; no_auto_barriers made the fused default after)
#   bash benchmarks/run_session23.sh default  # that default checked and against the one before; dq_behind_dk
#   bash benchmarks/run_session23.sh spills   # where the fused default spills (SASS; not run)
#   (the session's standing figures at the current code, with GPU checks: `run_session24.sh first`)
. "$(dirname "$0")/device_helpers.sh"
case ${1:-e2e} in
  e2e)
    CHECKS=ds_rounded,mosaic_fused_bwd_rope_gqa4,mosaic_packed_rows_early e2e_group short 200 2048,8192 \
      "ours;cudnn + XLA RoPE;ours, ds from rounded P;ours, fused bwd;ours, fused bwd, ds from rounded P"
    e2e_group mid 160 16384 \
      "ours;cudnn + XLA RoPE;ours, ds from rounded P;ours, separate bwd;ours, separate bwd, ds from rounded P;ours, fused bwd, no auto barriers;ours, fused bwd, ds from rounded P, no auto barriers"
    e2e_group long 120 32768 \
      "ours;cudnn + XLA RoPE;ours, ds from rounded P;ours, fused bwd, no auto barriers;ours, fused bwd, ds from rounded P, no auto barriers" ;;
  slots)
    ROUNDS=10 REPS=2 CHECKS=fused_static_slots e2e_group slots8k 160 8192 \
      "ours;cudnn + XLA RoPE;ours, fused bwd;ours, fused bwd, static slots;ours, dk/dv static slots"
    ROUNDS=10 REPS=2 e2e_group slots32k 150 32768 \
      "ours;cudnn + XLA RoPE;ours, fused bwd, static slots;ours, fused bwd, no auto barriers;ours, fused bwd, static slots, no auto barriers"
    ROUNDS=10 REPS=2 e2e_group two_k 60 2048 "ours;cudnn + XLA RoPE"
    for kw in '{"with_dq": true}' '{"with_dq": true, "static_slots": true}'; do  # where the fused kernel spills
      sass_spill_map "$kw" 4 40
    done ;;
  default)  # the fused kernel without auto barriers made default (16k on): checks, against the default before it,
             # and dq_behind_dk (never timed) on top of it
    ROUNDS=10 REPS=2 CHECKS=mosaic_fused_bwd_rope_gqa4,mosaic_packed_fused_bwd_rope,dq_behind_dk e2e_group default 300 16384,32768 \
      "ours;cudnn + XLA RoPE;ours, auto barriers;ours, fused bwd, dq behind dk" ;;
  spills)  # (not run) where the fused kernel spills at the current default (SASS dump + sass_spills.py)
    sass_spill_map '{"with_dq": true, "no_auto_barriers": true}' 3 60 ;;
  *) echo "usage: $0 e2e|slots|default|spills" >&2; exit 2 ;;
esac

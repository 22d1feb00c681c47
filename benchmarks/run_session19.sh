#!/usr/bin/env bash
# (Session 23 removed dq_lag, dq_behind_dk, dq_atomic, static_slots and their impls / checks after timing them; the
# modes that name them, or "ours, fused bwd, no auto barriers" (now "ours, fused bwd"), are refused: run them at 7d53fe3.)
# Session 19 device calls (attention_NOTES.md "Session 19").
#   bash benchmarks/run_session19.sh kernels  # kernels alone, one process each: the dk/dv and fused backward with
#                                             # own_diagonal (each consumer masks only its own diagonal tile, the
#                                             # upper one skips the tile above it) against both masking the first two
#                                             # tiles (ran at 6dc47e4; own_diagonal was slower and is removed: that
#                                             # line fails now); the dq kernel with static consumers against without
#   bash benchmarks/run_session19.sh lag      # (not run yet) the fused backward with dq_lag (each tile's dQ a step late:
#                                             # the consumers meet on a tile a step after writing it), dq_behind_dk (dQ
#                                             # wgmmas issued behind the dK ones), dq_atomic (dQ added from registers by
#                                             # red.global.add, no staging tile); kernels alone, GPU checks, ptxas spills
#   bash benchmarks/run_session19.sh rows     # (not run yet) the dk/dv and fused kernels with rows_early (lse / delta
#                                             # rows loaded before S^T) or static_slots (two steps a loop iteration, slot
#                                             # descriptors constants), the fused one without Pallas' auto barriers around
#                                             # its shared-memory stores, against without, kernels alone
#   bash benchmarks/run_session19.sh e2e      # GPU checks, then fwd+bwd at 8k / 16k / 32k against cuDNN
#   bash benchmarks/run_session19.sh profile [SETTINGS]  # ncu PC sampling of the fused backward at 8k (device_helpers.sh),
#                                             # SETTINGS: its dk/dv kernel keywords as JSON
#   bash benchmarks/run_session19.sh profile_separate [SETTINGS]  # (not run) the same for the dq and dk/dv kernels
. "$(dirname "$0")/device_helpers.sh"  # environment, OUT; ab, bwd_profile, fused_profile
case ${1:-kernels} in
  kernels)
    ab diagonal 300 --kernel bwd --no-rope --kwargs '[{"fused": false, "own_diagonal": false}, {"fused": false}, {"fused": true, "own_diagonal": false}, {"fused": true}]'
    ab dq_static 200 --kernel dq --no-rope --kwargs '[{}, {"static_consumers": true}]' ;;
  rows)  # (not run in session 19: no machine lent after call 2)
    ab rows 540 --kernel bwd --no-rope --kwargs '[{"fused": false}, {"fused": false, "rows_early": true}, {"fused": false, "static_slots": true}, {"fused": false, "rows_early": true, "static_slots": true}, {"fused": true}, {"fused": true, "rows_early": true}, {"fused": true, "static_slots": true}, {"fused": true, "no_auto_barriers": true}]' ;;
  lag)  # (not run in session 19)
    ab lag 540 --kernel bwd --no-rope --skip-2k --kwargs '[{"fused": true}, {"fused": true, "dq_lag": true}, {"fused": true, "dq_behind_dk": true}, {"fused": true, "dq_lag": true, "dq_behind_dk": true}, {"fused": true, "dq_atomic": true}, {"fused": true, "dq_atomic": true, "dq_lag": true}, {"fused": true, "dq_atomic": true, "stages": 3}, {"fused": true, "rows_early": true, "static_slots": true, "no_auto_barriers": true}, {"fused": true, "rows_early": true, "static_slots": true, "no_auto_barriers": true, "dq_lag": true, "dq_atomic": true}]' ;;
  e2e)
    timeout 480 python3 benchmarks/bench_attention.py --timing-only --checks mosaic_causal,fused,rows_early,static_slots,auto_barriers \
      --seqs 8192,16384,32768 --impls "ours;ours, separate bwd;ours, dk/dv rows early;ours, dk/dv static slots;ours, fused bwd;ours, fused bwd, rows early;ours, fused bwd, dq lag;ours, fused bwd, dq behind dk;ours, fused bwd, dq atomic;ours, fused bwd, no auto barriers;cudnn + XLA RoPE" \
      > "$OUT/e2e.log" 2>&1
    echo "== e2e rc=$?"; grep -E "FAIL|PASS|correctness|Error" "$OUT/e2e.log" | head -20; grep -A40 summary "$OUT/e2e.log" ;;
  profile) fused_profile "${2:-}" ;;  # e.g. profile '{"rows_early": true, "no_auto_barriers": true}'
  profile_separate) bwd_profile ours-norope 2 "${2:-}" ;;  # the dq and dk/dv kernels (8k's default path)
  *) echo "usage: $0 kernels|rows|lag|e2e|profile|profile_separate" >&2; exit 2 ;;
esac

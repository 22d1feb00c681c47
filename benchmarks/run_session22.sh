#!/usr/bin/env bash
# (Session 23 removed dq_lag, dq_behind_dk, dq_atomic, static_slots and their impls / checks after timing them; the
# modes that name them, or "ours, fused bwd, no auto barriers" (now "ours, fused bwd"), are refused: run them at 7d53fe3.)
# Session 22 device calls (attention_NOTES.md "Sessions 21-22"): with little device time, session 19's
# variants end to end first (the issue's own figure: fwd+bwd against cuDNN + XLA RoPE, B*T = 16k),
# fewer of them than run_session19.sh e2e, and a time budget so the summary prints before the limit.
#   bash benchmarks/run_session22.sh e2e   # GPU checks (every fused variant, rows_early, static_slots,
#                                          # auto barriers), then 8k and 32k (the impls in the order given: cuDNN second)
#   bash benchmarks/run_session22.sh rows  # (not run) the rows_early default against the order before it (rows late)
#                                          # and cuDNN, 8k and 32k, each timed twice: the A/B behind the new default
#                                          # (at 32k both are the fused default: a same-config noise check)
. "$(dirname "$0")/device_helpers.sh"
case ${1:-e2e} in
  e2e)
    timeout 400 python3 benchmarks/bench_attention.py --timing-only --budget 340 \
      --checks fused,rows_early,static_slots,auto_barriers --seqs 8192,32768 \
      --impls "ours;cudnn + XLA RoPE;ours, separate bwd;ours, dk/dv rows early;ours, fused bwd;ours, fused bwd, rows early;ours, fused bwd, dq lag;ours, fused bwd, no auto barriers;ours, fused bwd, dq atomic;ours, fused bwd, rows early, no auto barriers;ours, fused bwd, all but dq atomic" \
      > "$OUT/e2e.log" 2>&1
    echo "== e2e rc=$?"; grep -E "FAIL|correctness|Error|budget" "$OUT/e2e.log" | head -20; grep -E "^  T=" "$OUT/e2e.log" | cut -c1-160 ;;
  rows)
    timeout 300 python3 benchmarks/bench_attention.py --timing-only --budget 260 --seqs 8192,32768 \
      --impls "ours;ours, dk/dv rows late;cudnn + XLA RoPE;ours;ours, dk/dv rows late" > "$OUT/rows.log" 2>&1
    echo "== rows rc=$?"; grep -E "Error|budget|^  T=" "$OUT/rows.log" | cut -c1-160 ;;
  *) echo "usage: $0 e2e|rows" >&2; exit 2 ;;
esac

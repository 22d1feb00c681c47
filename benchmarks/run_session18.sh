#!/usr/bin/env bash
# Session 18 device calls (attention_NOTES.md "Session 18").
#   bash benchmarks/run_session18.sh fused   # the fused backward with each step's dK wgmmas issued behind its dQ ones
#                                            # (dq_before_dk, FA3's order; removed after this call: run it at c9016f1)
#                                            # against the fused default and the separate kernels (kernels alone,
#                                            # 2k / 8k / 32k, ptxas spills); GPU checks of the fused cases; end to end
#                                            # at 8k / 16k / 32k against cuDNN
#   bash benchmarks/run_session18.sh stalls  # the fused backward with 3 query-tile stages (fits without segment ids),
#                                            # kernels alone; then ncu PC sampling of the fused kernel at 8k, B = 2
#                                            # (where its consumers wait), and cuDNN's tensor-pipe share there
#   bash benchmarks/run_session18.sh static  # dk/dv and fused with static_consumers vs without (kernels alone, spills),
#                                            # GPU checks, end to end at 8k / 32k (ran at a881f22, static off by default;
#                                            # later its bench impls became "ours, dk/dv consumers by index")
#   bash benchmarks/run_session18.sh final   # the defaults (static consumers, fused from 16k) vs cuDNN, 2k-32k
#   bash benchmarks/run_session18.sh next    # (not run) dq with static consumers; the fused kernel's stalls again
. "$(dirname "$0")/device_helpers.sh"  # environment, OUT; ab, fused_profile
case ${1:-stalls} in
  fused)
    ab fused 240 --kernel bwd --no-rope --kwargs '[{"fused": false}, {"fused": true}, {"fused": true, "dq_before_dk": true}]'
    timeout 330 python3 benchmarks/bench_attention.py --timing-only --checks fused --seqs 8192,16384,32768 \
      --impls "ours;ours, fused bwd;ours, fused bwd, dq before dk;cudnn + XLA RoPE" > "$OUT/e2e.log" 2>&1
    echo "== e2e rc=$?"; grep -E "FAIL|PASS|correctness|Error" "$OUT/e2e.log" | head; grep -A16 summary "$OUT/e2e.log" ;;
  stalls)
    ab stages 200 --kernel bwd --no-rope --kwargs '[{"fused": true}, {"fused": true, "stages": 3}]'
    fused_profile ;;
  static)  # each dk/dv consumer its own code (constant buffer indices: wgmma descriptors as immediates); at a881f22
    ab static 250 --kernel bwd --no-rope --kwargs '[{"fused": false}, {"fused": false, "static_consumers": true}, {"fused": true, "static_consumers": true}]'
    timeout 300 python3 benchmarks/bench_attention.py --timing-only --checks static --seqs 8192,32768 \
      --impls "ours, separate bwd;ours, static consumers;ours, fused bwd;ours, fused bwd, static consumers;cudnn + XLA RoPE" > "$OUT/e2e.log" 2>&1
    echo "== e2e rc=$?"; grep -E "FAIL|PASS|correctness|Error" "$OUT/e2e.log" | head; grep -A12 summary "$OUT/e2e.log" ;;
  final)  # the new defaults (static consumers; fused backward from 16k on) end to end against cuDNN, checks first
    timeout 280 python3 benchmarks/bench_attention.py --timing-only --checks mosaic_causal --seqs 2048,8192,16384,32768 \
      --impls "ours;ours, separate bwd;cudnn + XLA RoPE" > "$OUT/e2e.log" 2>&1
    echo "== e2e rc=$?"; grep -E "FAIL|PASS|correctness|Error" "$OUT/e2e.log" | head; grep -A14 summary "$OUT/e2e.log" ;;
  next)  # written for the next session, not run: dq with static consumers (kernel alone, spills), GPU checks, end
          # to end at 8k / 16k; then the fused kernel's stalls again with its descriptors as immediates
    ab dq_static 200 --kernel dq --no-rope --kwargs '[{}, {"static_consumers": true}]'
    timeout 200 python3 benchmarks/bench_attention.py --timing-only --checks static_consumers --seqs 8192,16384 \
      --impls "ours;ours, dq static consumers;ours, fused bwd;cudnn + XLA RoPE" > "$OUT/e2e.log" 2>&1
    echo "== e2e rc=$?"; grep -E "FAIL|PASS|correctness|Error" "$OUT/e2e.log" | head; grep -A10 summary "$OUT/e2e.log"
    fused_profile ;;
  *) echo "usage: $0 fused|stalls|static|final|next" >&2; exit 2 ;;
esac

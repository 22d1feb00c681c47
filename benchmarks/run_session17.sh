#!/usr/bin/env bash
# Session 17 device calls (attention_NOTES.md "Session 17").
#   bash benchmarks/run_session17.sh earlyqk   # forward: the next QK^T issued behind each PV (early_qk) vs the
#                                              # default, in one process (GPU check, 2k / 8k / 32k, ptxas spills);
#                                              # then end to end against cuDNN + XLA RoPE (at HEAD "ours" is early_qk,
#                                              # "ours, fwd QK^T after PV" the old order; call 1 ran at 5a23b56)
#   bash benchmarks/run_session17.sh bwdearly  # the same idea in dq and dk/dv (kernels alone, then end to end);
#                                              # its variants were removed: run it at 425a443
#   bash benchmarks/run_session17.sh verify    # GPU checks with early_qk the default; the forward with tables; dq early
#                                              # with setmaxnreg (240, 24) (that variant: at 425a443..c2a7b73)
#   bash benchmarks/run_session17.sh fusedbwd  # the fused backward, dQ staging double-buffered or not, vs separate
#                                              # (dq_stages: at 3c28c0e; later commits drop that variant)
#   bash benchmarks/run_session17.sh e2e       # the fused backward end to end, 2k / 8k / 16k / 32k (written, not
#                                              # run: no device was lent after the fusedbwd call)
#   bash benchmarks/run_session17.sh fwdstalls # ncu PC sampling of the forward with early_qk (why 8k did not gain); not run
set -u
export PYTHONPATH=$PWD MOSAIC_GPU_DUMP_PTXAS=1
OUT=${OUT:-/tmp/s17}; mkdir -p "$OUT"
ab() {  # name, seconds, bench_mosaic_bwd.py flags...: the timing lines, checks and ptxas spills
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 benchmarks/bench_mosaic_bwd.py --no-baseline --with-32k "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$?"; grep -E " ms |PASS|FAIL|Error|spill stores," "$OUT/$name.log" | sort | uniq -c | sort -k2 | head -24
  echo "wgmma serialized (ptxas C7512): $(grep -c serialized "$OUT/$name.log")"
}
case ${1:-earlyqk} in
  earlyqk)
    P='"ctas": "sms", "key_block": 128'
    ab earlyqk 240 --kernel fwd --no-rope --kwargs "[{$P}, {$P, \"early_qk\": true}, {$P, \"early_qk\": true, \"regs\": [240, 24]}]"
    timeout 300 python3 benchmarks/bench_attention.py --timing-only --impls "ours;ours, fwd QK^T after PV;cudnn + XLA RoPE" \
      --seqs 2048,8192,32768 > "$OUT/e2e.log" 2>&1; echo "== e2e rc=$?"; grep -A12 summary "$OUT/e2e.log" | head -30 ;;
  bwdearly)  # dq (next S, dP behind dQ) and dk/dv (next S^T behind dK) early vs not; then end to end
    ab dq 200 --kernel dq --no-rope --kwargs '[{}, {"early": true}]'
    ab dkv 200 --kernel dkv --no-rope --kwargs '[{}, {"early_s": true}]'
    timeout 300 python3 benchmarks/bench_attention.py --timing-only \
      --impls "ours;ours, bwd early;ours, dq early;ours, dk/dv early;cudnn + XLA RoPE" \
      --seqs 2048,8192,32768 > "$OUT/e2e.log" 2>&1; echo "== e2e rc=$?"; grep -A18 summary "$OUT/e2e.log" | head -30 ;;
  verify)  # the GPU checks of flash_attention's Mosaic cases with early_qk the default (tables, packing
            # included); the forward with RoPE tables (64-key steps, 3 stages) early or not; dq early with registers
    timeout 200 python3 benchmarks/bench_attention.py --timing-only --checks mosaic --seqs 8192 \
      --impls "ours;ours, fwd QK^T after PV;cudnn + XLA RoPE" > "$OUT/checks.log" 2>&1; echo "== checks rc=$?"
    grep -E "FAIL|PASS|correctness" "$OUT/checks.log" | head -30; grep -A4 summary "$OUT/checks.log"
    ab fwd_tables 150 --kernel fwd --kwargs '[{}, {"early_qk": true}]'
    ab dq_regs 200 --kernel dq --no-rope --kwargs '[{"regs": [240, 24]}, {"early": true, "regs": [240, 24]}]' ;;
  fusedbwd)  # the fused backward (dq reduce-added from dk/dv) with 1 or 2 staging tiles vs the separate kernels
    ab fusedbwd 300 --kernel bwd --no-rope --kwargs '[{"fused": false}, {"fused": true}, {"fused": true, "dq_stages": 2}]' ;;
  e2e)  # the fused backward against the separate kernels (the default) and cuDNN, 2k-32k; fused GPU checks first
    timeout 400 python3 benchmarks/bench_attention.py --timing-only --checks fused --seqs 2048,8192,16384,32768 \
      --impls "ours;ours, fused bwd;cudnn + XLA RoPE" > "$OUT/e2e.log" 2>&1; echo "== e2e rc=$?"
    grep -E "FAIL|PASS|correctness" "$OUT/e2e.log" | head; grep -A14 summary "$OUT/e2e.log" ;;
  fwdstalls)  # where the forward's warps wait now (session 16's profile on the early_qk default), 8k, B = 2
    OUT=$OUT bash benchmarks/run_session15.sh fwdstalls 2>&1 | cut -c1-220 | head -120 ;;
  *) echo "usage: $0 earlyqk|bwdearly|verify|fusedbwd|e2e|fwdstalls" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Session 18 device calls (attention_NOTES.md "Session 18").
#   bash benchmarks/run_session18.sh fused   # the fused backward with each step's dK wgmmas issued behind its dQ ones
#                                            # (dq_before_dk, FA3's order) against the fused default and the separate
#                                            # kernels (kernels alone, 2k / 8k / 32k, ptxas spills); then GPU checks
#                                            # of the fused cases and end to end at 8k / 16k / 32k against cuDNN
set -u
export PYTHONPATH=$PWD MOSAIC_GPU_DUMP_PTXAS=1
OUT=${OUT:-/tmp/s18}; mkdir -p "$OUT"
ab() {  # name, seconds, bench_mosaic_bwd.py flags...: the timing lines, checks and ptxas spills
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 benchmarks/bench_mosaic_bwd.py --no-baseline --with-32k "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$?"; grep -E " ms |PASS|FAIL|Error|spill stores," "$OUT/$name.log" | sort | uniq -c | sort -k2 | head -24
  echo "wgmma serialized (ptxas C7512): $(grep -c serialized "$OUT/$name.log")"
}
case ${1:-fused} in
  fused)
    ab fused 240 --kernel bwd --no-rope --kwargs '[{"fused": false}, {"fused": true}, {"fused": true, "dq_before_dk": true}]'
    timeout 330 python3 benchmarks/bench_attention.py --timing-only --checks fused --seqs 8192,16384,32768 \
      --impls "ours;ours, fused bwd;ours, fused bwd, dq before dk;cudnn + XLA RoPE" > "$OUT/e2e.log" 2>&1
    echo "== e2e rc=$?"; grep -E "FAIL|PASS|correctness|Error" "$OUT/e2e.log" | head; grep -A16 summary "$OUT/e2e.log" ;;
  *) echo "usage: $0 fused" >&2; exit 2 ;;
esac

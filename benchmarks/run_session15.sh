#!/usr/bin/env bash
# Session 15 device calls (attention_NOTES.md "Session 15").
#   bash benchmarks/run_session15.sh fold    # forward: scale folded into the exp2 FFMA vs not, in one process;
#                                            # end to end with it; the NF4 Nsight table (M = 1, 16; all compiles before the markers)
#   bash benchmarks/run_session15.sh fused   # the fused backward vs the dq + dk/dv kernels, 2k / 8k / 32k
set -u
export PYTHONPATH=$PWD MOSAIC_GPU_DUMP_PTXAS=1
OUT=${OUT:-/tmp/s15}; mkdir -p "$OUT"
ab() {  # name, bench_mosaic_bwd.py flags...: the timing lines, checks and ptxas spills
  local name=$1; shift
  timeout 240 python3 benchmarks/bench_mosaic_bwd.py --no-rope --no-baseline --with-32k "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$?"; grep -E " ms |PASS|FAIL|Error|spill stores," "$OUT/$name.log" | sort | uniq -c | sort -k2 | head -24
}
case ${1:-fold} in
  fold)
    ab fold --kernel fwd --kwargs '[{"ctas": "sms", "key_block": 128}, {"ctas": "sms", "key_block": 128, "fold_scale": true}]'
    timeout 150 python3 benchmarks/bench_attention.py --timing-only --impls "ours;ours, fwd scale folded;cudnn + XLA RoPE" \
      --seqs 2048,8192,32768 2>&1 | grep -A8 summary
    for m in 1 16; do timeout 130 python3 benchmarks/ncu_kernel_times.py --table --m $m 2> "$OUT/nf4table_$m.err" | cut -c1-150; tail -2 "$OUT/nf4table_$m.err"; done ;;
  fused)
    ab fused --kernel bwd --kwargs '[{"fused": false}, {"fused": true}]' ;;
  *) echo "usage: $0 fold|fused" >&2; exit 2 ;;
esac

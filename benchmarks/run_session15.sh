#!/usr/bin/env bash
# Session 15 device calls (attention_NOTES.md "Session 15").
#   bash benchmarks/run_session15.sh fold    # forward: scale folded into the exp2 FFMA vs not, in one process; + fused vs separate backward
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
    ab fused --kernel bwd --kwargs '[{"fused": false}, {"fused": true}]' ;;
  *) echo "usage: $0 fold" >&2; exit 2 ;;
esac

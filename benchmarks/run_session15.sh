#!/usr/bin/env bash
# Session 15 device calls (attention_NOTES.md "Session 15").
#   bash benchmarks/run_session15.sh fold    # forward: scale folded into the exp2 FFMA vs not, in one process;
#                                            # end to end with it; the NF4 Nsight table (M = 1, 16; all compiles before the markers)
#   bash benchmarks/run_session15.sh nf4     # the NF4 Nsight table at M = 1; dx tile variants at M = 16 (4096x4096)
#   bash benchmarks/run_session15.sh fwdstalls # where the forward's warps wait (ncu PC sampling, 8k, no RoPE); written, not run
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
    ab fold --kernel fwd --kwargs '[{"ctas": "sms", "key_block": 128, "fold_scale": false}, {"ctas": "sms", "key_block": 128}]'
    timeout 150 python3 benchmarks/bench_attention.py --timing-only --impls "ours;ours, fwd scale not folded;cudnn + XLA RoPE" \
      --seqs 2048,8192,32768 2>&1 | grep -A8 summary
    for m in 1 16; do timeout 130 python3 benchmarks/ncu_kernel_times.py --table --m $m 2> "$OUT/nf4table_$m.err" | cut -c1-150; tail -2 "$OUT/nf4table_$m.err"; done ;;
  nf4)  # M = 1 table; dx at M = 16 on 4096x4096: tile variants in kernel time (the default first)
    timeout 250 python3 benchmarks/ncu_kernel_times.py --table --m 1 2> "$OUT/nf4table_1.err" | cut -c1-150; tail -2 "$OUT/nf4table_1.err"
    D='[16,64,128,4,4,0,8,"prmt16",false,false]'
    for c in '[16,64,128,4,4,0,8,"prmt16",true,false]' '[16,64,128,4,4,0,8,"prmt16",false,true]' '[16,128,128,4,4,0,8,"prmt16",false,false]' \
             '[16,64,64,4,4,0,8,"prmt16",false,false]' '[16,64,128,8,4,0,8,"prmt16",false,false]' '[16,32,128,4,4,0,8,"prmt16",false,false]' \
             '[16,64,256,4,3,0,8,"prmt16",false,false]'; do D="$D --dx $c"; done
    timeout 180 python3 benchmarks/ncu_kernel_times.py --shapes 4096x4096 --m 16 --dx $D 2> "$OUT/nf4dx.err"; tail -3 "$OUT/nf4dx.err" ;;
  fwdstalls)  # the first Mosaic kernel of a fwd+bwd call is the forward
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
    timeout 240 $NCU --clock-control none -k regex:mosaic --launch-count 1 \
      --section SourceCounters --section WarpStateStats --section ComputeWorkloadAnalysis \
      --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_gmma.sum \
      -o "$OUT/fwd" python3 benchmarks/profile_attention.py --T 8192 --B 2 --impl ours-norope > "$OUT/ncu_fwd.log" 2>&1
    tail -3 "$OUT/ncu_fwd.log"
    $NCU -i "$OUT/fwd.ncu-rep" --page source --csv --print-source sass > "$OUT/fwd_source.csv" 2> "$OUT/fwd_source.err"
    python3 benchmarks/ncu_hotspots.py "$OUT/fwd_source.csv" --top 30 --context 2
    $NCU -i "$OUT/fwd.ncu-rep" --page details --csv 2>&1 | grep -iE "gmma|Stall|Warp Cycles|Issued|Eligible|Duration" | head -40 ;;
  *) echo "usage: $0 fold|nf4|fwdstalls" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Session 14 device calls (attention_NOTES.md "Session 14").
#   bash benchmarks/run_session14.sh sass     # SASS / PTX / ptxas of dk/dv, dq, dq with un-rotation tables; spill sites
#   bash benchmarks/run_session14.sh stalls   # where the backward kernels' warps wait (ncu PC sampling, 2k, no RoPE)
#   bash benchmarks/run_session14.sh mask     # causal masks from 1-D index vectors vs the 2-D iota (before_s14/), in one process
#   bash benchmarks/run_session14.sh e2e      # end to end against cuDNN + XLA RoPE, wall clock and Nsight at 2k
#   bash benchmarks/run_session14.sh nf4table # NF4 default path vs bf16 at M = 1 / 16, Nsight kernel time per call, all shapes
#   bash benchmarks/run_session14.sh nf4kv    # NF4 1024x4096 (k/v projections), M = 1 / 16: configs without split-K
set -u
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/s14}; mkdir -p "$OUT"
dump() {  # name, compile_mosaic_kernel.py flags...
  local name=$1; shift
  mkdir -p "$OUT/$name"
  MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO="$OUT/$name" timeout 150 \
    python3 benchmarks/compile_mosaic_kernel.py "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $(grep -hE 'spill stores|Used [0-9]+ registers' "$OUT/$name.log" "$OUT/$name"/* 2>/dev/null | sort | uniq -c | head -4)"
  python3 benchmarks/sass_spills.py "$OUT/$name" --context 3 | head -${LINES_PER:-60}
}
case ${1:-sass} in
  sass)
    dump dkv --kernel dkv
    LINES_PER=20 dump dq --kernel dq
    LINES_PER=20 dump dq_tables --kernel dq --rope --kwargs '{"pre_rotated": true}'
    ls -la "$OUT"/*/ | head -30 ;;
  stalls)
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
    # launch order of one fwd+bwd: forward, dk/dv, dq
    timeout 240 $NCU --clock-control none -k regex:mosaic --launch-skip 1 --launch-count 2 \
      --section SourceCounters --section WarpStateStats --section ComputeWorkloadAnalysis \
      --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_gmma.sum \
      -o "$OUT/bwd" python3 benchmarks/profile_attention.py --T 2048 --B 8 --impl ours-norope > "$OUT/ncu.log" 2>&1
    tail -3 "$OUT/ncu.log"
    $NCU -i "$OUT/bwd.ncu-rep" --page source --csv --print-source sass > "$OUT/source.csv" 2> "$OUT/source.err" \
      || $NCU -i "$OUT/bwd.ncu-rep" --page source --csv > "$OUT/source.csv" 2>> "$OUT/source.err"
    head -c 600 "$OUT/source.err"; ls -la "$OUT/source.csv"
    python3 benchmarks/ncu_hotspots.py "$OUT/source.csv" --top 30 --context 2
    $NCU -i "$OUT/bwd.ncu-rep" --page details --csv 2>&1 | grep -iE "gmma|Stall|Warp Cycles|Issued|Eligible|Duration" | head -40
    # the same tensor-pipe figures for cuDNN's kernels
    timeout 120 $NCU --clock-control none -k regex:"cudnn|sm90|flash|fmha" --metrics gpu__time_duration.sum,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active \
      python3 benchmarks/profile_attention.py --T 2048 --B 8 --impl cudnn 2>&1 | grep -E "^  [a-z_]|gmma|duration" | tail -12 ;;
  nf4kv)
    F='[64,2,8,3,0,"prmt16"]'
    for c in '[8,16,4,2,1,"prmt16"]' '[8,8,4,3,1,"prmt16"]' '[4,16,4,3,1,"prmt16"]' '[4,32,4,2,1,"prmt16"]' \
             '[8,32,8,2,1,"prmt16"]' '[4,64,8,1,1,"prmt16"]' '[2,64,4,1,1,"prmt16"]' '[16,16,8,2,1,"prmt16"]'; do F="$F --fwd $c"; done
    D='[16,8,4,3,0,"prmt16"]'
    for c in '[64,1,4,3,2,"prmt16"]' '[32,1,4,3,4,"prmt16"]' '[16,2,4,3,4,"prmt16"]' '[64,2,8,3,4,"prmt16"]' '[128,1,4,3,2,"prmt16"]' '[32,2,4,3,0,"prmt16"]'; do D="$D --dx $c"; done
    timeout 200 python3 benchmarks/ncu_kernel_times.py --shapes 1024x4096 --m 1 --fwd $F --dx $D 2> "$OUT/nf4kv.err"; tail -3 "$OUT/nf4kv.err"
    M='[16,64,128,4,4,0,8,"prmt16",false,true]'
    for c in '[16,16,128,4,4,1,8,"prmt16",false,true]' '[16,16,256,4,3,2,8,"prmt16",false,true]' '[16,32,256,4,3,2,8,"prmt16",false,true]' '[16,16,512,4,2,1,8,"prmt16",false,true]'; do M="$M --fwd $c"; done
    timeout 150 python3 benchmarks/ncu_kernel_times.py --shapes 1024x4096 --m 16 --fwd $M ;;
  mask)
    export MOSAIC_GPU_DUMP_PTXAS=1
    B=benchmarks.before_s14  # the kernels before the change (48596a8), written here for the A/B
    mkdir -p benchmarks/before_s14 && touch benchmarks/before_s14/__init__.py
    git show 48596a8:pallas_kernels/attention_mosaic.py > benchmarks/before_s14/attention_mosaic.py
    for kern in dkv dq; do git show 48596a8:pallas_kernels/attention_mosaic_$kern.py \
      | sed 's/from pallas_kernels.attention_mosaic import/from benchmarks.before_s14.attention_mosaic import/' \
      > benchmarks/before_s14/attention_mosaic_$kern.py; done
    for kern in dkv dq fwd; do
      mod=$B.attention_mosaic_$kern; [ $kern = fwd ] && mod=$B.attention_mosaic
      timeout 200 python3 benchmarks/bench_mosaic_bwd.py --kernel $kern --no-rope --no-baseline --with-32k \
        --kwargs "[{\"module\": \"$mod\"}, {}]" > "$OUT/mask_$kern.log" 2>&1
      echo "== $kern rc=$?"; grep -E "ms|PASS|FAIL|Error|spill stores," "$OUT/mask_$kern.log" | sort | uniq -c | sort -k2 | head -24
    done ;;
  e2e)
    timeout 300 python3 benchmarks/bench_attention.py --timing-only --impls "ours;cudnn + XLA RoPE" --seqs 2048,8192,32768 2>&1 | tail -12
    timeout 200 python3 benchmarks/ncu_kernel_times.py --attention 2048x8 --impls ours,cudnn-rope ;;
  nf4table)
    for m in 1 16; do timeout 150 python3 benchmarks/ncu_kernel_times.py --table --m $m 2> "$OUT/nf4table_$m.err"; tail -2 "$OUT/nf4table_$m.err"; done
    F='[64,2,8,3,0,"prmt16"]'
    for c in '[2,64,4,1,1,"prmt16"]' '[1,64,4,1,1,"prmt16"]' '[2,64,2,1,1,"prmt16"]' '[4,64,4,1,1,"prmt16"]' '[2,32,4,2,1,"prmt16"]'; do F="$F --fwd $c"; done
    timeout 120 python3 benchmarks/ncu_kernel_times.py --shapes 1024x4096 --m 1 --fwd $F 2>> "$OUT/nf4table_1.err" ;;
  *) echo "usage: $0 sass|stalls|mask|e2e|nf4table|nf4kv" >&2; exit 2 ;;
esac

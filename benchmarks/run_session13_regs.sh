#!/usr/bin/env bash
# Session 13, calls 4-7 (attention_NOTES.md "Session 13"): ptxas register/spill reports
# (MOSAIC_GPU_DUMP_PTXAS=1) and in-process timings of the backward kernels' variants.
#   bash benchmarks/run_session13_regs.sh pre_rotated   # dq / dk-dv with tables to un-rotate only vs none
#   bash benchmarks/run_session13_regs.sh dkv_regs      # dk/dv without tables: setmaxnreg splits
#   bash benchmarks/run_session13_regs.sh sass          # SASS of dk/dv: which loop its spills sit in (sass_spills.py)
#   bash benchmarks/run_session13_regs.sh local         # local-memory (spill) traffic of one fwd+bwd's Mosaic kernels at 2k (ncu)
# (call 7, dS^T from the 16-bit P^T, ran `run dkv '[{}, {"p16_ds": true}, ...]' --no-rope` at commit f4132a9,
# where p16_ds exists; measured slower and removed)
set -u
export PYTHONPATH=$PWD MOSAIC_GPU_DUMP_PTXAS=1
OUT=${OUT:-/tmp/regs}; mkdir -p "$OUT"
run() {  # kernel, kwargs list, extra flags
  timeout 170 python3 benchmarks/bench_mosaic_bwd.py --kernel "$1" --no-baseline --kwargs "$2" ${3:-} > "$OUT/$1.log" 2>&1
  grep -E "^(dq|dkv) .*(ms|Error|B=1 T=256)|spill stores," "$OUT/$1.log" | head -30
}
V='{"tables": false}, {"pre_rotated": true}'
case ${1:-pre_rotated} in
  pre_rotated)
    run dq "[$V, {\"pre_rotated\": true, \"regs\": [240, 24]}, {\"pre_rotated\": true, \"stages\": 2}]"
    run dkv "[$V]" ;;
  dkv_regs)
    run dkv '[{}, {"regs": [232, 40]}, {"regs": [224, 56]}]' --no-rope ;;
  sass)  # the next step (not run yet): where in the dk/dv kernel the spills are
    mkdir -p "$OUT/sass"
    MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO="$OUT/sass" timeout 120 \
      python3 benchmarks/compile_mosaic_kernel.py --kernel dkv > "$OUT/sass.log" 2>&1
    python3 benchmarks/sass_spills.py "$OUT/sass" | head -120 ;;
  local)  # the kernels in launch order: forward, dk/dv, dq
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
    $NCU --clock-control none -k regex:mosaic --metrics gpu__time_duration.sum,l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum,smsp__inst_executed.sum \
      python3 benchmarks/profile_attention.py --T 2048 --B 8 --impl ours-norope 2>&1 | grep -E "entry_mosaic|duration|local|inst_executed" | tail -16 ;;
  *) echo "usage: $0 pre_rotated|dkv_regs|sass|local" >&2; exit 2 ;;
esac

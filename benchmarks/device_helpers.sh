# What the run_session*.sh device scripts share (they source it first): the environment, OUT (default
# /tmp/<script name>), and the helpers ab, e2e_group, sass_spill_map, bwd_profile, cudnn_profile, fused_profile.
set -u
export PYTHONPATH=$PWD MOSAIC_GPU_DUMP_PTXAS=1
OUT=${OUT:-/tmp/$(basename "$0" .sh)}; mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
ab() {  # name, seconds, bench_mosaic_bwd.py flags...: the timing lines, checks and ptxas spills
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 benchmarks/bench_mosaic_bwd.py --no-baseline --with-32k "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$?"; grep -E " ms |PASS|FAIL|Error|spill stores," "$OUT/$name.log" | sort | uniq -c | sort -k2 | head -40
  echo "wgmma serialized (ptxas C7512): $(grep -c serialized "$OUT/$name.log")"
}
bwd_profile() {  # impl (ours-fused | ours-norope), kernels (1 | 2), [dk/dv kernel settings JSON]: ncu PC sampling of
                # the backward kernel(s) after the forward (8k, B = 2): regions, hot spots, feeders, memory figures
  local impl=$1 count=$2 settings=${3:-"{}"}
  timeout 300 $NCU --clock-control none -k regex:mosaic --launch-skip 1 --launch-count "$count" \
    --section SourceCounters --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_gmma.sum,lts__t_sectors_op_red.sum,lts__t_sectors_op_atom.sum \
    -o "$OUT/$impl" python3 benchmarks/profile_attention.py --T 8192 --B 2 --impl "$impl" \
    --dkv-kwargs "$settings" > "$OUT/ncu_$impl.log" 2>&1
  tail -3 "$OUT/ncu_$impl.log"
  $NCU -i "$OUT/$impl.ncu-rep" --page source --csv --print-source sass > "$OUT/source_$impl.csv" 2> "$OUT/source_$impl.err"
  python3 benchmarks/ncu_hotspots.py "$OUT/source_$impl.csv" --regions --top 40 --context 2 --feeders 16 | cut -c1-200
  $NCU -i "$OUT/$impl.ncu-rep" --page details --csv 2>&1 | grep -iE "gmma|Stall|Warp Cycles|Issued|Eligible|Duration|red|L2|Local" | cut -c1-200 | head -50
}
cudnn_profile() {  # cuDNN's kernels in the same shape (8k, B = 2): times and tensor-pipe use
  timeout 120 $NCU --clock-control none -k regex:"cudnn|sm90|flash|fmha" --metrics gpu__time_duration.sum,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active \
    python3 benchmarks/profile_attention.py --T 8192 --B 2 --impl cudnn 2>&1 | grep -E "^  [a-z_]|gmma|duration" | tail -12
}
fused_profile() {  # [dk/dv kernel settings JSON]: the fused backward's profile, then cuDNN's kernels
  bwd_profile ours-fused 1 "${1:-}"   # launch order of one fwd+bwd: the forward, then the fused backward
  cudnn_profile
}
# end to end against cuDNN + XLA RoPE (bench_attention.py --timing-only in interleaved rounds; ROUNDS, REPS, CHECKS
# from the environment): checks, each impl's ptxas spill lines after its "compiling" line, the timing lines
e2e_group() {  # name, seconds for the timings, seqs, impls; CHECKS (substrings of check names) first, in
              # CHECK_S more seconds (default 120; a check compiles and runs in ~12 s on the H100)
  local checks_s=0; [ -n "${CHECKS:-}" ] && checks_s=${CHECK_S:-120}
  timeout $(($2 + checks_s)) python3 benchmarks/bench_attention.py --timing-only --budget $(($2 - 40)) --rounds ${ROUNDS:-4} --reps ${REPS:-5} \
    --seqs "$3" --impls "$4" ${CHECKS:+--checks "$CHECKS"} > "$OUT/$1.log" 2>&1
  echo "== $1 rc=$?"; grep -E "FAIL|PASS|correctness|Error|budget" "$OUT/$1.log" | cut -c1-170 | head -20
  grep -E "compiling|spill stores" "$OUT/$1.log" | sed -E 's/.*function .entry_mosaic_gpu_kernel., //' | cut -c1-90
  grep -E "^  T=" "$OUT/$1.log" | cut -c1-230
}
sass_spill_map() {  # dk/dv kernel settings JSON, context lines, lines shown: where that kernel spills (SASS dump
                    # of compile_mosaic_kernel.py read by sass_spills.py)
  rm -rf "$OUT/sass"; mkdir -p "$OUT/sass"  # Mosaic does not create the dump directory
  MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_TO=$OUT/sass timeout 60 python3 benchmarks/compile_mosaic_kernel.py \
    --kernel dkv --kwargs "$1" > "$OUT/sass_compile.log" 2>&1
  echo "== sass $1 rc=$?"; tail -2 "$OUT/sass_compile.log"
  timeout 30 python3 benchmarks/sass_spills.py "$OUT/sass" --context "$2" | head -"$3" | cut -c1-160
}

#!/usr/bin/env bash
# Few-rows NF4 kernels on the GPU: bench_nf4.py phases (default: check, the MMA tile sweep, the
# M<=16 table; PHASES=gemv for the CUDA-core kernels' config sweep at GEMV_MS rows), then Nsight
# Compute (metrics + SASS) on the M=1 forward of 14336x4096 for each config in NCU_CFGS (JSON
# lists: 10 fields = TileConfig, <= 6 = nf4_gemv.GemvConfig).
#   bash benchmarks/run_nf4_profile.sh                                              (device tool; writes under $OUT)
#   PHASES=gemv NCU_CFGS='[64,2,8,3,0,"prmt16"] [64,2,8,3,0,"prmt"]' bash benchmarks/run_nf4_profile.sh
set -u
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/nf4prof}; mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
python3 benchmarks/bench_nf4.py --out "$OUT/bench" --phases ${PHASES:-check,sweep,table} --sweep-ms 1,16 --ms 1,16 \
  --gemv-ms ${GEMV_MS:-1} --budget ${BENCH_S:-300} 2>&1 | grep -v "cuda_timer\|^W1\|^I1"
SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
  --section WarpStateStats --section SchedulerStats --section InstructionStats --section SourceCounters"
i=0
for cfg in ${NCU_CFGS:-'[16,64,128,4,4,0,8,"prmt",true,true]' '[16,64,128,4,4,0,8,"prmt",false,false]'}; do
  i=$((i+1))
  $NCU --clock-control none -k regex:nf4 --launch-count 1 $SECTIONS -o "$OUT/fwd$i" -f \
    python3 benchmarks/profile_nf4.py --m 1 --shape 14336x4096 --calls 2 --dir fwd --cfg "$cfg" > "$OUT/ncu_fwd$i.log" 2>&1
  $NCU -i "$OUT/fwd$i.ncu-rep" --print-summary none > "$OUT/ncu_fwd$i.txt" 2>&1
  $NCU -i "$OUT/fwd$i.ncu-rep" --page source --print-source sass > "$OUT/ncu_fwd${i}_sass.txt" 2>&1
  rm -f "$OUT/fwd$i.ncu-rep"
  echo "== $cfg"
  grep -E "Duration|Executed Instructions  |Registers Per|Achieved Occupancy|No Eligible|Warp Cycles Per Issued|Issued Warp" "$OUT/ncu_fwd$i.txt"
done

#!/usr/bin/env bash
# Few-rows CUDA-core NF4 kernels (pallas_kernels/nf4_gemv.py) on the GPU: the config/decode sweep
# at M=1 on the four Llama-3.1-8B shapes, then Nsight Compute on the 14336x4096 forward of the
# configs in NCU_CFGS (GemvConfig fields as JSON lists).
#   bash benchmarks/run_gemv_profile.sh   (device tool; writes under $OUT)
set -u
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/gemvprof}; mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
python3 benchmarks/bench_nf4.py --out "$OUT/bench" --phases ${PHASES:-gemv} --gemv-ms ${GEMV_MS:-1} \
  --budget ${BENCH_S:-250} 2>&1 | grep -v "cuda_timer\|^W1\|^I1"
SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
  --section WarpStateStats --section SchedulerStats --section InstructionStats --section SourceCounters"
i=0
for cfg in ${NCU_CFGS:-'[128,2,4,3,0,"prmt"]' '[128,2,4,3,0,"prmt16"]'}; do
  i=$((i+1))
  $NCU --clock-control none -k regex:nf4 --launch-count 1 $SECTIONS -o "$OUT/gemv$i" -f \
    python3 benchmarks/profile_nf4.py --m 1 --shape 14336x4096 --calls 2 --dir fwd --cfg "$cfg" > "$OUT/ncu_gemv$i.log" 2>&1
  $NCU -i "$OUT/gemv$i.ncu-rep" --print-summary none > "$OUT/ncu_gemv$i.txt" 2>&1
  $NCU -i "$OUT/gemv$i.ncu-rep" --page source --print-source sass > "$OUT/ncu_gemv${i}_sass.txt" 2>&1
  rm -f "$OUT/gemv$i.ncu-rep"
  echo "== $cfg"
  grep -E "Duration|Executed Instructions  |Registers Per|Achieved Occupancy|No Eligible|Warp Cycles Per Issued|Memory Throughput|Issued Warp" "$OUT/ncu_gemv$i.txt"
done

#!/usr/bin/env bash
# Few-rows NF4 kernel on the GPU: tile sweeps on two shapes, then Nsight Compute on the M=1 kernels.
#   bash benchmarks/run_nf4_profile.sh   (device tool; writes under $OUT)
set -u
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/nf4prof}; mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
B="python3 benchmarks/bench_nf4.py --phases sweep"
$B --out "$OUT/s14336" --sweep-shape 14336x4096 --sweep-ms 1,16 --budget ${SWEEP_S:-150}
$B --out "$OUT/s4096" --sweep-shape 4096x4096 --sweep-ms 1 --budget ${SWEEP_S2:-70}
SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
  --section WarpStateStats --section SchedulerStats --section InstructionStats --section SourceCounters"
P="python3 benchmarks/profile_nf4.py --m 1 --shape 14336x4096 --calls 2"
$NCU --clock-control none -k regex:nf4 $SECTIONS -o "$OUT/fwd" -f \
  $P --dir fwd --cfg '[16,64,128,4,4,0,8,"prmt",true,true]' --cfg '[16,64,128,4,4,0,8,"prmt",true,false]' \
  > "$OUT/ncu_fwd.log" 2>&1
$NCU -i "$OUT/fwd.ncu-rep" --print-summary none > "$OUT/ncu_fwd.txt" 2>&1
$NCU -i "$OUT/fwd.ncu-rep" --page source --print-source sass --launch-count 1 > "$OUT/ncu_fwd_sass.txt" 2>&1
$NCU --clock-control none -k regex:nf4 $SECTIONS $P --dir dx > "$OUT/ncu_dx.txt" 2>&1
grep -E "^  [a-z_]+ |Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|Executed Ipc A|No Eligible|Block Limit|Dynamic Shared|Static Shared|Grid Size|Warp Cycles Per Issued|Executed Instructions  " "$OUT/ncu_fwd.txt" | head -120
tail -5 "$OUT/ncu_fwd.log"
wc -l "$OUT"/*.txt
grep -c -E "LDG|LDGSTS" "$OUT/ncu_fwd_sass.txt"
grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy" "$OUT/ncu_dx.txt" | head -20

#!/usr/bin/env bash
# Session 24 device calls (attention_NOTES.md "Session 24").
#   bash benchmarks/run_session24.sh first   # the fused default's SASS spill map; every kernel of one fwd+bwd at 8k
#                                            # (Nsight durations, ours and cuDNN + XLA RoPE) and its kernels' L2 hit rates; GPU checks of
#                                            # session 23's cleanup and the standing figures (its `repro`)
. "$(dirname "$0")/device_helpers.sh"
HERE=$(dirname "$0")
case ${1:-first} in
  first)
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
    bash "$HERE/run_session23.sh" spills
    for tb in 8192x2; do
      echo "== breakdown $tb"
      timeout 110 python3 benchmarks/ncu_kernel_times.py --attention $tb --impls ours,cudnn-rope 2>&1 | grep -v "^W1\|^I1" | tail -6
    done
    echo "== L2 / DRAM per kernel, 8k, B = 2 (ours, then cuDNN + XLA RoPE)"  # does the forward miss L2 more than cuDNN's?
    timeout 90 $NCU --clock-control none -k regex:"mosaic|cudnn|sm90|fmha|flash" --csv --metrics \
      gpu__time_duration.sum,lts__t_sector_hit_rate.pct,dram__bytes_read.sum,dram__bytes_write.sum \
      python3 benchmarks/profile_attention.py --T 8192 --B 2 --impl ours --impl cudnn-rope > "$OUT/l2.csv" 2> "$OUT/l2.err"
    echo "rc=$?"; python3 -c "
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
rows = rows[next(i for i, r in enumerate(rows) if r and r[0] == 'ID'):]
h = rows[0]; n, m, v = h.index('Kernel Name'), h.index('Metric Name'), h.index('Metric Value')
for r in rows[1:]:
    print(r[0], r[n][:40], r[m], r[v])" "$OUT/l2.csv" 2>&1 | tail -40
    ROUNDS=10 REPS=2 CHECKS=mosaic_causal_rope_gqa4,mosaic_fused_bwd_rope_gqa4,mosaic_packed_fused_bwd,mosaic_packed_rows_early \
      e2e_group repro_short 150 2048,8192 "ours;cudnn + XLA RoPE"
    ROUNDS=10 REPS=2 e2e_group repro_long 160 16384,32768 "ours;cudnn + XLA RoPE;ours, auto barriers" ;;
  *) echo "usage: $0 first" >&2; exit 2 ;;
esac

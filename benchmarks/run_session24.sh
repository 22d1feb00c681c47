#!/usr/bin/env bash
# Device calls prepared in sessions 24-25 (attention_NOTES.md "Session 24", "Session 25"). The GPU checks of
# session 23's cleanup, the head chunks and the list schedule passed in session 25 (`lean`); after a kernel
# change, run `lean` (or set CHECKS=... on a group) before timing again.
#   bash benchmarks/run_session24.sh first   # (~9.5 min) the fused default's SASS spill map; every kernel of one
#                                            # fwd+bwd at 8k (Nsight: time, L2 hit rate, DRAM bytes; ours, ours list
#                                            # heads by 8, cuDNN + XLA RoPE); the standing figures at 2k-32k (16k / 32k
#                                            # also against "ours, auto barriers" and list heads by 8)
#   bash benchmarks/run_session24.sh short   # (~6.5 min) the tile-order A/B at 32k, then at 2k / 8k, and the L2 figures
#   bash benchmarks/run_session24.sh lean    # (~4.5 min) the checks, then the 2k / 8k rounds of short
. "$(dirname "$0")/device_helpers.sh"
HERE=$(dirname "$0")
L2_IMPLS="--impl ours --impl ours-list-heads8 --impl cudnn-rope"
TILE_ORDERS="ours;cudnn + XLA RoPE;ours, fwd list;ours, fwd list heads by 8"
case ${1:-first} in
  first)
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
    bash "$HERE/run_session23.sh" spills
    echo "== every kernel of one fwd+bwd, 8k, B = 2: time, L2 hit rate, DRAM bytes"
    timeout 120 $NCU --clock-control none --csv --metrics \
      gpu__time_duration.sum,lts__t_sector_hit_rate.pct,dram__bytes_read.sum,dram__bytes_write.sum \
      python3 benchmarks/profile_attention.py --T 8192 --B 2 $L2_IMPLS > "$OUT/l2.csv" 2> "$OUT/l2.err"
    echo "rc=$?"; python3 "$HERE/ncu_csv_table.py" "$OUT/l2.csv" | tail -60
    ROUNDS=10 REPS=2 e2e_group repro_short 150 2048,8192 "ours;cudnn + XLA RoPE"
    ROUNDS=10 REPS=2 e2e_group repro_long 190 16384,32768 "ours;cudnn + XLA RoPE;ours, auto barriers;ours, fwd list heads by 8" ;;
  short)
    # 32k first: there chunks of 8 heads shrink the K/V the running CTAs read from 128 MB to 32 MB (H100 L2:
    # 50 MB), and even the static snake balances them (launch_order_model.py: 1.003x the ideal).
    ROUNDS=6 REPS=2 e2e_group short32k 170 32768 "ours;cudnn + XLA RoPE;ours, fwd heads by 8;ours, fwd list heads by 8"
    echo "== attention kernels of one fwd+bwd, 8k, B = 2: time, L2 hit rate, DRAM bytes"
    timeout 70 $NCU --clock-control none --csv -k regex:"mosaic|cudnn|sm90|fmha" --metrics \
      gpu__time_duration.sum,lts__t_sector_hit_rate.pct,dram__bytes_read.sum \
      python3 benchmarks/profile_attention.py --T 8192 --B 2 $L2_IMPLS > "$OUT/l2.csv" 2> "$OUT/l2.err"
    echo "rc=$?"; python3 "$HERE/ncu_csv_table.py" "$OUT/l2.csv" | tail -30
    ROUNDS=8 REPS=2 e2e_group short2k8k 140 2048,8192 "$TILE_ORDERS" ;;
  lean)
    ROUNDS=5 REPS=2 CHECKS=mosaic_causal_rope_gqa4,mosaic_fused_bwd_rope_gqa4,heads_by_8,fwd_list \
      e2e_group lean2k8k 140 2048,8192 "$TILE_ORDERS" ;;
  *) echo "usage: $0 first|short|lean" >&2; exit 2 ;;
esac

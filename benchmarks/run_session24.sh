#!/usr/bin/env bash
# Session 24 device calls (attention_NOTES.md "Session 24").
#   bash benchmarks/run_session24.sh first   # the fused default's SASS spill map; every kernel of one fwd+bwd at 8k
#                                            # (Nsight: time, L2 hit rate, DRAM bytes; ours, cuDNN + XLA RoPE);
#                                            # GPU checks of session 23's cleanup, its standing figures at 2k-32k
#                                            # (16k / 32k also against "ours, auto barriers") and the forward's
#                                            # tile order by chunks of heads
#   bash benchmarks/run_session24.sh short   # its checks, the tile-order A/B at 2k / 8k / 32k and L2 figures (~6 min)
#   bash benchmarks/run_session24.sh lean    # the checks and the 2k / 8k rounds of short (~4 min)
. "$(dirname "$0")/device_helpers.sh"
HERE=$(dirname "$0")
case ${1:-first} in
  first)
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
    bash "$HERE/run_session23.sh" spills
    echo "== every kernel of one fwd+bwd, 8k, B = 2: time, L2 hit rate, DRAM bytes (ours, ours heads by 8, cuDNN + XLA RoPE)"
    timeout 120 $NCU --clock-control none --csv --metrics \
      gpu__time_duration.sum,lts__t_sector_hit_rate.pct,dram__bytes_read.sum,dram__bytes_write.sum \
      python3 benchmarks/profile_attention.py --T 8192 --B 2 --impl ours --impl ours-heads8 --impl cudnn-rope > "$OUT/l2.csv" 2> "$OUT/l2.err"
    echo "rc=$?"; python3 "$HERE/ncu_csv_table.py" "$OUT/l2.csv" | tail -60
    ROUNDS=10 REPS=2 CHECKS=mosaic_causal_rope_gqa4,mosaic_fused_bwd_rope_gqa4,mosaic_packed_fused_bwd,mosaic_packed_rows_early,heads_by_8 \
      e2e_group repro_short 150 2048,8192 "ours;cudnn + XLA RoPE"
    ROUNDS=10 REPS=2 e2e_group repro_long 190 16384,32768 "ours;cudnn + XLA RoPE;ours, auto barriers;ours, fwd heads by 8" ;;
  short)  # the same in less device time: checks, the tile-order A/B at 2k / 8k / 32k, the attention kernels' L2 figures
    # QTiles' static snake balances chunked orders badly below 32k (launch_order_model.py: heads by 8
    # at 1.235x / 1.102x the ideal at 8k / 16k); the list schedule ("fwd list") balances any order.
    ROUNDS=6 REPS=2 CHECKS=mosaic_causal_rope_gqa4,mosaic_fused_bwd_rope_gqa4,mosaic_packed_fused_bwd,heads_by_8,fwd_list \
      e2e_group short2k8k 170 2048,8192 "ours;cudnn + XLA RoPE;ours, fwd list;ours, fwd list heads by 8"
    ROUNDS=4 REPS=2 e2e_group short32k 120 32768 "ours;cudnn + XLA RoPE;ours, fwd heads by 8;ours, fwd list heads by 8"
    echo "== attention kernels of one fwd+bwd, 8k, B = 2: time, L2 hit rate, DRAM bytes (ours, ours list heads by 8, cuDNN)"
    timeout 70 $NCU --clock-control none --csv -k regex:"mosaic|cudnn|sm90|fmha" --metrics \
      gpu__time_duration.sum,lts__t_sector_hit_rate.pct,dram__bytes_read.sum \
      python3 benchmarks/profile_attention.py --T 8192 --B 2 --impl ours --impl ours-list-heads8 --impl cudnn-rope > "$OUT/l2.csv" 2> "$OUT/l2.err"
    echo "rc=$?"; python3 "$HERE/ncu_csv_table.py" "$OUT/l2.csv" | tail -30 ;;
  lean)  # (~4 min) short's checks and its 2k / 8k rounds only
    ROUNDS=5 REPS=2 CHECKS=mosaic_causal_rope_gqa4,mosaic_fused_bwd_rope_gqa4,heads_by_8,fwd_list \
      e2e_group lean2k8k 200 2048,8192 "ours;cudnn + XLA RoPE;ours, fwd list;ours, fwd list heads by 8" ;;
  *) echo "usage: $0 first|short|lean" >&2; exit 2 ;;
esac

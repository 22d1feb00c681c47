#!/usr/bin/env bash
# NF4 M = 16 sweeps of the few-rows MMA kernel (nf4_NOTES.md session 11), on the GPU:
#   bash benchmarks/run_nf4_small_sweep.sh tiles    # call 5: tiles, warps, stages, split 8/16; then the
#                                                   #   table with the default tiles (--tuned pins them)
#   bash benchmarks/run_nf4_small_sweep.sh splits   # call 8: split_k 2-32 with the default tiles
# (session 12's "scale" mode, absmax applied after the product, measured slower: `git show 0441b88`)
# BUDGET=seconds (default 400) bounds the bench run (it is killed 20 s after).
set -u
export PYTHONPATH=$PWD
cfg() {  # one TileConfig as a JSON list: the M <= 16 default (16x64x128, 4 warps, prmt16) with changes
  local bn=$1 bk=$2 warps=$3 stages=$4 split=$5 interleave=$6
  printf '[16,%s,%s,%s,%s,%s,8,"prmt16",false,%s]' "$bn" "$bk" "$warps" "$stages" "$split" "$interleave"
}
join() { local IFS=,; echo "[$*]"; }
case ${1:-tiles} in
  tiles)
    S=4096x14336,14336x4096,1024x4096
    FWD=$(join "$(cfg 64 128 4 4 0 true)" "$(cfg 64 128 4 4 8 true)" "$(cfg 32 128 4 4 0 true)" "$(cfg 64 128 4 6 0 true)")
    DX=$(join "$(cfg 64 128 4 4 0 false)" "$(cfg 64 128 4 4 8 false)" "$(cfg 64 128 4 4 16 false)" "$(cfg 64 64 4 4 0 false)" \
              "$(cfg 128 128 4 4 0 false)" "$(cfg 64 128 2 4 0 false)" "$(cfg 64 128 4 6 0 false)")
    field() { echo "\"block_m\":16,\"block_n\":64,\"block_k\":128,\"num_warps\":4,\"num_stages\":4,\"split_k\":0,\"group_m\":8,\"decode\":\"prmt16\",\"weight_lhs\":false,\"interleave\":$1"; }
    EXTRA=(--phases sweep,table --ms 16 --shapes $S --repeat 2 --tuned "{\"small-fwd\": {$(field true)}, \"small-dx\": {$(field false)}}")
    ;;
  splits)
    S=4096x4096,14336x4096,4096x14336
    FWD=$(join $(for s in 2 4 8 16; do cfg 64 128 4 4 $s true; echo; done))
    DX=$(join $(for s in 4 8 16 32; do cfg 64 128 4 4 $s false; echo; done))
    EXTRA=(--phases sweep)
    ;;
  *) echo "usage: $0 tiles|splits" >&2; exit 2 ;;
esac
B=${BUDGET:-400}
timeout $((B + 20)) python3 benchmarks/bench_nf4.py --out "${OUT:-/tmp/out}/nf4" --sweep-shape $S --sweep-ms 16 --budget $B \
    --sweep-cfgs "{\"fwd\": $FWD, \"dx\": $DX}" "${EXTRA[@]}" 2>&1 | grep -v -i warn | grep "^sweep\|^table\|^ *16 "

#!/usr/bin/env bash
# Session 14 device calls (attention_NOTES.md "Session 14").
#   bash benchmarks/run_session14.sh sass   # SASS / PTX / ptxas of dk/dv, dq, dq with un-rotation tables; spill sites
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
  *) echo "usage: $0 sass" >&2; exit 2 ;;
esac

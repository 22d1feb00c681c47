#!/usr/bin/env bash
# Session 16 device calls (nf4_NOTES.md / attention_NOTES.md "Session 16").
#   bash benchmarks/run_session16.sh probe   # forward stalls (run_session15.sh fwdstalls); dx tiles at M = 16 on
#                                            # the other three shapes; the M = 1 kernel-time table on one shape
set -u
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/s16}; mkdir -p "$OUT"
case ${1:-probe} in
  probe)
    OUT=$OUT bash benchmarks/run_session15.sh fwdstalls 2>&1 | cut -c1-220 | head -120
    D='[16,64,128,4,4,0,8,"prmt16",false,false]'  # the default, then output tile 64, then reduction tile 32
    D="$D --dx [16,64,64,4,4,0,8,\"prmt16\",false,false] --dx [16,32,128,4,4,0,8,\"prmt16\",false,false]"
    timeout 240 python3 benchmarks/ncu_kernel_times.py --shapes 14336x4096,4096x14336,1024x4096 --m 16 --dx $D 2> "$OUT/nf4dx.err"; tail -3 "$OUT/nf4dx.err"
    timeout 120 python3 benchmarks/ncu_kernel_times.py --table --m 1 --shapes 1024x4096 2> "$OUT/nf4table_1.err" | cut -c1-150; tail -5 "$OUT/nf4table_1.err" ;;
  *) echo "usage: $0 probe" >&2; exit 2 ;;
esac

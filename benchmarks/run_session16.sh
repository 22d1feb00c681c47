#!/usr/bin/env bash
# Session 16 device calls (nf4_NOTES.md / attention_NOTES.md "Session 16").
#   bash benchmarks/run_session16.sh probe   # forward stalls (run_session15.sh fwdstalls); dx tiles at M = 16 on
#                                            # the other three shapes; the M = 1 kernel-time table on one shape
#   bash benchmarks/run_session16.sh splitsum # split partials summed in the kernel vs by XLA: GPU check, kernel time
#                                            # per call at M = 16 (all shapes) and M = 1 (gemv kernels, two shapes)
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
  splitsum)
    timeout 150 python3 benchmarks/check_split_sum.py --repeats 20 > "$OUT/check.log" 2>&1; echo "check rc=$?"
    grep -E "FAIL|PASS$|diff|Error" "$OUT/check.log" | grep -vE "True  PASS|False PASS" | head -20; tail -1 "$OUT/check.log"
    F='[16,64,128,4,4,0,8,"prmt16",false,true]'; FS='[16,64,128,4,4,0,8,"prmt16",false,true,true]'
    X='[16,64,128,4,4,0,8,"prmt16",false,false]'; XS='[16,64,128,4,4,0,8,"prmt16",false,false,true]'
    XK='[16,64,64,4,4,0,8,"prmt16",false,false,true]'
    timeout 300 python3 benchmarks/ncu_kernel_times.py --no-bf16 --m 16 --fwd $F --fwd $FS --dx $X --dx $XS --dx $XK 2> "$OUT/m16.err"; tail -3 "$OUT/m16.err"
    timeout 150 python3 benchmarks/ncu_kernel_times.py --no-bf16 --m 1 --shapes 4096x4096 --fwd '[64,2,8,3,0,"prmt16"]' \
      --fwd '[64,2,8,3,0,"prmt16",true]' --dx '[16,8,4,3,0,"prmt16"]' --dx '[16,8,4,3,0,"prmt16",true]' 2> "$OUT/m1.err"; tail -3 "$OUT/m1.err" ;;
  *) echo "usage: $0 probe|splitsum" >&2; exit 2 ;;
esac

export PYTHONPATH=$PWD
P=prmt16
FWD='[[16,64,128,4,4,0,8,"prmt16",false,true],[16,64,128,4,4,8,8,"prmt16",false,true],[16,32,128,4,4,0,8,"prmt16",false,true],[16,64,128,4,6,0,8,"prmt16",false,true]]'
DX='[[16,64,128,4,4,0,8,"prmt16",false,false],[16,64,128,4,4,8,8,"prmt16",false,false],[16,64,128,4,4,16,8,"prmt16",false,false],[16,64,64,4,4,0,8,"prmt16",false,false],[16,128,128,4,4,0,8,"prmt16",false,false],[16,64,128,2,4,0,8,"prmt16",false,false],[16,64,128,4,6,0,8,"prmt16",false,false]]'
TUNED='{"small-fwd": {"block_m":16,"block_n":64,"block_k":128,"num_warps":4,"num_stages":4,"split_k":0,"group_m":8,"decode":"prmt16","weight_lhs":false,"interleave":true}, "small-dx": {"block_m":16,"block_n":64,"block_k":128,"num_warps":4,"num_stages":4,"split_k":0,"group_m":8,"decode":"prmt16","weight_lhs":false,"interleave":false}}'
S=4096x14336,14336x4096,1024x4096
timeout 420 python3 benchmarks/bench_nf4.py --out $OUT/nf4 --phases sweep,table --sweep-shape $S --sweep-ms 16 --ms 16 --shapes $S --repeat 2 --budget 400 --sweep-cfgs "{\"fwd\": $FWD, \"dx\": $DX}" --tuned "$TUNED" 2>&1 | grep -v -i warn | grep "sweep\|table\|x4096\|x14336\|M=\|err" | tail -45

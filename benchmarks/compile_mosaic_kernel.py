#!/usr/bin/env python3
"""Compile and run one Mosaic GPU attention kernel once at a small shape: the quickest way to get its
PTX / SASS dumps and ptxas report (no timing, no checks).

    MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=$OUT/dump \\
        PYTHONPATH=$PWD python3 benchmarks/compile_mosaic_kernel.py --kernel dkv
    python3 benchmarks/sass_spills.py $OUT/dump
"""
import argparse
import importlib
import json
import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from mosaic_cases import backward_case  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", choices=("dq", "dkv"), default="dkv")
    p.add_argument("--rope", action="store_true", help="with RoPE tables (rotated in the kernel)")
    p.add_argument("--kwargs", default="{}", help="launch settings (JSON)")
    a = p.parse_args()
    mod = importlib.import_module(f"pallas_kernels.attention_mosaic_{a.kernel}")
    args, seg, scale, _ = backward_case(1, 256, 4, 2, rope=a.rope, segments=False, seed=0)
    kw = json.loads(a.kwargs)
    out = jax.jit(lambda *x: getattr(mod, f"mosaic_{a.kernel}")(*x, scale=scale, **kw))(*args)
    jax.block_until_ready(out)
    print(f"compiled and ran mosaic_{a.kernel} {kw}", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Compile the NF4 kernels for one shape with XLA dumping on, then report per kernel what ptxas
says (registers, spills) and the instruction mix of the PTX (prmt, ld.global, mma, ...).

    PYTHONPATH=$PWD python3 benchmarks/nf4_ptx_report.py --out $OUT [--m 1] [--n 14336] [--k 4096]
"""
import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
p.add_argument("--m", type=int, nargs="+", default=[1, 16])
p.add_argument("--n", type=int, default=14336)
p.add_argument("--k", type=int, default=4096)
args = p.parse_args()
dump = os.path.join(args.out, "xla_dump")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_gpu_dump_llvmir=true"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import nf4_matmul as K  # noqa: E402
from unsloth_jax.quant import quantize_nf4  # noqa: E402

q = quantize_nf4(jax.random.normal(jax.random.PRNGKey(0), (args.n, args.k), jnp.float32) * 0.02)
for m in args.m:
    x = jnp.ones((m, args.k), jnp.bfloat16)
    dy = jnp.ones((m, args.n), jnp.bfloat16)
    jax.block_until_ready(jax.jit(lambda x, q: K.nf4_matmul(x, q))(x, q))
    jax.block_until_ready(jax.jit(lambda d, q: K._backward_dx(d, q, False, None, d.dtype))(dy, q))

ptxs = sorted(glob.glob(os.path.join(dump, "**", "*.ptx"), recursive=True))
print(f"{len(ptxs)} ptx files in the dump")
ptxas = shutil.which("ptxas") or next(iter(glob.glob(os.path.join(
    os.path.dirname(os.path.dirname(jax.__file__)), "nvidia", "**", "bin", "ptxas"), recursive=True)), None)
print("ptxas:", ptxas)
for path in ptxs:
    text = open(path).read()
    if "nf4" not in text:
        continue
    for ent in re.finditer(r"\.entry\s+(\w*nf4\w*)", text):
        print("kernel", ent.group(1), "in", os.path.basename(path))
    ops = collections.Counter(re.findall(r"^\s+(?:@%p\d+\s+)?([a-z][\w.]*)", text, re.M))
    top = ", ".join(f"{o}:{c}" for o, c in ops.most_common(25))
    print("  instruction mix:", top)
    print("  local (spill) ops:", sum(c for o, c in ops.items() if ".local" in o))
    if ptxas:
        arch = re.search(r"\.target\s+(sm_\w+)", text)
        r = subprocess.run([ptxas, f"-arch={arch.group(1) if arch else 'sm_90a'}", "-v", path, "-o", "/dev/null"],
                           capture_output=True, text=True)
        for line in (r.stdout + r.stderr).splitlines():
            if "nf4" in line or "registers" in line or "spill" in line:
                print("  ptxas:", line.strip())
    shutil.copy(path, os.path.join(args.out, os.path.basename(path)))
sys.stdout.flush()

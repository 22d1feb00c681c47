#!/usr/bin/env python3
"""GPU check of split reductions summed in the kernel (`sum_in_kernel`): against the jnp reference
and the XLA-summed path, and run after run (bit-equal every time: a race in the arrival count or a
stale partial would show as a changed or wrong result). Prints one line per case and PASS / FAIL.

    PYTHONPATH=$PWD python3 benchmarks/check_split_sum.py --repeats 30
"""
import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import nf4_gemv as G
from pallas_kernels import nf4_matmul as K
from unsloth_jax.quant import quantize_nf4


def configs(m, n_out, n_red, dx):
    """The default config of the product, with the XLA sum and with the in-kernel one."""
    if m <= G.GEMV_MAX_ROWS:
        base = G.default_gemv_config(n_out, n_red, dx=dx)
    else:
        base = K.default_config(m, n_out, n_red, dx=dx)
    return [dataclasses.replace(base, sum_in_kernel=v) for v in (False, True)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="14336x4096,4096x14336,4096x4096,1024x4096")
    p.add_argument("--ms", default="1,16")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--interpret", action="store_true", help="the Pallas interpreter (CPU; a dry run of this script)")
    a = p.parse_args()
    bad = 0
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        q = quantize_nf4(jax.random.normal(jax.random.PRNGKey(0), (n, k), jnp.float32) * 0.02)
        for m in (int(v) for v in a.ms.split(",")):
            for dx in (False, True):
                a_in = jax.random.normal(jax.random.PRNGKey(m), (m, n if dx else k), jnp.bfloat16)
                ref = (a_in.astype(jnp.float32) @ K.dequantize_nf4(q, jnp.bfloat16).astype(jnp.float32)
                       if dx else K.nf4_matmul_reference(a_in, q).astype(jnp.float32))
                outs = []
                for cfg in configs(m, k if dx else n, n if dx else k, dx):
                    f = jax.jit(lambda x, c=cfg: K._backward_dx(x, q, a.interpret, c, x.dtype) if dx
                                else K.nf4_matmul(x, q, interpret=a.interpret, fwd_config=c))
                    first = np.asarray(f(a_in), np.float32)
                    same = all(np.array_equal(np.asarray(f(a_in), np.float32), first) for _ in range(a.repeats))
                    err = np.abs(first - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max()
                    outs.append(first)
                    ok = same and err < 2e-2
                    bad += not ok
                    print(f"{shape:>11} M={m:<3d} {'dx ' if dx else 'fwd'} sum_in_kernel={cfg.sum_in_kernel!s:5s} "
                          f"rel err {err:.2e} repeat-equal {same} {'PASS' if ok else 'FAIL'}", flush=True)
                print(f"{'':11} in-kernel vs XLA sum: max abs diff {np.abs(outs[0] - outs[1]).max():.3e}", flush=True)
    print("ALL PASS" if not bad else f"{bad} FAIL")


if __name__ == "__main__":
    main()

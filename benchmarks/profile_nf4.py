#!/usr/bin/env python3
"""Run one NF4 matmul a few times, for a profiler (ncu) to look at. Not a timing.

    ncu --clock-control none -k regex:nf4 python3 benchmarks/profile_nf4.py --m 1 --shape 14336x4096 \\
        --dir fwd --cfg '[16,64,128,4,4,0,8,"prmt",true,false]'
"""
import argparse
import functools
import json

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import nf4_gemv as G
from pallas_kernels import nf4_matmul as K
from unsloth_jax.quant import quantize_nf4


def _marker_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1


@functools.cache
def _marker_call():
    x = jax.block_until_ready(jnp.zeros((16,), jnp.float32))  # made once: no broadcast kernel per marker
    f = pl.pallas_call(_marker_kernel, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), name="ncu_marker",
                       interpret=jax.default_backend() == "cpu")
    return f, x


def marker():
    """One tiny kernel named ncu_marker: the separator between the ops of `table`."""
    f, x = _marker_call()
    jax.block_until_ready(f(x))


def nf4_op(direction, cfg=None):
    """(x, q) -> the NF4 product of one direction (forward, or dx of the backward) with `cfg` tiles."""
    if direction == "fwd":
        return lambda x, q: K.nf4_matmul(x, q, fwd_config=cfg)
    return lambda x, q: K._backward_dx(x, q, False, cfg, x.dtype)


def bf16_op(direction):
    """(x, w) -> the bf16 matmul of the same direction."""
    return (lambda x, w: x @ w.T) if direction == "fwd" else (lambda x, w: x @ w)


def table(shapes, m, calls):
    """For each shape and direction: marker, `calls` calls of the default NF4 path, marker, `calls`
    calls of the bf16 matmul; a final marker closes the last segment. Every op is compiled (and
    XLA's autotuning kernels run) before the first marker, so the segments hold only the ops."""
    ops = []
    for shape in shapes:
        n, k = (int(v) for v in shape.split("x"))
        w = jax.random.normal(jax.random.PRNGKey(0), (n, k), jnp.float32) * 0.02
        q = jax.block_until_ready(quantize_nf4(w, record_dtype="bfloat16"))
        wb = jax.block_until_ready(w.astype(jnp.bfloat16))
        for direction in ("fwd", "dx"):
            x = jax.block_until_ready(jnp.ones((m, k if direction == "fwd" else n), jnp.bfloat16))
            for fn, wt in ((nf4_op(direction), q), (bf16_op(direction), wb)):
                f = jax.jit(fn)
                jax.block_until_ready(f(x, wt))
                ops.append((f, x, wt))
    _marker_call()
    for f, x, wt in ops:
        marker()
        for _ in range(calls):
            jax.block_until_ready(f(x, wt))
    marker()
    print("ran", len(ops), "ops at M =", m, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--shape", default="14336x4096", help="out x in")
    p.add_argument("--dir", choices=("fwd", "dx"), default="fwd")
    p.add_argument("--cfg", action="append", default=[],
                   help="TileConfig (8-11 fields) or nf4_gemv.GemvConfig (<= 7 fields) as a JSON list "
                        "(repeatable); none: the default")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="run the plain bf16 matmul of the shape instead")
    p.add_argument("--table", metavar="SHAPES", help="instead: the default NF4 path and the bf16 matmul of every "
                   "(shape, direction), each run between two `ncu_marker` kernels (ncu_kernel_times.py --table)")
    a = p.parse_args()
    if a.table:
        return table(a.table.split(","), a.m, a.calls)
    n, k = (int(v) for v in a.shape.split("x"))
    w = jax.random.normal(jax.random.PRNGKey(0), (n, k), jnp.float32) * 0.02
    q = jax.block_until_ready(quantize_nf4(w, record_dtype="bfloat16"))
    fields = [json.loads(c) for c in a.cfg]
    cfgs = [(G.GemvConfig if len(f) <= 7 else K.TileConfig)(*f) for f in fields] or [None]
    if a.bf16:
        wb = w.astype(jnp.bfloat16)
        x = jnp.ones((a.m, k if a.dir == "fwd" else n), jnp.bfloat16)
        f = jax.jit(bf16_op(a.dir))
        for _ in range(a.calls):
            jax.block_until_ready(f(x, wb))
        print("ran bf16", a.dir, a.m, a.shape, flush=True)
        return
    # x made once: between two configs' calls only their own kernels run (ncu_kernel_times sums them)
    x = jax.block_until_ready(jnp.ones((a.m, k if a.dir == "fwd" else n), jnp.bfloat16))
    for cfg in cfgs:
        f = jax.jit(nf4_op(a.dir, cfg))
        for _ in range(a.calls):
            jax.block_until_ready(f(x, q))
        print("ran", a.dir, a.m, a.shape, cfg, flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Run attention forward+backward a few times, for a profiler (ncu) to look at. Not a timing.

    ncu --clock-control none -k regex:flash_attention python3 benchmarks/profile_attention.py
    python3 benchmarks/ncu_kernel_times.py --attention 2048x8   (every kernel of one call, per impl)

Impls: "ours" (the defaults: RoPE by XLA before the Mosaic kernels on sm_90), "ours-ropegrad"
(Tuning(rope_grad_in_kernel=True): the backward kernels un-rotate dq / dk), "ours-heads8" (the forward's
tiles by chunks of 8 heads), "ours-norope",
"ours-fused" (no RoPE, the fused backward at every length), "cudnn-rope" (XLA RoPE, then cuDNN), "cudnn" (pre-rotated inputs).
--dkv-kwargs '{"rows_early": true}': launch settings for our dk/dv (or fused) kernel (Tuning.mosaic_dkv_kwargs).
"""
import argparse
import json

import jax
import jax.numpy as jnp

from pallas_kernels.attention import Tuning, apply_rope, flash_attention, rope_cos_sin

IMPLS = ("ours", "ours-heads8", "ours-list-heads8", "ours-ropegrad", "ours-norope", "ours-fused", "cudnn-rope", "cudnn")


def attention_fn(impl, inv_freq, positions, dkv_kwargs=()):
    def rope(q, k):
        cos, sin = rope_cos_sin(positions, inv_freq)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    def ours(q, k, v, inv_freq=None, **tuning):
        return flash_attention(q, k, v, inv_freq=inv_freq, tuning=Tuning(mosaic_dkv_kwargs=dkv_kwargs, **tuning))
    return {"ours": lambda q, k, v: ours(q, k, v, inv_freq),
            "ours-heads8": lambda q, k, v: ours(q, k, v, inv_freq, mosaic_fwd_head_chunk=8),
            "ours-list-heads8": lambda q, k, v: ours(q, k, v, inv_freq, mosaic_fwd_head_chunk=8,
                                                     mosaic_fwd_schedule="list"),
            "ours-ropegrad": lambda q, k, v: ours(q, k, v, inv_freq, rope_grad_in_kernel=True),
            "ours-norope": lambda q, k, v: ours(q, k, v),
            "ours-fused": lambda q, k, v: ours(q, k, v, mosaic_fused_bwd=True),
            "cudnn-rope": lambda q, k, v: cudnn(*rope(q, k), v),
            "cudnn": cudnn}[impl]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--impl", action="append", choices=IMPLS, help="repeatable; default: ours with and without RoPE")
    p.add_argument("--calls", type=int, default=1, help="forward+backward calls per impl")
    p.add_argument("--hlo", help="write each impl's optimized HLO to this prefix + impl + .txt")
    p.add_argument("--dkv-kwargs", default="{}", help="JSON launch settings of our dk/dv (or fused) kernel")
    a = p.parse_args()
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (a.B, a.T, 32, 128), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (a.B, a.T, 8, 128), jnp.bfloat16) for kk in keys[1:3])
    do = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
    inv_freq = 1.0 / (500000.0 ** (jnp.arange(0, 128, 2, dtype=jnp.float32) / 128))
    positions = jnp.broadcast_to(jnp.arange(a.T), (a.B, a.T))
    for impl in a.impl or ("ours", "ours-norope"):
        f = attention_fn(impl, inv_freq, positions, tuple(json.loads(a.dkv_kwargs).items()))
        step = jax.jit(lambda q, k, v, f=f: jax.vjp(f, q, k, v)[1](do))
        if a.hlo:
            with open(f"{a.hlo}{impl}.txt", "w") as fh:
                fh.write(step.lower(q, k, v).compile().as_text())
        for _ in range(a.calls):
            jax.block_until_ready(step(q, k, v))
        print("ran", impl, flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Run the flash-attention kernels once each, with and without RoPE inside, for a profiler (ncu).

    ncu --clock-control none -k regex:flash_attention python3 benchmarks/profile_attention.py
"""
import argparse

import jax
import jax.numpy as jnp

from pallas_kernels.attention import flash_attention


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--B", type=int, default=2)
    a = p.parse_args()
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (a.B, a.T, 32, 128), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (a.B, a.T, 8, 128), jnp.bfloat16) for kk in keys[1:3])
    do = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
    inv_freq = 1.0 / (500000.0 ** (jnp.arange(0, 128, 2, dtype=jnp.float32) / 128))
    for rope in (inv_freq, None):
        f = lambda q, k, v, rope=rope: flash_attention(q, k, v, inv_freq=rope)  # noqa: E731
        jax.block_until_ready(jax.jit(f)(q, k, v))
        jax.block_until_ready(jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](do))(q, k, v))
        print("ran rope" if rope is not None else "ran no rope", flush=True)


if __name__ == "__main__":
    main()

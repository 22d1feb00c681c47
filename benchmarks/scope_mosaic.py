#!/usr/bin/env python3
"""Scoping, not a product path: how fast does JAX's own Mosaic GPU (Hopper wgmma/TMA) mixed-type
matmul run, int8 weight converted in registers x bf16 activations, against the bf16 matmul of the
same shape? It bounds what a Mosaic GPU NF4 kernel (decode in registers, then wgmma) could reach
at many rows, where our Triton kernels lose to dequantize + cuBLAS (benchmarks/nf4_NOTES.md).

    PYTHONPATH=$PWD python3 benchmarks/scope_mosaic.py
"""
import itertools

import jax
import jax.numpy as jnp

from bench_attention import timeit  # median ms of back-to-back calls (this folder is on sys.path)


def main():
    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mm

    print("jax", jax.__version__, jax.devices()[0].device_kind)
    for n, k, m in [(14336, 4096, 2048), (4096, 4096, 2048), (14336, 4096, 8192)]:
        # weight [out, in] as the int8 left operand, x^T [in, M] as the bf16 right operand
        w8 = jax.random.randint(jax.random.key(0), (n, k), -127, 127, jnp.int8)
        xt = jax.random.normal(jax.random.key(1), (k, m), jnp.bfloat16)
        wb = w8.astype(jnp.bfloat16)
        bf16_ms = timeit(jax.jit(lambda a, b: jnp.dot(a, b)), wb, xt)
        flops = 2 * n * k * m
        best = None
        for tm, tn, tk, wg in itertools.product((128, 64), (128, 64), (64, 128), (mm.MatmulDimension.N, mm.MatmulDimension.M)):
            cfg = mm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=tk, max_concurrent_steps=4, wg_dimension=wg,
                                  grid_tile_width=8)
            try:
                f = jax.jit(lambda a, b, cfg=cfg: mm.mixed_matmul_kernel(a, b, out_dtype=jnp.bfloat16, config=cfg))
                ms = timeit(f, w8, xt, reps=10)
            except Exception as e:  # noqa: BLE001 - a tile that does not fit
                print(f"  {tm}x{tn}x{tk} {wg}: {type(e).__name__}: {str(e)[:100]}")
                continue
            if best is None or ms < best[0]:
                best = (ms, cfg)
        print(f"{n}x{k} M={m}: bf16 {bf16_ms:.3f} ms ({flops / bf16_ms / 1e9:.0f} TF/s); "
              f"mosaic int8xbf16 best {best[0]:.3f} ms ({flops / best[0] / 1e9:.0f} TF/s) = "
              f"{bf16_ms / best[0]:.2f}x bf16; {best[1]}" if best else f"{n}x{k}: no config ran")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Scoping: one tiny Mosaic GPU kernel (TMA copies, a barrier, a wgmma, TMA store) run compiled on
the GPU or, with --interpret, by JAX's Mosaic GPU interpreter on the CPU. If the interpreter runs
it, Mosaic GPU kernels of ours can be tested in CI like the Triton ones (interpret mode).

    python3 benchmarks/scope_mosaic_interpret.py [--interpret]
"""
import argparse

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

M = N = K = 64


def body(a_gmem, b_gmem, o_gmem, a_smem, b_smem, o_smem, bar):
    plgpu.copy_gmem_to_smem(a_gmem, a_smem, bar)
    plgpu.copy_gmem_to_smem(b_gmem, b_smem, bar)
    plgpu.barrier_wait(bar)

    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        plgpu.wgmma_wait(0)
        o_smem[...] = (acc_ref[...] * 2.0).astype(o_smem.dtype)

    pl.run_scoped(scope, plgpu.ACC((M, N), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem)
    plgpu.wait_smem_to_gmem(0)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--interpret", action="store_true")
    a = p.parse_args()
    interpret = None
    if a.interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        interpret = InterpretGPUParams()
    tiles = lambda: (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # noqa: E731
    f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((M, N), jnp.bfloat16),
                     scratch_types=[plgpu.SMEM((M, K), jnp.bfloat16, transforms=tiles()),
                                    plgpu.SMEM((K, N), jnp.bfloat16, transforms=tiles()),
                                    plgpu.SMEM((M, N), jnp.bfloat16, transforms=tiles()),
                                    plgpu.Barrier(num_arrivals=2)],
                     interpret=interpret)
    x = jax.random.normal(jax.random.key(0), (M, K), jnp.bfloat16)
    y = jax.random.normal(jax.random.key(1), (K, N), jnp.bfloat16)
    want = (2.0 * jnp.dot(x.astype(jnp.float32), y.astype(jnp.float32))).astype(jnp.bfloat16)
    got = f(x, y)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
    print(f"jax {jax.__version__} {jax.devices()[0].platform} interpret={a.interpret}: max |err| {err:.3g}")


if __name__ == "__main__":
    main()

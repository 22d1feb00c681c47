"""The base-weight matmul of every projection: a dense [in, out] array or an NF4-quantized weight."""
from __future__ import annotations

import os

import jax.numpy as jnp

# Benchmark knob (A/B of the output dtype only; removed once measured).
_F32_OUT = os.environ.get("UNSLOTH_JAX_BENCH_F32_MATMUL_OUT") == "1"


def base_matmul(x, kernel):
    if hasattr(kernel, "packed"):  # NF4Tensor (HF [out, in] layout, bitsandbytes storage)
        from pallas_kernels.nf4_matmul import nf4_linear

        return nf4_linear(x, kernel)
    if _F32_OUT:
        return jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype),
                          preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype))

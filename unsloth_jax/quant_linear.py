"""The base-weight matmul of every projection: a dense [in, out] array or an NF4-quantized weight."""
from __future__ import annotations

import jax.numpy as jnp

from unsloth_jax.quant import is_nf4


def base_matmul(x, kernel):
    """x @ kernel in x's dtype (the GEMM accumulates in fp32 on GPU; an fp32 output would double the
    bytes written: measured 1.2-1.3x slower training steps, benchmarks/RESULTS.md)."""
    if is_nf4(kernel):  # HF [out, in] layout, bitsandbytes storage
        from pallas_kernels.nf4_matmul import nf4_linear

        return nf4_linear(x, kernel)
    return jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype))

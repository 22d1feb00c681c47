"""The Mosaic GPU dK/dV kernel (pallas_kernels/attention_mosaic_dkv.py) under JAX's Mosaic GPU
interpreter on the CPU, against jax.vjp of the jnp reference; and its compiled path lowered for
CUDA on the CPU (no GPU needed; catches layout errors the interpreter does not see)."""
import math

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import attention_mosaic_dkv as M
from pallas_kernels.attention import apply_rope, flash_attention_reference, rope_cos_sin


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


def _case(B, T, Hq, Hkv, rope, seed):
    ks = jax.random.split(jax.random.key(seed), 4)
    D = M.HEAD_DIM
    q = jax.random.normal(ks[0], (B, T, Hq, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, Hkv, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, Hkv, D), jnp.bfloat16)
    do = jax.random.normal(ks[3], (B, T, Hq, D), jnp.bfloat16)
    inv_freq = 1.0 / (500000.0 ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D)) if rope else None
    scale = D ** -0.5
    o, vjp = jax.vjp(lambda q, k, v: flash_attention_reference(q, k, v, inv_freq=inv_freq), q, k, v)
    _, dk_ref, dv_ref = vjp(do)
    # lse: log2-sum-exp2 of scale*log2(e)*q_rot.k_rot over the visible keys, [B, Hq, T]
    qr, kr, tables = q, k, ()
    if rope:
        cos, sin = rope_cos_sin(jnp.arange(T)[None], inv_freq)
        qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        ang = jnp.arange(T, dtype=jnp.float32)[None, :, None] * inv_freq
        tables = (jnp.cos(ang).astype(jnp.float16), jnp.sin(ang).astype(jnp.float16))
    kr = jnp.repeat(kr, Hq // Hkv, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", qr.astype(jnp.float32), kr.astype(jnp.float32)) * scale * math.log2(math.e)
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    lse = jax.nn.logsumexp(s * math.log(2), axis=-1) / math.log(2)
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o.astype(jnp.float32))
    return (q, k, v, do, lse, delta, *tables), scale, dk_ref, dv_ref


def _rel(x, ref):
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(x - ref)) / jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("B,T,Hq,Hkv,rope,pipelined", [
    (1, 256, 4, 2, True, True),    # producer + 2 consumers, 2 slots refilled (~20 s on 2 cores)
    (1, 128, 2, 1, False, True),
    (1, 256, 4, 2, True, False),   # the simple two-warpgroup fallback
])
def test_mosaic_dkv_matches_reference_in_the_interpreter(B, T, Hq, Hkv, rope, pipelined):
    args, scale, dk_ref, dv_ref = _case(B, T, Hq, Hkv, rope, seed=T + Hq)
    dk, dv = M.mosaic_dkv(*args, scale=scale, pipelined=pipelined, interpret=_interpret_params())
    assert dk.shape == dk_ref.shape and dk.dtype == args[1].dtype and dv.shape == dv_ref.shape
    assert _rel(dv, dv_ref) < 2e-2, _rel(dv, dv_ref)
    assert _rel(dk, dk_ref) < 2e-2, _rel(dk, dk_ref)


@pytest.mark.parametrize("pipelined", [True, False])
@pytest.mark.parametrize("rope", [True, False])
def test_mosaic_dkv_lowers_for_cuda(rope, pipelined):
    """The compiled path (wgmma with transposed operands, WGMMA layouts) through Mosaic GPU's
    layout inference, for CUDA on the CPU."""
    args, scale, _, _ = _case(1, 256, 4, 2, rope, seed=1)
    f = lambda *a: M.mosaic_dkv(*a, scale=scale, pipelined=pipelined)  # noqa: E731
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("rope", [True, False])
def test_mosaic_dkv_shared_memory_p_variant_lowers_for_cuda(rope):
    """The compiled default passes P^T / dS^T as register operands (p_regs, lowered above; the
    interpreter cannot run it); the shared-memory variant the interpreter checks must lower too."""
    args, scale, _, _ = _case(1, 256, 4, 2, rope, seed=2)
    f = lambda *a: M.mosaic_dkv(*a, scale=scale, pipelined=True, p_regs=False)  # noqa: E731
    assert "mosaic_gpu" in jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

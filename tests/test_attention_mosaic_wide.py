"""The Mosaic GPU kernels at D = 256 (Gemma's head size; attention_mosaic.WIDE_HEAD_DIM): the forward, dQ
and the wide dK/dV kernel (attention_mosaic_dkv_wide) under JAX's Mosaic GPU interpreter on the CPU
against the jnp reference, their compiled paths lowered for CUDA on the CPU, and flash_attention's
wiring there (opt-in: Tuning(mosaic_wide_heads=True)): RoPE by XLA, then the three Mosaic kernels (or
the Triton dk/dv, fed the Mosaic lse)."""
import functools
from dataclasses import replace as dataclasses_replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaic_cases import (backward_case, inputs, interpret_params, packed_segments, races_found, reference_lse,
                          rel_err)
from pallas_kernels import attention as attn
from pallas_kernels import attention_mosaic as M
from pallas_kernels import attention_mosaic_dkv_wide as MDKV
from pallas_kernels import attention_mosaic_dq as MDQ
from pallas_kernels.attention import flash_attention_reference

D = M.WIDE_HEAD_DIM


def test_wide_heads_are_supported():
    ok = dict(head_dim=D, seq_len=512, dtype=jnp.bfloat16, causal=True, has_window=False,
              has_segments=True, softcap=None)
    assert M.supported(**ok)
    assert M.supported(**{**ok, "softcap": 50.0}) and not M.supported(**{**ok, "head_dim": 192})


@pytest.mark.parametrize("B,T,Hq,Hkv,segments,ctas,early_qk", [
    (1, 256, 2, 1, False, 3, False),  # persistent: 4 tiles on 3 CTAs
    (2, 256, 2, 1, True, None, False),  # packed, one CTA per tile
    (1, 256, 2, 1, True, 3, True)])  # the next QK^T issued behind each PV
def test_wide_forward_matches_reference_in_the_interpreter(B, T, Hq, Hkv, segments, ctas, early_qk):
    q, k, v, _, _ = inputs(B, T, Hq, Hkv, seed=T + Hq, head_dim=D)
    seg = packed_segments(B, T, seed=T) if segments else None
    scale = D ** -0.5
    o, lse = M.mosaic_forward(q, k, v, seg=seg, scale=scale, ctas=ctas, early_qk=early_qk,
                              interpret=interpret_params())
    assert not races_found()
    assert o.shape == q.shape and o.dtype == q.dtype
    assert rel_err(o, flash_attention_reference(q, k, v, segment_ids=seg)) < 2e-2
    np.testing.assert_allclose(np.asarray(lse), np.asarray(reference_lse(q, k, None, scale, seg)), atol=3e-2)


@pytest.mark.parametrize("B,T,Hq,Hkv,segments,ctas,head_dim,stages,early_v", [
    (1, 256, 2, 1, False, 3, D, None, None),  # one slot, V handed back after dP (the D = 256 default)
    (2, 256, 2, 1, True, None, D, None, False),  # packed; V with K
    (2, 256, 2, 1, True, 3, M.HEAD_DIM, 1, True)])  # early_v at D = 128 too
def test_wide_dq_matches_reference_in_the_interpreter(B, T, Hq, Hkv, segments, ctas, head_dim, stages, early_v):
    args, seg, scale, (dq_ref, _, _) = backward_case(B, T, Hq, Hkv, rope=False, segments=segments, seed=T + Hq,
                                                     head_dim=head_dim)
    dq = MDQ.mosaic_dq(*args, seg=seg, scale=scale, ctas=ctas, stages=stages, early_v=early_v,
                       interpret=interpret_params())
    assert not races_found()
    assert dq.shape == dq_ref.shape and dq.dtype == args[0].dtype
    assert rel_err(dq, dq_ref) < 2e-2, rel_err(dq, dq_ref)


@pytest.mark.parametrize("B,T,Hq,Hkv,segments,window,softcap", [
    (1, 192, 2, 1, False, None, None), (1, 256, 2, 1, True, None, None), (1, 256, 2, 1, False, 100, 5.0)])
def test_wide_dkv_matches_reference_in_the_interpreter(B, T, Hq, Hkv, segments, window, softcap):
    args, seg, scale, (_, dk_ref, dv_ref) = backward_case(B, T, Hq, Hkv, rope=False, segments=segments,
                                                          seed=T + Hq, head_dim=D, window=window, softcap=softcap)
    dk, dv = MDKV.mosaic_dkv_wide(*args, seg=seg, scale=scale, window=window, softcap=softcap,
                                  interpret=interpret_params())
    assert not races_found()
    assert dk.shape == dk_ref.shape and dv.dtype == args[2].dtype
    assert rel_err(dk, dk_ref) < 2e-2 and rel_err(dv, dv_ref) < 2e-2, (rel_err(dk, dk_ref), rel_err(dv, dv_ref))


@pytest.mark.parametrize("segments,ctas,early", [(False, "sms", False), (True, "sms", True), (True, None, False)])
def test_wide_kernels_lower_for_cuda(segments, ctas, early):
    """The compiled paths (register P / dS operands, setmaxnreg (240, 24), the dq's early V release
    with wgmma_wait(2)), lowered for CUDA on the CPU: catches layout errors the interpreter does not see."""
    args, seg, scale, _ = backward_case(1, 512, 4, 2, rope=False, segments=segments, seed=1, head_dim=D)
    fwd = lambda *a: M.mosaic_forward(*a[:3], seg=seg, scale=scale, ctas=ctas, early_qk=early)  # noqa: E731
    dq = lambda *a: MDQ.mosaic_dq(*a, seg=seg, scale=scale, ctas=ctas, early_v=not early)  # noqa: E731
    dkv = lambda *a: MDKV.mosaic_dkv_wide(*a, seg=seg, scale=scale, longest_first=early)  # noqa: E731
    for f in (fwd, dq, dkv):
        assert "mosaic_gpu" in jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_wide_kernels_refuse_rope_tables():
    args, _, scale, _ = backward_case(1, 256, 2, 1, rope=True, segments=False, seed=1, head_dim=D)
    with pytest.raises(ValueError, match="D=256 takes no RoPE tables"):
        M.mosaic_forward(*args[:3], *args[-2:], scale=scale)
    with pytest.raises(ValueError, match="D=256 takes no RoPE tables"):
        MDQ.mosaic_dq(*args, scale=scale)


@pytest.mark.parametrize("mosaic_dkv", [None, False])
def test_flash_attention_runs_wide_heads_on_the_mosaic_kernels(monkeypatch, mosaic_dkv):
    """With sm_90 pretended: RoPE by XLA (no tables reach a kernel), the Mosaic forward, dq and wide
    dk/dv (or, with Tuning(mosaic_dkv=False), the Triton dk/dv fed the Mosaic lse), never the fused
    backward, at 16k either (lowered for CUDA on the CPU)."""
    from unsloth_jax import compat
    monkeypatch.setattr(compat, "is_sm90", lambda: True)
    monkeypatch.setattr(attn, "FUSED_BWD_MIN_T", 256)
    wide_calls = []
    monkeypatch.setattr(MDKV, "mosaic_dkv_wide", lambda *a, _f=MDKV.mosaic_dkv_wide, **kw: wide_calls.append(1) or _f(*a, **kw))
    q, k, v, _, inv_freq = inputs(1, 256, 4, 2, seed=3, head_dim=D)
    tuning = dataclasses_replace(attn.default_tuning(D), mosaic_dkv=mosaic_dkv, mosaic_wide_heads=True)

    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(lambda *a: attn.flash_attention(*a, inv_freq=inv_freq, tuning=tuning), q, k, v)
        return out, vjp(jnp.ones_like(out))
    text = jax.jit(fwd_bwd).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and ("flash_attention_dkv" in text) == (mosaic_dkv is False)
    assert "flash_attention_fwd" not in text and "flash_attention_dq" not in text
    assert len(wide_calls) == (mosaic_dkv is None) and "output_operand_alias" not in text


def test_flash_attention_on_wide_heads_matches_reference(monkeypatch):
    """End to end (custom_vjp, T = 100 padded to 128, packed rows, a sliding window, a logit softcap (Gemma-2's
    three), per-row RoPE positions by XLA):
    the three Mosaic kernels under the interpreter; output and dq/dk/dv match the jnp reference, no
    race in any of them."""
    from unsloth_jax import compat
    monkeypatch.setattr(compat, "is_sm90", lambda: True)
    ran, raced = [], []

    def interpreted(name, f):
        def run(*a, **kw):
            if name != "mosaic_dkv_wide":  # (it takes no tables at all)
                assert a[3 if name == "mosaic_forward" else 6] is None, "no RoPE tables at D = 256"
            out = jax.block_until_ready(f(*a, **kw, interpret=interpret_params()))  # eager under jax.vjp
            ran.append(name)
            raced.append(races_found())
            return out
        return run
    monkeypatch.setattr(M, "mosaic_forward", interpreted("mosaic_forward", M.mosaic_forward))
    monkeypatch.setattr(MDQ, "mosaic_dq", interpreted("mosaic_dq", MDQ.mosaic_dq))
    monkeypatch.setattr(MDKV, "mosaic_dkv_wide", interpreted("mosaic_dkv_wide", MDKV.mosaic_dkv_wide))
    B, T = 1, 100
    q, k, v, do, inv_freq = inputs(B, T, 4, 2, seed=11, head_dim=D)
    kw = dict(positions=jnp.broadcast_to(jnp.arange(T), (B, T)) + 3, segment_ids=packed_segments(B, T, seed=12),
              inv_freq=inv_freq, sliding_window=45, logit_softcap=2.0)

    def run(f):
        out, vjp = jax.vjp(lambda *a: f(*a, **kw), q, k, v)
        return (out, *vjp(do))
    got = run(functools.partial(attn.flash_attention, tuning=dataclasses_replace(
        attn.default_tuning(D), mosaic_wide_heads=True, mosaic_windows=True, mosaic_softcap=True)))
    want = run(flash_attention_reference)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(g, w) < 2e-2, (name, rel_err(g, w))
    assert ran == ["mosaic_forward", "mosaic_dq", "mosaic_dkv_wide"] and raced == [False] * 3, (ran, raced)

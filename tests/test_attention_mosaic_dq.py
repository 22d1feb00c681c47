"""The Mosaic GPU dQ kernel (pallas_kernels/attention_mosaic_dq.py) under JAX's Mosaic GPU
interpreter on the CPU, against jax.vjp of the jnp reference; and its compiled path lowered for
CUDA on the CPU (no GPU needed; catches layout errors the interpreter does not see)."""
import jax
import pytest

from mosaic_cases import backward_case, interpret_params, races_found, rel_err
from pallas_kernels import attention_mosaic_dq as M


@pytest.mark.parametrize("B,T,Hq,Hkv,rope,segments,ctas,key_block,static_consumers", [
    (1, 128, 4, 2, True, False, None, 64, False), (2, 128, 2, 1, True, True, None, 64, False),
    (2, 256, 2, 1, False, True, 3, 64, False),  # persistent: 8 tiles on 3 CTAs
    (2, 256, 2, 1, False, True, 3, 128, False),  # 128-key steps (packed, persistent)
    (2, 256, 2, 1, False, True, 3, 128, True)])  # each consumer its own code
def test_mosaic_dq_matches_reference_in_the_interpreter(B, T, Hq, Hkv, rope, segments, ctas, key_block,
                                                        static_consumers):
    args, seg, scale, (dq_ref, _, _) = backward_case(B, T, Hq, Hkv, rope=rope, segments=segments, seed=T + Hq)
    dq = M.mosaic_dq(*args, seg=seg, scale=scale, ctas=ctas, key_block=key_block, static_consumers=static_consumers,
                     interpret=interpret_params())
    assert dq.shape == dq_ref.shape and dq.dtype == args[0].dtype
    assert not races_found()
    assert rel_err(dq, dq_ref) < 2e-2, rel_err(dq, dq_ref)


@pytest.mark.parametrize("segments,ctas,key_block,softcap", [(True, None, 128, None), (False, 3, 64, 5.0)])
def test_mosaic_dq_with_a_sliding_window_matches_reference_in_the_interpreter(segments, ctas, key_block, softcap):
    """A window of 70 keys over 256 (and a logit softcap)."""
    args, seg, scale, (dq_ref, _, _) = backward_case(2 if segments else 1, 256, 2, 1, rope=False, segments=segments,
                                                     seed=5, window=70, softcap=softcap)
    dq = M.mosaic_dq(*args, seg=seg, scale=scale, ctas=ctas, key_block=key_block, window=70, softcap=softcap,
                     interpret=interpret_params())
    assert not races_found()
    assert rel_err(dq, dq_ref) < 2e-2, rel_err(dq, dq_ref)


@pytest.mark.parametrize("rope,regs,segments,ctas,key_block,pre_rotated,static_consumers", [
    (True, None, False, None, 64, False, False), (False, None, False, None, 64, False, False),
    (True, (200, 104), False, None, 64, False, False), (True, None, True, None, 64, False, False),
    (False, None, True, 5, 64, False, False), (False, "auto", False, None, 128, False, False),
    (False, "auto", True, "sms", 128, False, False),
    (True, None, True, None, 64, True, False),  # tables to un-rotate dQ only
    (False, "auto", True, "sms", 128, False, True)])  # each consumer its own code
def test_mosaic_dq_lowers_for_cuda(rope, regs, segments, ctas, key_block, pre_rotated, static_consumers):
    args, seg, scale, _ = backward_case(1, 256, 4, 2, rope=rope, segments=segments, seed=1)
    f = lambda *a: M.mosaic_dq(*a, seg=seg, scale=scale, regs=regs, ctas=ctas, key_block=key_block,  # noqa: E731
                               pre_rotated=pre_rotated, static_consumers=static_consumers)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_mosaic_dq_128_key_steps_refuse_rope_tables():
    args, _, scale, _ = backward_case(1, 256, 4, 2, rope=True, segments=False, seed=1)
    with pytest.raises(ValueError, match="key_block=128 takes no RoPE tables"):
        M.mosaic_dq(*args, scale=scale, key_block=128)

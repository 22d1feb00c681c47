"""The Mosaic GPU dK/dV kernel (pallas_kernels/attention_mosaic_dkv.py) under JAX's Mosaic GPU
interpreter on the CPU, against jax.vjp of the jnp reference; and its compiled path lowered for
CUDA on the CPU (no GPU needed; catches layout errors the interpreter does not see)."""
import jax
import pytest

from mosaic_cases import backward_case, rel_err
from pallas_kernels import attention_mosaic_dkv as M


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


@pytest.mark.parametrize("B,T,Hq,Hkv,rope,segments,static_consumers", [
    (1, 128, 4, 2, True, False, True),     # producer + 2 consumers, 4 steps through 2 slots
    (1, 256, 2, 1, True, True, True),      # packed documents (two key blocks)
    (1, 256, 2, 1, True, True, False),     # one consumer code for both, the buffers by warpgroup index
])
def test_mosaic_dkv_matches_reference_in_the_interpreter(B, T, Hq, Hkv, rope, segments, static_consumers):
    args, seg, scale, (_, dk_ref, dv_ref) = backward_case(B, T, Hq, Hkv, rope=rope, segments=segments, seed=T + Hq)
    dk, dv = M.mosaic_dkv(*args, seg=seg, scale=scale, static_consumers=static_consumers,
                          interpret=_interpret_params())
    assert dk.shape == dk_ref.shape and dk.dtype == args[1].dtype and dv.shape == dv_ref.shape
    assert rel_err(dv, dv_ref) < 2e-2, rel_err(dv, dv_ref)
    assert rel_err(dk, dk_ref) < 2e-2, rel_err(dk, dk_ref)


@pytest.mark.parametrize("rope,p_regs,segments,ds_under_dv,pre_rotated,static_consumers,rows_early", [
    (True, None, False, None, False, True, False), (False, None, False, None, False, True, False),  # compiled default: P^T in registers
    (True, False, False, False, False, True, False), (False, False, False, False, False, True, False),  # P^T through shared memory
    (True, None, True, None, False, True, False), (True, False, True, False, False, True, False),
    (False, None, False, False, False, True, False), (False, None, True, None, False, True, False),  # dS^T after dV (or under it)
    (True, None, False, None, True, True, False), (True, None, True, None, True, True, False),  # tables to un-rotate dK only
    (False, None, True, None, False, False, False),  # one consumer code for both, the buffers by warpgroup index
    (False, None, True, None, False, True, True), (False, None, False, False, False, True, True)])  # lse / delta rows first
def test_mosaic_dkv_lowers_for_cuda(rope, p_regs, segments, ds_under_dv, pre_rotated, static_consumers, rows_early):
    """The compiled paths (wgmma with transposed and register operands, WGMMA layouts) through
    Mosaic GPU's layout inference, for CUDA on the CPU."""
    args, seg, scale, _ = backward_case(1, 256, 4, 2, rope=rope, segments=segments, seed=1)
    f = lambda *a: M.mosaic_dkv(*a, seg=seg, scale=scale, p_regs=p_regs,  # noqa: E731
                                ds_under_dv=ds_under_dv, pre_rotated=pre_rotated, static_consumers=static_consumers,
                                rows_early=rows_early)
    assert "mosaic_gpu" in jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("B,T,Hq,Hkv,segments,static_consumers,dq_lag", [
    (1, 256, 4, 2, False, True, False),   # two key blocks adding into the same query tiles, GQA 2
    (1, 256, 2, 1, True, True, False),    # packed documents (key blocks stop at their last shared segment)
    (1, 256, 4, 2, False, False, False),  # one consumer code for both, the buffers by warpgroup index
    (2, 384, 4, 2, False, True, True),    # each tile's dQ a step late (3 dS^T buffers, a barrier each)
    (1, 256, 2, 1, True, True, True),
])
def test_mosaic_dkv_with_dq_matches_reference_in_the_interpreter(B, T, Hq, Hkv, segments, static_consumers, dq_lag):
    """The fused backward: dq from the dk/dv kernel's dS^T tiles (in the interpreter each key block
    stores its dQ partial, summed by XLA, where the GPU reduce-adds), dk/dv unchanged by it."""
    args, seg, scale, (dq_ref, dk_ref, dv_ref) = backward_case(B, T, Hq, Hkv, rope=False, segments=segments,
                                                               seed=T + Hq + 7)
    dk, dv, dq = M.mosaic_dkv(*args, seg=seg, scale=scale, with_dq=True, static_consumers=static_consumers,
                              dq_lag=dq_lag, interpret=_interpret_params())
    assert dq.shape == dq_ref.shape and dq.dtype == args[0].dtype
    for got, want in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        assert rel_err(got, want) < 2e-2, rel_err(got, want)


@pytest.mark.parametrize("p_regs,segments,ds_under_dv,static_consumers,dq_lag,dq_behind_dk,dq_atomic", [
    (None, False, None, True, False, False, False), (False, False, None, True, False, False, False),
    (None, True, None, True, False, False, False), (None, True, False, True, False, False, False),
    (None, False, False, True, False, False, False), (None, True, None, False, False, False, False),
    (None, False, None, True, True, False, False), (None, True, None, True, True, True, False),
    (None, False, None, True, False, True, False), (False, True, None, True, True, False, False),
    (None, False, None, True, False, False, True), (None, True, None, True, True, True, True)])
def test_mosaic_dkv_with_dq_lowers_for_cuda(p_regs, segments, ds_under_dv, static_consumers, dq_lag, dq_behind_dk,
                                            dq_atomic):
    """The compiled fused backward (transposed dS^T A operand, fp32 TMA reduce-add into a jax.new_ref
    accumulator), inside a remat'ed scan as in the model."""
    import jax.numpy as jnp

    args, seg, scale, _ = backward_case(1, 256, 4, 2, rope=False, segments=segments, seed=1)

    def f(*a):
        def layer(c, _):
            dk, dv, dq = M.mosaic_dkv(*a, seg=seg, scale=scale, p_regs=p_regs, with_dq=True,
                                      ds_under_dv=ds_under_dv, static_consumers=static_consumers,
                                      dq_lag=dq_lag, dq_behind_dk=dq_behind_dk, dq_atomic=dq_atomic)
            return c + dq.astype(jnp.float32).sum() + dk.astype(jnp.float32).sum(), None
        return jax.lax.scan(jax.checkpoint(layer), 0.0, None, length=2)[0]
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "output_operand_alias" in text, "the accumulator is not aliased in and out"

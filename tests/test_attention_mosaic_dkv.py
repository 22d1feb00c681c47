"""The Mosaic GPU dK/dV kernel (pallas_kernels/attention_mosaic_dkv.py) under JAX's Mosaic GPU
interpreter on the CPU, against jax.vjp of the jnp reference; and its compiled path lowered for
CUDA on the CPU (no GPU needed; catches layout errors the interpreter does not see)."""
import jax
import pytest

from mosaic_cases import backward_case, barrier_callers, interpret_params, races_found, rel_err
from pallas_kernels import attention_mosaic_dkv as M


@pytest.mark.parametrize("B,T,Hq,Hkv,rope,segments,static_consumers", [
    (1, 128, 4, 2, True, False, True),     # producer + 2 consumers, 4 steps through 2 slots
    (1, 256, 2, 1, True, True, True),      # packed documents (two key blocks)
    (1, 256, 2, 1, True, True, False),     # one consumer code for both, the buffers by warpgroup index
    (1, 384, 4, 2, False, False, True),    # no tables, three key blocks (6, 4, 2 steps a head)
])
def test_mosaic_dkv_matches_reference_in_the_interpreter(B, T, Hq, Hkv, rope, segments, static_consumers):
    args, seg, scale, (_, dk_ref, dv_ref) = backward_case(B, T, Hq, Hkv, rope=rope, segments=segments, seed=T + Hq)
    dk, dv = M.mosaic_dkv(*args, seg=seg, scale=scale, static_consumers=static_consumers,
                          interpret=interpret_params())
    assert dk.shape == dk_ref.shape and dk.dtype == args[1].dtype and dv.shape == dv_ref.shape
    assert not races_found()
    assert rel_err(dv, dv_ref) < 2e-2, rel_err(dv, dv_ref)
    assert rel_err(dk, dk_ref) < 2e-2, rel_err(dk, dk_ref)


@pytest.mark.parametrize("with_dq,segments,softcap", [(False, False, None), (True, True, 5.0)])
def test_mosaic_dkv_with_a_sliding_window_matches_reference_in_the_interpreter(with_dq, segments, softcap):
    """A window of 70 keys over 256 (each CTA stops at its last key's last visible query tile; every
    tile masked), separate and fused (with a logit softcap)."""
    args, seg, scale, (dq_ref, dk_ref, dv_ref) = backward_case(1, 256, 2, 1, rope=False, segments=segments, seed=9,
                                                               window=70, softcap=softcap)
    out = M.mosaic_dkv(*args, seg=seg, scale=scale, window=70, softcap=softcap, with_dq=with_dq,
                       interpret=interpret_params())
    assert not races_found()
    for got, want in zip(out, (dk_ref, dv_ref, dq_ref)):
        assert rel_err(got, want) < 2e-2, rel_err(got, want)


@pytest.mark.parametrize("rope,p_regs,segments,settings", [
    (True, None, False, {}), (False, None, False, {}),  # compiled default: P^T in registers
    (True, False, False, dict(ds_under_dv=False)), (False, False, False, dict(ds_under_dv=False)),  # P^T through shared memory
    (True, None, True, {}), (True, False, True, dict(ds_under_dv=False)),
    (False, None, False, dict(ds_under_dv=False)), (False, None, True, {}),  # dS^T after dV (or under it)
    (True, None, False, dict(pre_rotated=True)), (True, None, True, dict(pre_rotated=True)),  # tables to un-rotate dK only
    (False, None, True, dict(static_consumers=False)),  # one consumer code for both, the buffers by warpgroup index
    (False, None, True, dict(rows_early=True)), (False, None, False, dict(ds_under_dv=False, rows_early=True)),  # lse / delta first
    (True, None, False, dict(rows_early=True)),
    (True, None, True, dict(pre_rotated=True, rows_early=True)),  # the separate kernel's default with rope_grad_in_kernel
    (False, None, False, dict(no_auto_barriers=True)), (True, None, False, dict(no_auto_barriers=True)),  # (rotation: kept)
])
def test_mosaic_dkv_lowers_for_cuda(rope, p_regs, segments, settings):
    """The compiled paths (wgmma with transposed and register operands, WGMMA layouts) through
    Mosaic GPU's layout inference, for CUDA on the CPU; settings: mosaic_dkv's other keywords."""
    args, seg, scale, _ = backward_case(1, 256, 4, 2, rope=rope, segments=segments, seed=1)
    f = lambda *a: M.mosaic_dkv(*a, seg=seg, scale=scale, p_regs=p_regs, **settings)  # noqa: E731
    assert "mosaic_gpu" in jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("B,T,Hq,Hkv,segments,static_consumers", [
    (1, 256, 4, 2, False, True),   # two key blocks adding into the same query tiles, GQA 2
    (1, 256, 2, 1, True, True),    # packed documents (key blocks stop at their last shared segment)
    (1, 256, 4, 2, False, False),  # one consumer code for both, the buffers by warpgroup index
    (2, 384, 4, 2, False, True),   # two rows, three key blocks
])
def test_mosaic_dkv_with_dq_matches_reference_in_the_interpreter(B, T, Hq, Hkv, segments, static_consumers):
    """The fused backward: dq from the dk/dv kernel's dS^T tiles (in the interpreter each key block
    stores its dQ partial, summed by XLA, where the GPU reduce-adds), dk/dv unchanged by it."""
    args, seg, scale, (dq_ref, dk_ref, dv_ref) = backward_case(B, T, Hq, Hkv, rope=False, segments=segments,
                                                               seed=T + Hq + 7)
    dk, dv, dq = M.mosaic_dkv(*args, seg=seg, scale=scale, with_dq=True, static_consumers=static_consumers,
                              interpret=interpret_params())
    assert dq.shape == dq_ref.shape and dq.dtype == args[0].dtype
    assert not races_found()
    for got, want in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        assert rel_err(got, want) < 2e-2, rel_err(got, want)


@pytest.mark.parametrize("p_regs,segments,settings", [
    (None, False, {}), (False, False, {}), (None, True, {}), (None, True, dict(ds_under_dv=False)),
    (None, False, dict(ds_under_dv=False)), (None, True, dict(static_consumers=False)),
    (None, False, dict(rows_early=True)), (None, False, dict(no_auto_barriers=True)),  # flash_attention's fused default
    (None, True, dict(no_auto_barriers=True)), (False, True, dict(no_auto_barriers=True)),
    (None, False, dict(rows_early=True, no_auto_barriers=True)),
])
def test_mosaic_dkv_with_dq_lowers_for_cuda(p_regs, segments, settings):
    """The compiled fused backward (transposed dS^T A operand, fp32 TMA reduce-add into a jax.new_ref
    accumulator), inside a remat'ed scan as in the model."""
    import jax.numpy as jnp

    args, seg, scale, _ = backward_case(1, 256, 4, 2, rope=False, segments=segments, seed=1)

    def f(*a):
        def layer(c, _):
            dk, dv, dq = M.mosaic_dkv(*a, seg=seg, scale=scale, p_regs=p_regs, with_dq=True, **settings)
            return c + dq.astype(jnp.float32).sum() + dk.astype(jnp.float32).sum(), None
        return jax.lax.scan(jax.checkpoint(layer), 0.0, None, length=2)[0]
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "output_operand_alias" in text, "the accumulator is not aliased in and out"


@pytest.mark.parametrize("no_auto_barriers", [False, True])
def test_no_auto_barriers_leaves_out_pallas_store_barriers(no_auto_barriers):
    """no_auto_barriers reaches Pallas' lowering: the warpgroup barriers it puts around shared-memory
    stores and copies (on JAX 0.10 from Pallas' store and copy rules, on 0.11 from the Mosaic GPU
    dialect's lowering; 57 in the fused kernel in both when session 20 counted) are gone; the
    kernel's own (commit_smem, the reduce-add read-wait) stay."""
    args, seg, scale, _ = backward_case(1, 256, 4, 2, rope=False, segments=False, seed=1)
    f = lambda *a: M.mosaic_dkv(*a, scale=scale, with_dq=True, no_auto_barriers=no_auto_barriers)  # noqa: E731
    requested, automatic = barrier_callers(lambda: jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)))
    print(f"AUTO_BARRIERS no_auto_barriers={no_auto_barriers} {len(automatic)} jax {jax.__version__}")  # pytest -s
    assert requested
    assert (len(automatic) == 0) == no_auto_barriers, sorted(set(automatic))

"""The chunked cross-entropy (gradient computed in its forward pass) against plain autodiff."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unsloth_jax.models.loss import CHUNK_MULTIPLE, IGNORE_INDEX, chunked_token_loss, default_chunk_tokens


def plain_loss(h, head, y, cap, h_axis):
    w = head if h_axis == 0 else head.T
    z = jnp.einsum("bth,hv->btv", h, w, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST)
    if cap:
        z = cap * jnp.tanh(z / cap)
    valid = y != IGNORE_INDEX
    target = jnp.take_along_axis(z, jnp.where(valid, y, 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(valid, jax.nn.logsumexp(z, -1) - target, 0.0))


@pytest.mark.parametrize("h_axis", [0, 1])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_value_and_gradients_match_autodiff(h_axis, cap):
    rng = np.random.default_rng(h_axis * 10 + bool(cap))
    h = jnp.asarray(rng.standard_normal((2, 37, 16)), jnp.float32)  # 74 tokens: the last chunk is padded
    head = jnp.asarray(rng.standard_normal((16, 50) if h_axis == 0 else (50, 16)) * 0.3, jnp.float32)
    y = jnp.asarray(rng.integers(0, 50, (2, 37))).at[0, :5].set(IGNORE_INDEX)

    def ours(h, head):  # the 0.7 checks that the backward scales by the incoming cotangent
        total, count = chunked_token_loss(h, head, y, final_softcap=cap, chunk_tokens=16, head_h_axis=h_axis)
        assert int(count) == 69
        return 0.7 * total

    (v, (gh, gw)) = jax.value_and_grad(ours, (0, 1))(h, head)
    (v_ref, (gh_ref, gw_ref)) = jax.value_and_grad(lambda a, b: 0.7 * plain_loss(a, b, y, cap, h_axis), (0, 1))(h, head)
    np.testing.assert_allclose(v, v_ref, rtol=1e-6)
    np.testing.assert_allclose(gh, gh_ref, atol=2e-6)
    np.testing.assert_allclose(gw, gw_ref, atol=4e-6)


def test_bf16_gradients_stay_close():
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.standard_normal((1, 64, 32)), jnp.bfloat16)
    head = jnp.asarray(rng.standard_normal((32, 300)) * 0.2, jnp.bfloat16)
    y = jnp.asarray(rng.integers(0, 300, (1, 64)))
    g = jax.grad(lambda a: chunked_token_loss(a, head, y)[0])(h)
    g_ref = jax.grad(lambda a: plain_loss(a.astype(jnp.float32), head.astype(jnp.float32), y, None, 0))(h)
    assert g.dtype == jnp.bfloat16
    err = np.abs(np.asarray(g, np.float32) - np.asarray(g_ref, np.float32)).max()
    assert err < 2e-2 * np.abs(np.asarray(g_ref, np.float32)).max()


def test_default_chunks_are_whole_gemm_tiles():
    for n, v in ((8192, 128256), (4096, 256000), (100, 32000), (70000, 151936)):
        c = default_chunk_tokens(n, v)
        assert c % CHUNK_MULTIPLE == 0 and c * 4 * v <= max(1 << 28, 4 * v * CHUNK_MULTIPLE)

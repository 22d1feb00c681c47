"""Cross-entropy over the vocabulary in token chunks, so [tokens, vocab] float32 logits are never
all alive at once (for a 128k vocab and 16k tokens that would be 8 GiB).

The gradient is computed in the forward pass, chunk by chunk (softmax minus the one-hot target,
times the head): the backward pass only scales it. Differentiating a checkpointed chunk instead
would compute every chunk's logits twice, the largest GEMM of a small model's step.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100
CHUNK_MULTIPLE = 128  # chunk rows: a multiple of the GEMM tile, not an odd 523


def default_chunk_tokens(n_tokens: int, vocab: int) -> int:
    """~256 MiB of fp32 logits per chunk, rounded down to a multiple of CHUNK_MULTIPLE rows."""
    rows = (1 << 28) // (4 * vocab)
    rows = max(CHUNK_MULTIPLE, rows - rows % CHUNK_MULTIPLE)
    return min(rows, -(-n_tokens // CHUNK_MULTIPLE) * CHUNK_MULTIPLE)


def _head_dims(head_h_axis: int):
    """dot_general dims contracting the hidden axis of h [n, H] with the head's hidden axis."""
    return ((1,), (head_h_axis,)), ((), ())


def _chunk_loss(h_c, head, y_c, *, head_h_axis, final_softcap):
    """(loss sum of one chunk, its fp32 logits after softcap, their logsumexp, the label mask)."""
    z = jax.lax.dot_general(h_c, head, _head_dims(head_h_axis), preferred_element_type=jnp.float32)
    logits = z if final_softcap is None else final_softcap * jnp.tanh(z / final_softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = y_c != IGNORE_INDEX
    target = jnp.take_along_axis(logits, jnp.where(valid, y_c, 0)[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(valid, lse - target, 0.0)), logits, lse, valid


def _chunk_loss_and_grads(h_c, head, y_c, *, head_h_axis, final_softcap):
    """Loss sum of one chunk, d(loss)/d(h_c) and d(loss)/d(head), both in fp32 accumulation."""
    loss, logits, lse, valid = _chunk_loss(h_c, head, y_c, head_h_axis=head_h_axis,
                                           final_softcap=final_softcap)
    dlogits = jnp.exp(logits - lse[:, None])
    dlogits = dlogits - jax.nn.one_hot(jnp.where(valid, y_c, 0), logits.shape[-1], dtype=jnp.float32)
    dlogits = jnp.where(valid[:, None], dlogits, 0.0)
    if final_softcap is not None:  # d/dz c*tanh(z/c) = 1 - tanh^2
        dlogits = dlogits * (1.0 - jnp.square(logits / final_softcap))
    # 16-bit operands for the two GEMMs, as the autodiff of a 16-bit matmul would feed them.
    dl = dlogits.astype(h_c.dtype)
    dh = jax.lax.dot_general(dl, head, (((1,), (1 - head_h_axis,)), ((), ())),
                             preferred_element_type=jnp.float32)
    if head_h_axis == 0:  # head [H, V]: d head = h^T dl
        dhead = jax.lax.dot_general(h_c, dl, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    else:  # head [V, H]: d head = dl^T h
        dhead = jax.lax.dot_general(dl, h_c, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return loss, dh.astype(h_c.dtype), dhead


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_loss_sum(h, head, y, head_h_axis, final_softcap):
    """The loss alone (evaluation, or any call not differentiated): no gradient GEMMs."""
    def body(total, xs):
        h_c, y_c = xs
        return total + _chunk_loss(h_c, head, y_c, head_h_axis=head_h_axis, final_softcap=final_softcap)[0], None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, y))[0]


def _loss_and_grads(h, head, y, head_h_axis, final_softcap):
    """h [chunks, rows, H], y [chunks, rows] -> (loss sum, dh like h, dhead fp32 like head)."""
    def body(dhead, xs):
        h_c, y_c = xs
        loss, dh, dhead_c = _chunk_loss_and_grads(h_c, head, y_c, head_h_axis=head_h_axis,
                                                  final_softcap=final_softcap)
        return dhead + dhead_c, (loss, dh)

    # An unused head gradient (a frozen head, as in LoRA) is dead code that jit removes.
    dhead, (losses, dh) = jax.lax.scan(body, jnp.zeros(head.shape, jnp.float32), (h, y))
    return jnp.sum(losses), dh, dhead


def _chunked_loss_sum_fwd(h, head, y, head_h_axis, final_softcap):
    loss, dh, dhead = _loss_and_grads(h, head, y, head_h_axis, final_softcap)
    return loss, (dh, dhead.astype(head.dtype))


def _chunked_loss_sum_bwd(head_h_axis, final_softcap, res, g):
    dh, dhead = res
    return (g * dh).astype(dh.dtype), (g * dhead).astype(dhead.dtype), None


_chunked_loss_sum.defvjp(_chunked_loss_sum_fwd, _chunked_loss_sum_bwd)


def chunked_token_loss(hidden, head_weight, labels, *, final_softcap=None, chunk_tokens=None,
                       head_h_axis=0):
    """Returns (sum of per-token cross-entropy over labelled tokens, count of labelled tokens).

    hidden [B, T, H]; head_weight [H, V] (head_h_axis=0) or [V, H] (head_h_axis=1, e.g. a tied
    embedding, used as stored: no transposed copy); labels [B, T] with IGNORE_INDEX for no loss.
    """
    H = hidden.shape[-1]
    V = head_weight.shape[1 - head_h_axis]
    h = hidden.reshape(-1, H)
    y = labels.reshape(-1)
    n = h.shape[0]
    chunk_tokens = chunk_tokens or default_chunk_tokens(n, V)
    n_chunks = -(-n // chunk_tokens)
    pad = n_chunks * chunk_tokens - n
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, chunk_tokens, H)
    y = jnp.pad(y, (0, pad), constant_values=IGNORE_INDEX).reshape(n_chunks, chunk_tokens)
    count = jnp.sum(y != IGNORE_INDEX)
    return _chunked_loss_sum(h, head_weight, y, head_h_axis, final_softcap), count

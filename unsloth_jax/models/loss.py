"""Cross-entropy over the vocabulary in token chunks, so [tokens, vocab] float32 logits are never
all alive at once (for a 128k vocab and 16k tokens that would be 8 GiB)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def chunked_token_loss(hidden, head_weight, labels, *, final_softcap=None, chunk_tokens=None):
    """Returns (sum of per-token cross-entropy over labelled tokens, count of labelled tokens).

    hidden [B, T, H], head_weight [H, V], labels [B, T] with IGNORE_INDEX for no loss.
    Each chunk's logits are recomputed in the backward pass (jax.checkpoint) instead of stored.
    """
    H = hidden.shape[-1]
    V = head_weight.shape[-1]
    h = hidden.reshape(-1, H)
    y = labels.reshape(-1)
    n = h.shape[0]
    if chunk_tokens is None:
        chunk_tokens = max(64, min(n, (1 << 28) // (4 * V)))  # ~256 MiB of fp32 logits per chunk
    n_chunks = -(-n // chunk_tokens)
    pad = n_chunks * chunk_tokens - n
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, chunk_tokens, H)
    y = jnp.pad(y, (0, pad), constant_values=IGNORE_INDEX).reshape(n_chunks, chunk_tokens)

    @jax.checkpoint
    def chunk_loss(h_c, y_c):
        logits = jnp.dot(h_c, head_weight, preferred_element_type=jnp.float32)
        if final_softcap is not None:
            logits = final_softcap * jnp.tanh(logits / final_softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        valid = y_c != IGNORE_INDEX
        target = jnp.take_along_axis(logits, jnp.where(valid, y_c, 0)[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(valid, lse - target, 0.0)), jnp.sum(valid)

    def body(carry, xs):
        s, c = chunk_loss(*xs)
        return (carry[0] + s, carry[1] + c), None

    (total, count), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), (h, y))
    return total, count

"""Causal attention with RoPE applied inside, GQA, packing (segment ids), sliding window, softcap.

`flash_attention_reference` is the plain-jnp definition every kernel here must match.
Conventions (shared by the model and the kernels):
- q: [B, T, Hq, D], k/v: [B, T, Hkv, D], Hq a multiple of Hkv; q/k arrive *un-rotated*.
- positions: int [B, T]; RoPE uses HF's rotate-half layout with `inv_freq` [D//2] float32
  (any rope scaling already folded into inv_freq); inv_freq=None means no RoPE.
- segment_ids: int [B, T] or None; a query attends only to keys of the same segment id.
- causal: key index j <= query index i; sliding_window=W keeps keys with i - j < W.
- logit_softcap=c: scores become c * tanh(scores / c) before masking.
- scale: defaults to D ** -0.5.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def rope_cos_sin(positions, inv_freq):
    """cos/sin of shape [B, T, D] (halves repeated, HF layout) in float32."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate x [B, T, H, D] by cos/sin [B, T, D] (HF rotate_half); computed in float32."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention_mask(T_q, T_k, segment_ids_q=None, segment_ids_k=None, causal=True, sliding_window=None):
    """Boolean [B or 1, T_q, T_k] mask of which keys each query may see (query i at index i)."""
    i = jnp.arange(T_q)[:, None]
    j = jnp.arange(T_k)[None, :]
    mask = jnp.ones((T_q, T_k), dtype=bool)
    if causal:
        mask &= j <= i
    if sliding_window is not None:
        mask &= (i - j) < sliding_window
    mask = mask[None]
    if segment_ids_q is not None:
        mask = mask & (segment_ids_q[:, :, None] == segment_ids_k[:, None, :])
    return mask


def flash_attention_reference(q, k, v, *, positions=None, segment_ids=None, inv_freq=None,
                              causal=True, sliding_window=None, logit_softcap=None, scale=None):
    """Plain-jnp attention: returns [B, T, Hq, D] in q's dtype; softmax in float32."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if scale is None:
        scale = D ** -0.5
    if inv_freq is not None:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        cos, sin = rope_cos_sin(positions, inv_freq)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
    qg = q.reshape(B, T, Hkv, Hq // Hkv, D)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)
    mask = attention_mask(T, T, segment_ids, segment_ids, causal, sliding_window)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    # Rows with no visible key (cannot happen causally, but guard anyway) give zeros.
    probs = jnp.where(mask[:, None, None].any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, Hq, D).astype(q.dtype)

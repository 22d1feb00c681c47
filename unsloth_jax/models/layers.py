"""Pure functions for one decoder layer; parameters arrive as plain arrays (one layer's slice)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import attention as attention_lib

ACTIVATION_FNS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def rms_norm(x, weight, eps, offset=0.0):
    """RMSNorm in float32; Gemma's variant scales by (1 + w) (offset=1)."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (normed * (offset + weight.astype(jnp.float32))).astype(x.dtype)


def linear(x, p: dict, static=(0.0, 0.0), dropout_rng=None):
    """x @ kernel (+ bias) (+ LoRA: dropout(x) @ A @ (scale * B)), all in x's dtype.

    Matmuls accumulate in fp32 on GPU but write x's dtype: an fp32 output would double the bytes of
    every projection output, and keeping the LoRA term in x's dtype lets XLA add it into the base
    GEMM's output (cuBLAS beta=1) instead of a separate pass. PEFT adds its LoRA term in bf16 too."""
    from unsloth_jax.quant_linear import base_matmul

    y = base_matmul(x, p["kernel"])
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    if "lora_a" in p:
        scale, dropout = static
        xa = x
        if dropout and dropout_rng is not None:
            keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout, x.shape)
            xa = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
        a = jnp.einsum("...i,ir->...r", xa, p["lora_a"].astype(x.dtype))
        y = y + jnp.einsum("...r,ro->...o", a, (scale * p["lora_b"]).astype(x.dtype))
    return y


def full_sequence_attend(positions, segment_ids):
    """The training/prefill attention: causal over the whole sequence, no cache."""
    def attend(cfg, q, k, v, cache, *, inv_freq, kind):
        out = attention_lib.attention(
            q, k, v, positions=positions, segment_ids=segment_ids, inv_freq=inv_freq, causal=True,
            sliding_window=kind.sliding_window, logit_softcap=cfg.attn_logit_softcap, scale=cfg.attn_scale)
        return out, cache
    return attend


def decoder_layer(cfg, p, statics, x, attend, cache=None, *, inv_freq, kind, dropout_rng=None):
    """One pre-norm decoder layer. `attend(cfg, q, k, v, cache, inv_freq=, kind=) -> (out, cache)`
    takes un-rotated q/k (RoPE is the attention's job) and may read/update a KV cache."""
    B, T, _ = x.shape
    eps, off = cfg.rms_norm_eps, cfg.norm_offset
    rngs = list(jax.random.split(dropout_rng, 7)) if dropout_rng is not None else [None] * 7

    def proj(name, h, i):
        return linear(h, p[name], statics[name], rngs[i])

    h = rms_norm(x, p["attn_norm"], eps, off)
    q = proj("q_proj", h, 0).reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = proj("k_proj", h, 1).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = proj("v_proj", h, 2).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], eps, off)
        k = rms_norm(k, p["k_norm"], eps, off)
    attn, cache = attend(cfg, q, k, v, cache, inv_freq=inv_freq, kind=kind)
    out = proj("o_proj", attn.reshape(B, T, cfg.num_heads * cfg.head_dim), 3)
    if cfg.sandwich_norms:
        out = rms_norm(out, p["attn_post_norm"], eps, off)
    x = x + out

    h = rms_norm(x, p["mlp_norm"], eps, off)
    act = ACTIVATION_FNS[cfg.activation]
    gate = proj("gate_proj", h, 4)
    up = proj("up_proj", h, 5)
    out = proj("down_proj", (act(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x.dtype), 6)
    if cfg.sandwich_norms:
        out = rms_norm(out, p["mlp_post_norm"], eps, off)
    return x + out, cache

"""Autoregressive generation with a preallocated KV cache: one jitted prefill + `lax.while_loop` decode.

Layout: the cache holds k/v for every layer, [L, B, S, Hkv, D] with S = prompt length + max_new_tokens,
and is threaded through `run_layers` like the training forward, with its own `attend` that rotates
q/k (RoPE), writes the new k/v at the current slot and attends over the whole cache under a mask.

Batched prompts are left-padded as in Hugging Face (`attention_mask` 0 on the left): each row's first
real token gets position 0, padded slots are never attended to, and because the real tokens of a row
are contiguous, slot distance equals position distance, so causality and sliding windows are
computed on slots. Results match `transformers`' `generate` token for token when greedy.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.attention import NEG_INF, apply_rope, masked_attention, rope_cos_sin
from unsloth_jax.errors import ConfigError
from unsloth_jax.models.decoder import run_layers


# ---- attention over the cache ---------------------------------------------------------------------

def cached_attend(write_index, q_slots, positions, key_valid):
    """An `attend` for `run_layers` that reads and updates a KV cache.

    write_index: scalar slot where this call's T new tokens go; q_slots: [T] their slots;
    positions: [B, T] their RoPE positions; key_valid: [B, S] False for padded slots."""
    def attend(cfg, q, k, v, cache, *, inv_freq, kind):
        cos, sin = rope_cos_sin(positions, inv_freq)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), write_index, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), write_index, axis=1)
        out = _attention_over_cache(cfg, q, k_cache, v_cache, _cache_mask(q_slots, key_valid, kind.sliding_window))
        return out, {"k": k_cache, "v": v_cache}
    return attend


def _cache_mask(q_slots, key_valid, sliding_window: Optional[int]):
    """[B, T, S]: key slot j is visible to the query in slot i if valid, j <= i and within the window."""
    j = jnp.arange(key_valid.shape[1])[None, :]
    i = q_slots[:, None]
    visible = j <= i
    if sliding_window is not None:
        visible &= (i - j) < sliding_window
    return visible[None] & key_valid[:, None, :]


def _attention_over_cache(cfg, q, k, v, mask):
    """q [B, T, Hq, D] against the cache k/v [B, S, Hkv, D] with the training attention's scale and
    logit softcap."""
    scale = cfg.attn_scale if cfg.attn_scale is not None else q.shape[-1] ** -0.5
    return masked_attention(q, k, v, mask, scale=scale, logit_softcap=cfg.attn_logit_softcap)


def forward_with_cache(model, token_ids, cache, write_index, positions, key_valid):
    """Next-token logits [B, V] after `token_ids` [B, T] placed at slots write_index.., plus the
    updated cache. Only the last position goes through the head: a [B, T, V] prompt logit tensor
    would be the largest array of a long prefill."""
    T = token_ids.shape[1]
    q_slots = write_index + jnp.arange(T)
    x = model.embed_tokens(token_ids)
    x, cache = run_layers(model.config, model.layers.arrays(model.config), model.layer_statics(), x,
                          cached_attend(write_index, q_slots, positions, key_valid), cache)
    return model.logits(model.final_hidden(x[:, -1:]))[:, 0], cache


def init_cache(cfg, batch: int, length: int, dtype) -> dict:
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


# ---- choosing the next token ------------------------------------------------------------------------

def sample_token(logits, rng, greedy: bool, temperature, top_k, top_p):
    """Next token [B] from last-position logits [B, V]: argmax when `greedy` (static), otherwise a
    sample from softmax(logits / temperature) restricted to the top_k tokens and to the smallest set
    whose probability reaches top_p (HF's order: temperature, top-k, top-p). temperature, top_k
    and top_p are traced scalars, so changing them does not recompile (top_k >= V and top_p >= 1
    switch the filters off)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    descending = jnp.sort(logits, axis=-1)[:, ::-1]
    kth = jnp.take(descending, jnp.clip(top_k, 1, logits.shape[-1]) - 1, axis=-1)[:, None]
    descending = jnp.where(descending < kth, NEG_INF, descending)
    probs = jax.nn.softmax(descending, axis=-1)
    # Keep a token while the mass strictly before it is below top_p (so the top token always stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < jnp.maximum(cutoff, kth), NEG_INF, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ---- the loop ---------------------------------------------------------------------------------------

@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "greedy"))
def _generate_jit(model, input_ids, attention_mask, eos_ids, pad_token_id, rng, sampling, *,
                  max_new_tokens: int, greedy: bool):
    """Returns (tokens [B, T + max_new_tokens], number of new tokens actually produced)."""
    B, T = input_ids.shape
    valid_prompt = attention_mask.astype(bool)
    prompt_positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)
    real_len = jnp.sum(attention_mask, axis=1).astype(jnp.int32)  # position of the first new token
    # Generated slots are always valid keys; causality hides those not yet written.
    key_valid = jnp.concatenate([valid_prompt, jnp.ones((B, max_new_tokens), bool)], axis=1)
    pick = functools.partial(sample_token, greedy=greedy, **sampling)

    cache = init_cache(model.config, B, T + max_new_tokens, model.dtype)
    logits, cache = forward_with_cache(model, input_ids, cache, 0, prompt_positions, key_valid)
    first = pick(logits, jax.random.fold_in(rng, 0))
    out = jnp.concatenate([input_ids.astype(jnp.int32),
                           jnp.full((B, max_new_tokens), pad_token_id, jnp.int32)], axis=1)
    out = out.at[:, T].set(first)
    done = jnp.isin(first, eos_ids)

    def keep_going(carry):
        _, _, n, done = carry
        return (n < max_new_tokens) & ~jnp.all(done)

    def step(carry):
        out, cache, n, done = carry
        prev = jax.lax.dynamic_slice_in_dim(out, T + n - 1, 1, axis=1)
        logits, cache = forward_with_cache(model, prev, cache, T + n - 1, (real_len + n - 1)[:, None], key_valid)
        token = pick(logits, jax.random.fold_in(rng, n))
        token = jnp.where(done, pad_token_id, token)  # finished rows are padded, as in HF
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], T + n, axis=1)
        return out, cache, n + 1, done | jnp.isin(token, eos_ids)

    out, _, n, _ = jax.lax.while_loop(keep_going, step, (out, cache, jnp.int32(1), done))
    return out, n


def default_eos_ids(model) -> list[int]:
    """EOS ids from the model's HF config (what `transformers` would stop on by default)."""
    eos = (model.config.hf_config or {}).get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def generate(model, input_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id: Union[int, Sequence[int], None] = None,
             attention_mask=None, pad_token_id: int = 0, seed: int = 0) -> np.ndarray:
    """Generate up to `max_new_tokens` after each prompt row; returns np.int32 [B, T + n] like HF's
    `generate` (prompt included, n <= max_new_tokens: the loop stops once every row has produced an
    EOS; rows that finished earlier are filled with pad_token_id).

    input_ids: [B, T] or [T]; batched prompts of different lengths are left-padded with
    attention_mask [B, T] (1 = real token, 0 = padding), as a HF tokenizer with padding_side='left'
    returns. eos_token_id: an id or list of ids; None uses the model config's eos_token_id.
    Greedy when temperature == 0; otherwise samples (top_k / top_p optional) from `seed`."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ConfigError(f"generate: input_ids must be [batch, length] with length >= 1, got shape {ids.shape}.")
    if max_new_tokens < 1:
        raise ConfigError(f"generate: max_new_tokens={max_new_tokens}; it must be >= 1.")
    if temperature < 0:
        raise ConfigError(f"generate: temperature={temperature}; use 0 for greedy or a positive value to sample.")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape)
    if not mask[:, -1].all():
        raise ConfigError("generate: attention_mask has padding on the right; pad prompts on the left "
                          "(tokenizer.padding_side = 'left') so every row's last token is real.")
    if eos_token_id is None:
        eos = default_eos_ids(model)
    else:
        eos = [eos_token_id] if np.isscalar(eos_token_id) else list(eos_token_id)
    eos_ids = jnp.asarray(eos or [-1], jnp.int32)  # -1 matches no token: never stop early
    sampling = {"temperature": jnp.float32(max(temperature, 1e-6)),
                "top_k": jnp.int32(top_k if top_k is not None else model.config.vocab_size),
                "top_p": jnp.float32(top_p if top_p is not None else 1.0)}
    out, n = _generate_jit(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), eos_ids,
                           jnp.int32(pad_token_id), jax.random.PRNGKey(seed), sampling,
                           max_new_tokens=int(max_new_tokens), greedy=temperature == 0)
    return np.asarray(out)[:, : ids.shape[1] + int(n)]

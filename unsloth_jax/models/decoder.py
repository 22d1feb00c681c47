"""One decoder for every supported family. Layers are stacked along a leading axis and scanned.

Parameters live in NNX Variables (`nnx.Param` for base weights, `LoRAParam` for adapters); the
forward pass pulls their arrays into plain pytrees and runs pure functions over them, so the same
code serves jit, grad, scan and remat without NNX machinery in the hot path.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from unsloth_jax.models.config import ModelConfig
from unsloth_jax.models.layers import decoder_layer, full_sequence_attend, rms_norm
from unsloth_jax.models.loss import chunked_token_loss

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix: the only trainable Variable type in LoRA fine-tuning."""


def _init(rngs: Optional[nnx.Rngs], shape, dtype, std=0.02):
    if rngs is None:
        return jnp.zeros(shape, dtype)
    # Drawn in the target dtype: a float32 draw of an 8B model's largest stack would add 7.5 GiB.
    return std * jax.random.normal(rngs.params(), shape, dtype)


class StackedLinear(nnx.Module):
    """`x @ kernel (+ bias)` for every layer at once: kernel [L, in, out]. LoRA adds lora_a/lora_b."""

    def __init__(self, num_layers, d_in, d_out, *, bias, dtype, rngs):
        self.kernel = nnx.Param(_init(rngs, (num_layers, d_in, d_out), dtype))
        self.bias = nnx.data(nnx.Param(jnp.zeros((num_layers, d_out), dtype)) if bias else None)
        self.lora_a = nnx.data(None)  # LoRAParam [L, in, r] once adapters are attached
        self.lora_b = nnx.data(None)  # LoRAParam [L, r, out]
        self.lora_scale = 0.0
        self.lora_dropout = 0.0

    def arrays(self) -> dict:
        out = {"kernel": self.kernel.value}
        if self.bias is not None:
            out["bias"] = self.bias.value
        if self.lora_a is not None:
            out["lora_a"] = self.lora_a.value
            out["lora_b"] = self.lora_b.value
        return out

    def static(self) -> tuple:
        return (self.lora_scale, self.lora_dropout)


class LayerStack(nnx.Module):
    """All decoder layers' parameters, each with a leading layer axis."""

    def __init__(self, cfg: ModelConfig, dtype, rngs):
        L, H, I = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        shapes = {"q_proj": (H, q_out, cfg.qkv_bias), "k_proj": (H, kv_out, cfg.qkv_bias),
                  "v_proj": (H, kv_out, cfg.qkv_bias), "o_proj": (q_out, H, cfg.o_bias),
                  "gate_proj": (H, I, cfg.mlp_bias), "up_proj": (H, I, cfg.mlp_bias),
                  "down_proj": (I, H, cfg.mlp_bias)}
        for name, (d_in, d_out, bias) in shapes.items():
            setattr(self, name, StackedLinear(L, d_in, d_out, bias=bias, dtype=dtype, rngs=rngs))
        norm_init = jnp.zeros if cfg.norm_offset else jnp.ones
        for name in self.norm_names(cfg):
            size = cfg.head_dim if name in ("q_norm", "k_norm") else H
            setattr(self, name, nnx.Param(norm_init((L, size), dtype)))

    @staticmethod
    def norm_names(cfg: ModelConfig) -> tuple:
        names = ["attn_norm", "mlp_norm"]
        if cfg.sandwich_norms:
            names += ["attn_post_norm", "mlp_post_norm"]
        if cfg.qk_norm:
            names += ["q_norm", "k_norm"]
        return tuple(names)

    def linears(self) -> dict:
        return {name: getattr(self, name) for name in PROJECTIONS}

    def arrays(self, cfg: ModelConfig) -> dict:
        out = {name: lin.arrays() for name, lin in self.linears().items()}
        out.update({name: getattr(self, name).value for name in self.norm_names(cfg)})
        return out


class Decoder(nnx.Module):
    """Decoder-only LM. `model(input_ids)` -> float32 logits; `model.loss(input_ids, labels)`."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        V, H = config.vocab_size, config.hidden_size
        self.embed = nnx.Param(_init(rngs, (V, H), dtype))
        self.layers = LayerStack(config, dtype, rngs)
        self.final_norm = nnx.Param((jnp.zeros if config.norm_offset else jnp.ones)((H,), dtype))
        self.lm_head = nnx.data(None if config.tie_word_embeddings else nnx.Param(_init(rngs, (H, V), dtype)))
        self.remat_policy = "none"       # set by get_peft_model / the trainer
        self.training = False            # enables LoRA dropout

    # ---- forward ---------------------------------------------------------------------------
    def __call__(self, input_ids, positions=None, segment_ids=None, *, dropout_rng=None):
        hidden = self.hidden_states(input_ids, positions, segment_ids, dropout_rng=dropout_rng)
        return self.logits(hidden)

    def hidden_states(self, input_ids, positions=None, segment_ids=None, *, dropout_rng=None):
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if positions is None:
            positions = default_positions(input_ids.shape, segment_ids)
        x = self.embed_tokens(input_ids)
        statics = self.layer_statics()
        x, _ = run_layers(cfg, self.layers.arrays(cfg), statics, x, full_sequence_attend(positions, segment_ids),
                          remat_policy=self.remat_policy, dropout_rng=dropout_rng if self.training else None)
        return self.final_hidden(x)

    def embed_tokens(self, input_ids):
        x = jnp.take(self.embed.value, jnp.asarray(input_ids), axis=0)
        if self.config.scale_embeddings:
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, dtype=x.dtype)
        return x

    def layer_statics(self) -> dict:
        return {name: lin.static() for name, lin in self.layers.linears().items()}

    def final_hidden(self, x):
        return rms_norm(x, self.final_norm.value, self.config.rms_norm_eps, self.config.norm_offset)

    def head_weight(self):
        """[H, V] output projection (the transposed embedding when tied)."""
        return self.embed.value.T if self.lm_head is None else self.lm_head.value

    def logits(self, hidden):
        logits = jnp.einsum("bth,hv->btv", hidden, self.head_weight(), preferred_element_type=jnp.float32)
        return softcap(logits, self.config.final_logit_softcap)

    def loss_sum_and_count(self, input_ids, labels, positions=None, segment_ids=None, *, dropout_rng=None):
        """(sum of token cross-entropies, number of labelled tokens); labels are already shifted."""
        hidden = self.hidden_states(input_ids, positions, segment_ids, dropout_rng=dropout_rng)
        # A tied head is the embedding [V, H] as stored (a transposed copy per step costs a pass).
        head, h_axis = (self.embed.value, 1) if self.lm_head is None else (self.lm_head.value, 0)
        return chunked_token_loss(hidden, head, jnp.asarray(labels), head_h_axis=h_axis,
                                  final_softcap=self.config.final_logit_softcap)

    def loss(self, input_ids, labels, positions=None, segment_ids=None):
        total, count = self.loss_sum_and_count(input_ids, labels, positions, segment_ids)
        return total / jnp.maximum(count, 1)

    # ---- export and inference (thin doors into converters/ and generate.py) ---------------------
    def save_pretrained(self, save_directory, **kwargs):
        """PEFT adapter (adapter_config.json + adapter_model.safetensors), or the full model when
        there is no adapter."""
        from converters.peft import save_adapter

        return save_adapter(self, save_directory, **kwargs)

    def save_pretrained_merged(self, save_directory, tokenizer=None, save_method="merged_16bit", **kwargs):
        from converters.peft import save_merged

        return save_merged(self, save_directory, tokenizer, save_method=save_method, **kwargs)

    def generate(self, input_ids, max_new_tokens=64, temperature=0.0, **kwargs):
        from unsloth_jax.generate import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, **kwargs)


def softcap(x, cap):
    return x if cap is None else cap * jnp.tanh(x / cap)


def default_positions(shape, segment_ids=None):
    """0..T-1 per row, or restarting at 0 at each new segment when segment_ids is given."""
    B, T = shape
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
        return idx
    segment_ids = jnp.asarray(segment_ids)
    starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs that have no batch dims (the projections); recompute cheap elementwise work.
    "selective": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_layers(cfg: ModelConfig, params: dict, statics: dict, x, attend, cache=None, *,
               remat_policy="none", dropout_rng=None):
    """Scan over groups of `len(cfg.layer_pattern)` layers (1 for Llama, 2 for Gemma 2, 6 for
    Gemma 3); each layer kind is static so its attention variant compiles once.

    `cache` (optional) is a pytree with a leading layer axis, threaded through `attend` (KV cache
    for generation). Returns (x, updated cache)."""
    pattern = cfg.layer_pattern
    period = len(pattern)
    L = cfg.num_layers
    n_groups, tail = divmod(L, period)
    inv_freqs = {k: jnp.asarray(v) for k, v in cfg.rope_tables().items()}

    def layer_step(x, layer_params, layer_cache, kind, layer_index):
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, layer_index)
        return decoder_layer(cfg, layer_params, statics, x, attend, layer_cache,
                             inv_freq=inv_freqs[kind.rope], kind=kind, dropout_rng=rng)

    def group_step(x, scanned):
        group_params, group_cache, group_index = scanned
        new_cache = []
        for j, kind in enumerate(pattern):
            take = lambda a: a[j]
            x, c = layer_step(x, jax.tree.map(take, group_params), jax.tree.map(take, group_cache), kind,
                              group_index * period + j)
            new_cache.append(c)
        return x, jax.tree.map(lambda *cs: jnp.stack(cs), *new_cache) if cache is not None else None

    def split_groups(tree):
        return jax.tree.map(lambda a: a[: n_groups * period].reshape(n_groups, period, *a.shape[1:]), tree)

    x, group_cache = jax.lax.scan(_remat(group_step, remat_policy), x,
                                  (split_groups(params), split_groups(cache), jnp.arange(n_groups)))
    caches = [] if cache is None else [jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), group_cache)]
    for j in range(tail):
        i = n_groups * period + j
        take = lambda a: a[i]
        x, c = layer_step(x, jax.tree.map(take, params), jax.tree.map(take, cache), pattern[j], i)
        if cache is not None:
            caches.append(jax.tree.map(lambda a: a[None], c))
    new_cache = None if cache is None else jax.tree.map(lambda *cs: jnp.concatenate(cs), *caches)
    return x, new_cache


def _remat(fn, policy_name):
    if policy_name in (None, "none", False):
        return fn
    if policy_name == "offload":
        policy = jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
            offload_src="device", offload_dst="pinned_host")
        return jax.checkpoint(_name_layer_input(fn), policy=policy, prevent_cse=False)
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy_name], prevent_cse=False)


def _name_layer_input(fn):
    from jax.ad_checkpoint import checkpoint_name

    def named(x, scanned):
        return fn(checkpoint_name(x, "layer_input"), scanned)
    return named

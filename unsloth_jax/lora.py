"""LoRA adapters on the stacked projections, PEFT-compatible (names, init, scaling).

Adapters are `LoRAParam`s: lora_a [L, in, r] and lora_b [L, r, out] beside each targeted kernel.
PEFT stores A as [r, in] and B as [out, r]; the transposes happen in converters/peft.py.
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from unsloth_jax.compat import has_host_memory_space
from unsloth_jax.errors import ConfigError
from unsloth_jax.models.decoder import PROJECTIONS, Decoder, LoRAParam
from unsloth_jax.quant import is_nf4

log = logging.getLogger("unsloth_jax")

SAVABLE_MODULES = {"embed_tokens": "embed", "lm_head": "lm_head"}


class SavedModuleParam(nnx.Param):
    """A base weight trained in full beside LoRA (PEFT's modules_to_save: embed_tokens, lm_head)."""


def resolve_remat(use_gradient_checkpointing) -> str:
    """Map Unsloth's `use_gradient_checkpointing` values to a remat policy name."""
    value = use_gradient_checkpointing
    if isinstance(value, str):
        value = value.lower()
    if value in (False, None, "false", "none", "no"):
        return "none"
    if value in (True, "true", "full", "yes"):
        return "full"
    if value == "selective":
        return "selective"
    if value in ("unsloth", "offload"):
        if has_host_memory_space():
            return "offload"
        log.info("gradient_checkpointing='unsloth': this backend has no host memory space; "
                 "recomputing each layer instead (same as True).")
        return "full"
    raise ConfigError(f"use_gradient_checkpointing={use_gradient_checkpointing!r}: use False, True, "
                      f"'unsloth' or 'selective'.")


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def validate_targets(target_modules) -> list[str]:
    if isinstance(target_modules, str):
        target_modules = list(PROJECTIONS) if target_modules == "all-linear" else [target_modules]
    targets = list(target_modules)
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown or not targets:
        raise ConfigError(f"target_modules {unknown or targets} match no module of this model; "
                          f"modules that exist: {', '.join(PROJECTIONS)} (or 'all-linear').")
    return targets


def add_lora(model: Decoder, *, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS,
             use_rslora=False, random_state=3407, modules_to_save: Optional[Iterable[str]] = None,
             use_gradient_checkpointing="unsloth") -> Decoder:
    """Attach adapters in place (A Kaiming-uniform as PEFT, B zeros) and mark what trains."""
    if not isinstance(r, int) or r <= 0:
        raise ConfigError(f"r={r!r}: the LoRA rank must be a positive integer (e.g. 8, 16, 32).")
    if lora_alpha is None or lora_alpha <= 0:
        raise ConfigError(f"lora_alpha={lora_alpha!r}: must be > 0 (commonly equal to r).")
    if not 0.0 <= lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout={lora_dropout!r}: must be in [0, 1).")
    targets = validate_targets(target_modules)
    key = jax.random.PRNGKey(random_state)
    scale = lora_scale(r, lora_alpha, use_rslora)
    for name in targets:
        lin = getattr(model.layers, name)
        L, d_in, d_out = _kernel_shape(lin.kernel.value)
        if r > min(d_in, d_out):
            raise ConfigError(f"r={r} is larger than {name}'s smaller dimension min({d_in}, {d_out}); "
                              f"use r <= {min(d_in, d_out)}.")
        key, sub = jax.random.split(key)
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on [r, in], as PEFT
        lin.lora_a = LoRAParam(jax.random.uniform(sub, (L, d_in, r), jnp.float32, -bound, bound))
        lin.lora_b = LoRAParam(jnp.zeros((L, r, d_out), jnp.float32))
        lin.lora_scale = float(scale)
        lin.lora_dropout = float(lora_dropout)
    saved = []
    for m in modules_to_save or ():
        if m not in SAVABLE_MODULES:
            raise ConfigError(f"modules_to_save: {m!r} is not supported; use {sorted(SAVABLE_MODULES)}.")
        attr = SAVABLE_MODULES[m]
        var = getattr(model, attr)
        if var is None:
            raise ConfigError(f"modules_to_save: {m!r} does not exist here (the model ties lm_head to "
                              f"embed_tokens); train 'embed_tokens' instead.")
        setattr(model, attr, SavedModuleParam(var.value))
        saved.append(m)
    model.remat_policy = resolve_remat(use_gradient_checkpointing)
    model.peft_config = {"r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
                         "target_modules": targets, "use_rslora": bool(use_rslora), "modules_to_save": saved or None}
    return model


def _kernel_shape(kernel):
    if is_nf4(kernel):  # stacked over layers; its .shape is the per-layer HF [out, in]
        out_f, in_f = kernel.shape
        L = jax.tree.leaves(kernel)[0].shape[0]
        return L, in_f, out_f
    return kernel.shape


def trainable_filter(model: Decoder):
    """Which Variables get gradients and optimizer state."""
    if getattr(model, "full_finetuning", False):
        return nnx.Param
    return nnx.Any(LoRAParam, SavedModuleParam)


def lora_delta(lin, layer: int):
    """scale * A @ B for one layer in our [in, out] layout (fp32)."""
    return lin.lora_scale * (lin.lora_a.value[layer].astype(jnp.float32) @ lin.lora_b.value[layer].astype(jnp.float32))

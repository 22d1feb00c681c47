"""Unsloth-shaped public API: FastLanguageModel.from_pretrained / get_peft_model / for_inference."""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

from unsloth_jax.errors import ConfigError

log = logging.getLogger("unsloth_jax")

DTYPE_NAMES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
               "float16": jnp.float16, "fp16": jnp.float16}


def resolve_dtype(dtype):
    """None -> bf16 on GPU/TPU, fp32 on CPU; strings like 'float32'/'bf16'; or a jnp dtype."""
    if dtype is None:
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPE_NAMES:
            raise ConfigError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPE_NAMES)} or None.")
        return DTYPE_NAMES[dtype.lower()]
    return jnp.dtype(dtype).type


def load_tokenizer(model_dir: str):
    """AutoTokenizer from the model dir, or None (with a log line) when the dir ships no tokenizer."""
    from transformers import AutoTokenizer

    if not any(os.path.exists(os.path.join(model_dir, f)) for f in
               ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        log.warning("%s: no tokenizer files; returning tokenizer=None.", model_dir)
        return None
    return AutoTokenizer.from_pretrained(model_dir)


def describe_device_bytes(model) -> str:
    """'model device bytes: X GiB (NF4 projections Y GiB, 16-bit rest Z GiB)' for the log."""
    from flax import nnx

    from unsloth_jax.quant import is_nf4, nf4_nbytes
    from unsloth_jax.train.memory import gib, tree_nbytes

    total = tree_nbytes(nnx.state(model))
    nf4 = sum(nf4_nbytes(lin.kernel.value) for lin in model.layers.linears().values() if is_nf4(lin.kernel.value))
    detail = f" (NF4 projections {gib(nf4)}, 16-bit rest {gib(total - nf4)})" if nf4 else ""
    return f"model device bytes: {gib(total)}{detail}"


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name, max_seq_length=2048, dtype=None, load_in_4bit=False,
                        full_finetuning=False, **kwargs):
        """Load a HF checkpoint (local dir or hub id) -> (model, tokenizer). See DESIGN.md."""
        from converters.hf import load_decoder, resolve_model_dir

        model_dir = resolve_model_dir(model_name)
        if os.path.isfile(os.path.join(model_dir, "adapter_config.json")):  # PEFT adapter: base + adapter
            from converters.peft import adapter_base_path, load_adapter

            model, tokenizer = FastLanguageModel.from_pretrained(
                adapter_base_path(model_dir), max_seq_length, dtype, load_in_4bit, full_finetuning, **kwargs)
            has_tokenizer = os.path.isfile(os.path.join(model_dir, "tokenizer_config.json"))
            return load_adapter(model, model_dir), load_tokenizer(model_dir) if has_tokenizer else tokenizer
        dtype = resolve_dtype(dtype)
        quantize, quantize_filter = None, (lambda spec: False)
        if load_in_4bit:
            from unsloth_jax.quant import quantize_nf4

            quantize = quantize_nf4
            quantize_filter = lambda spec: spec.path[-1] == "kernel"  # decoder-layer projections only
        model = load_decoder(model_dir, dtype, quantize=quantize, quantize_filter=quantize_filter)
        log.info(describe_device_bytes(model))
        model.max_seq_length = max_seq_length
        model.name_or_path = str(model_name)
        model.full_finetuning = bool(full_finetuning)
        return model, load_tokenizer(model_dir)

    @staticmethod
    def get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0,
                       target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                       use_rslora=False, use_gradient_checkpointing="unsloth", random_state=3407,
                       modules_to_save=None, bias="none", **kwargs):
        """Attach LoRA adapters (PEFT init and naming) in place and return the model."""
        from unsloth_jax.lora import add_lora

        if bias != "none":
            raise ConfigError(f"bias={bias!r}: only bias='none' is supported (as Unsloth recommends).")
        if getattr(model, "full_finetuning", False):
            from unsloth_jax.lora import resolve_remat

            model.remat_policy = resolve_remat(use_gradient_checkpointing)
            return model
        return add_lora(model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=target_modules, use_rslora=use_rslora, random_state=random_state,
                        modules_to_save=modules_to_save, use_gradient_checkpointing=use_gradient_checkpointing)

    @staticmethod
    def for_inference(model):
        """Switch off dropout and remat for generation."""
        model.training = False
        model.remat_policy = "none"
        return model

    @staticmethod
    def for_training(model):
        model.training = True
        return model

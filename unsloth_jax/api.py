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


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name, max_seq_length=2048, dtype=None, load_in_4bit=False,
                        full_finetuning=False, **kwargs):
        """Load a HF checkpoint (local dir or hub id) -> (model, tokenizer). See DESIGN.md."""
        from converters.hf import load_decoder, resolve_model_dir

        model_dir = resolve_model_dir(model_name)
        dtype = resolve_dtype(dtype)
        quantize, quantize_filter = None, (lambda spec: False)
        if load_in_4bit:
            from unsloth_jax.quant import quantize_nf4

            quantize = quantize_nf4
            quantize_filter = lambda spec: spec.path[-1] == "kernel"  # decoder-layer projections only
        model = load_decoder(model_dir, dtype, quantize=quantize, quantize_filter=quantize_filter)
        model.max_seq_length = max_seq_length
        model.name_or_path = str(model_name)
        model.full_finetuning = bool(full_finetuning)
        return model, load_tokenizer(model_dir)

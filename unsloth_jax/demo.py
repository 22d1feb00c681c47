"""The embedded demo: a tiny random Llama in HF format with a tokenizer trained on the demo data.

Nothing is downloaded: the model is built here from a config, saved with our own HF writer, and
loaded back through the same loader a real checkpoint goes through.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

DEMO_SHAPE = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-5,
                  rope_theta=10000.0)


def build_demo_model(out_dir: str, vocab_size: int = 512, seed: int = 0) -> str:
    """Write a tiny Llama (random weights) + BPE tokenizer to out_dir, unless already there."""
    from transformers import LlamaConfig

    from converters.hf import save_hf_model
    from unsloth_jax.data import demo_tokenizer
    from unsloth_jax.models import Decoder, ModelConfig

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    tokenizer = demo_tokenizer(vocab_size=vocab_size, chat_template="chatml")
    hf = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **DEMO_SHAPE)
    hf.architectures = ["LlamaForCausalLM"]
    model = Decoder(ModelConfig.from_hf(hf.to_dict()), dtype=jnp.float32, rngs=nnx.Rngs(seed))
    save_hf_model(model, out_dir, extra_files=tokenizer.save_pretrained)
    return out_dir

"""unsloth_jax: fast, memory-lean LoRA / QLoRA / full fine-tuning of LLMs in pure JAX."""
from unsloth_jax.api import FastLanguageModel
from unsloth_jax.errors import UnslothJaxError

__all__ = ["FastLanguageModel", "UnslothJaxError"]
__version__ = "0.1.0"

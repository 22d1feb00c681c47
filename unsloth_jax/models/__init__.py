from unsloth_jax.models.config import ModelConfig, LayerKind, SUPPORTED_MODEL_TYPES, rope_inv_freq
from unsloth_jax.models.decoder import Decoder, LoRAParam, PROJECTIONS, default_positions

__all__ = ["ModelConfig", "LayerKind", "SUPPORTED_MODEL_TYPES", "rope_inv_freq", "Decoder", "LoRAParam",
           "PROJECTIONS", "default_positions"]

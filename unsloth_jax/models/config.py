"""ModelConfig: every supported family is the same decoder with different data in these fields."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np

from unsloth_jax.errors import UnsupportedModelError

# Per-family quirks. Everything not listed is read from the HF config or takes the Llama default.
FAMILY_QUIRKS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "gemma": {"norm_offset": 1.0, "scale_embeddings": True},
    "gemma2": {"norm_offset": 1.0, "scale_embeddings": True, "sandwich_norms": True},
    "gemma3_text": {"norm_offset": 1.0, "scale_embeddings": True, "sandwich_norms": True, "qk_norm": True},
}
SUPPORTED_MODEL_TYPES = tuple(FAMILY_QUIRKS)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
               "gelu": "gelu", "gelu_new": "gelu_tanh"}


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What differs between layers of one model: static, so each kind compiles its own attention."""
    sliding_window: Optional[int]  # None: full causal attention
    rope: str                      # key into ModelConfig.rope_tables(): "global" or "local"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0          # Gemma's RMSNorm multiplies by (1 + w)
    scale_embeddings: bool = False    # Gemma multiplies embeddings by sqrt(hidden)
    sandwich_norms: bool = False      # Gemma 2/3: norms before *and* after attention and MLP
    attn_logit_softcap: Optional[float] = None
    final_logit_softcap: Optional[float] = None
    attn_scale: Optional[float] = None  # None: head_dim ** -0.5
    tie_word_embeddings: bool = False
    rope: tuple = ()                  # ((name, theta, rope_type, frozen scaling items), ...)
    layer_kinds: tuple = ()           # one LayerKind per layer
    max_position_embeddings: int = 8192
    hf_config: Optional[dict] = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    # ---- derived ---------------------------------------------------------------------------
    @property
    def layer_pattern(self) -> tuple:
        """The shortest period p with layer_kinds[i] == layer_kinds[i % p] (1 for Llama, 2 for Gemma 2)."""
        kinds = self.layer_kinds
        for p in range(1, len(kinds) + 1):
            if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
                return kinds[:p]
        return kinds

    def rope_tables(self) -> dict[str, np.ndarray]:
        """name -> inv_freq [head_dim // 2] float32, with rope scaling folded in."""
        return {name: rope_inv_freq(self.head_dim, theta, rtype, dict(scaling))
                for name, theta, rtype, scaling in self.rope}

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: Any, source: str = "config.json") -> "ModelConfig":
        """Build from a transformers config object or its dict (`config.json`)."""
        d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        model_type = d.get("model_type")
        if model_type not in FAMILY_QUIRKS:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} is not supported; supported model types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
        quirks = FAMILY_QUIRKS[model_type]
        num_heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        head_dim = d.get("head_dim") or hidden // num_heads
        act_name = d.get("hidden_activation") or d.get("hidden_act") or "silu"
        if act_name not in ACTIVATIONS:
            raise UnsupportedModelError(f"{source}: activation {act_name!r} is not supported "
                                        f"(supported: {', '.join(ACTIVATIONS)}).")
        num_layers = d["num_hidden_layers"]
        rope, layer_kinds = _rope_and_layer_kinds(d, model_type, num_layers, source)
        qpas = d.get("query_pre_attn_scalar")
        bias = bool(d.get("attention_bias") or False)
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            activation=ACTIVATIONS[act_name],
            qkv_bias=quirks.get("qkv_bias", bias),
            o_bias=bias,
            mlp_bias=bool(d.get("mlp_bias") or False),
            qk_norm=quirks.get("qk_norm", False),
            norm_offset=quirks.get("norm_offset", 0.0),
            scale_embeddings=quirks.get("scale_embeddings", False),
            sandwich_norms=quirks.get("sandwich_norms", False),
            attn_logit_softcap=d.get("attn_logit_softcapping"),
            final_logit_softcap=d.get("final_logit_softcapping"),
            attn_scale=(qpas ** -0.5) if qpas else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            rope=rope,
            layer_kinds=layer_kinds,
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            hf_config=d,
        )


def _rope_params(d: dict) -> dict:
    """{'global': {...}, 'local': {...}?} from old-style (rope_theta/rope_scaling) or new-style
    (rope_parameters, possibly per layer type) HF configs."""
    rp = d.get("rope_parameters")
    if rp and ("full_attention" in rp or "sliding_attention" in rp):
        out = {"global": dict(rp.get("full_attention") or {})}
        if "sliding_attention" in rp:
            out["local"] = dict(rp["sliding_attention"])
        return out
    if rp:
        return {"global": dict(rp)}
    glob = dict(d.get("rope_scaling") or {})
    glob["rope_theta"] = d.get("rope_theta", 10000.0)
    out = {"global": glob}
    if d.get("rope_local_base_freq"):
        out["local"] = {"rope_type": "default", "rope_theta": d["rope_local_base_freq"]}
    return out


def _rope_and_layer_kinds(d: dict, model_type: str, num_layers: int, source: str):
    params = _rope_params(d)
    rope = []
    for name, p in params.items():
        rtype = p.get("rope_type") or p.get("type") or "default"
        if rtype not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"{source}: rope scaling type {rtype!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}.")
        scaling = tuple(sorted((k, v) for k, v in p.items()
                               if k not in ("rope_type", "type", "rope_theta") and not isinstance(v, (list, dict))))
        rope.append((name, float(p.get("rope_theta", 10000.0)), rtype, scaling))
    window = d.get("sliding_window")
    kinds = []
    for i, is_sliding in enumerate(_sliding_layers(d, model_type, num_layers)):
        sliding = is_sliding and window is not None
        rope_name = "local" if sliding and "local" in params else "global"
        kinds.append(LayerKind(sliding_window=int(window) if sliding else None, rope=rope_name))
    return tuple(rope), tuple(kinds)


def _sliding_layers(d: dict, model_type: str, num_layers: int) -> list[bool]:
    if d.get("layer_types"):
        return [t == "sliding_attention" for t in d["layer_types"]]
    if model_type == "gemma2":
        return [i % 2 == 0 for i in range(num_layers)]
    if model_type == "gemma3_text":
        pattern = d.get("sliding_window_pattern") or 6
        return [(i + 1) % pattern != 0 for i in range(num_layers)]
    if model_type in ("qwen2", "qwen3"):
        start = d.get("max_window_layers") or 0
        return [bool(d.get("use_sliding_window")) and i >= start for i in range(num_layers)]
    return [True] * num_layers  # mistral: every layer slides when sliding_window is set


def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default", scaling: Optional[dict] = None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] with `linear` or `llama3` scaling applied (HF semantics)."""
    scaling = scaling or {}
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    if rope_type == "linear":
        inv = inv / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)

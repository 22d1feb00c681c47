"""Tiny random HF models built offline from configs, one per supported family (shared by tests)."""
from __future__ import annotations

import torch
import transformers as T

COMMON = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILY_CONFIGS = {
    "llama": (T.LlamaConfig, dict(head_dim=16, rope_scaling={"rope_type": "llama3", "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
              rope_theta=500.0)),
    "llama_linear": (T.LlamaConfig, dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, num_key_value_heads=1,
                                        tie_word_embeddings=True)),
    "mistral": (T.MistralConfig, dict(head_dim=16, sliding_window=7)),
    "qwen2": (T.Qwen2Config, dict()),
    "qwen3": (T.Qwen3Config, dict(head_dim=20)),
    "gemma": (T.GemmaConfig, dict(head_dim=16, num_key_value_heads=1)),
    "gemma2": (T.Gemma2Config, dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=20,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0, num_hidden_layers=4)),
    "gemma3_text": (T.Gemma3TextConfig, dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
                                             num_hidden_layers=5, sliding_window_pattern=3,
                                             rope_scaling={"rope_type": "linear", "factor": 2.0})),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    cls, extra = FAMILY_CONFIGS[family]
    kw = {**COMMON, **extra, **overrides}
    if family == "gemma3_text":
        kw["layer_types"] = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention"
                             for i in range(kw["num_hidden_layers"])]
        kw.pop("sliding_window_pattern")
    config = cls(**kw)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # norms init to 1/0; randomise them so a wrong norm mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()

"""Every training option in one dataclass: YAML file + `--key value` overrides, documented for --help."""
from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Optional

import yaml

from unsloth_jax.errors import ConfigError

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
DEMO_CONFIG = os.path.join(REPO_CONFIGS, "demo.yaml")


def _field(default, doc):
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass
class TrainConfig:
    # model
    model: str = _field("demo:tiny-llama", "HF model dir or hub id; 'demo:tiny-llama' builds a tiny random "
                        "Llama (and a tokenizer trained on the demo data) under <output>/demo_model.")
    max_seq_length: int = _field(2048, "Tokens per packed row; longer examples are truncated (or dropped).")
    dtype: Optional[str] = _field(None, "float32 | bfloat16 | float16; default bf16 on GPU, fp32 on CPU.")
    load_in_4bit: bool = _field(False, "QLoRA: quantize decoder projections to NF4 while loading.")
    full_finetuning: bool = _field(False, "Train every weight instead of LoRA adapters.")
    # LoRA
    lora_r: int = _field(16, "LoRA rank r.")
    lora_alpha: float = _field(16, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).")
    lora_dropout: float = _field(0.0, "Dropout on the adapter input.")
    target_modules: Any = _field("all-linear", "Projections to adapt: a list of q_proj,k_proj,v_proj,o_proj,"
                                 "gate_proj,up_proj,down_proj or 'all-linear'.")
    use_rslora: bool = _field(False, "Rank-stabilised LoRA scaling alpha/sqrt(r).")
    modules_to_save: Any = _field(None, "Also train these in full: embed_tokens, lm_head (continued pretraining).")
    gradient_checkpointing: Any = _field("unsloth", "false | true (recompute each layer) | unsloth (also offload "
                                         "layer inputs to host memory) | selective (keep matmul outputs).")
    # data
    dataset: Optional[str] = _field(None, "Training data: .jsonl/.json/.parquet/.csv (alpaca, sharegpt, "
                                    "messages, prompt/completion or text).")
    eval_dataset: Optional[str] = _field(None, "Held-out data in the same formats.")
    dataset_format: Optional[str] = _field(None, "Force a format: alpaca|sharegpt|messages|prompt_completion|text.")
    dataset_text_field: Optional[str] = _field(None, "Column holding raw text for continued pretraining.")
    chat_template: Optional[str] = _field(None, "Built-in template name (chatml, llama-3, alpaca, gemma, mistral, "
                                          "qwen-2.5) when the tokenizer has none, or to override it.")
    train_on_responses_only: bool = _field(True, "Learn only assistant turns of chat data.")
    packing: bool = _field(True, "Pack several examples per row (segment ids keep them apart).")
    skip_malformed: bool = _field(False, "Skip malformed JSONL lines (counted) instead of stopping.")
    # optimisation
    per_device_train_batch_size: int = _field(2, "Rows per micro-batch.")
    gradient_accumulation_steps: int = _field(4, "Micro-batches per optimizer step.")
    learning_rate: float = _field(2e-4, "Peak learning rate.")
    embedding_learning_rate: Optional[float] = _field(None, "Learning rate for modules_to_save (default: same).")
    max_steps: int = _field(-1, "Optimizer steps; -1 means num_train_epochs over the data.")
    num_train_epochs: float = _field(1.0, "Epochs when max_steps is -1.")
    warmup_steps: int = _field(5, "Linear warm-up steps.")
    lr_scheduler_type: str = _field("linear", "linear | cosine | constant (after warm-up).")
    weight_decay: float = _field(0.01, "AdamW weight decay.")
    max_grad_norm: float = _field(1.0, "Global-norm gradient clipping (0 disables).")
    optim: str = _field("adamw", "adamw | adamw_8bit (falls back to adamw: optax has no 8-bit state).")
    seed: int = _field(3407, "Seed for adapters, shuffling and dropout.")
    # bookkeeping
    output_dir: str = _field("runs/demo", "Where metrics.jsonl, checkpoints/ and adapter/ go.")
    logging_steps: int = _field(1, "Log every N steps.")
    eval_steps: int = _field(0, "Evaluate every N steps (0: only at the end).")
    max_eval_batches: int = _field(20, "Cap on eval batches per evaluation.")
    save_steps: int = _field(0, "Checkpoint every N steps (0: only at the end and on Ctrl-C).")
    save_total_limit: int = _field(2, "Keep the last N checkpoints.")
    resume_from_checkpoint: Any = _field(False, "true: resume from the latest checkpoint in output_dir; or a path.")
    overwrite_output_dir: bool = _field(False, "A new (not resumed) run into an output_dir holding an earlier run's "
                                        "checkpoints: true removes them first, false stops before training.")
    save_merged: bool = _field(False, "Also write a merged 16-bit HF model to <output>/merged.")
    sample_prompt: Optional[str] = _field(None, "After training, generate a reply to this user message.")
    max_new_tokens: int = _field(48, "Tokens generated for sample_prompt.")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        aliases = {"output": "output_dir", "r": "lora_r"}
        d = {aliases.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in (d or {}).items()}
        unknown = [k for k in d if k not in cls.keys()]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, cls.keys(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see --help for the keys."
            raise ConfigError(f"{source}: unknown config key {k!r}{hint}")
        cfg = cls(**{k: coerce(k, v, source) for k, v in d.items()})
        cfg.validate(source)
        return cfg

    def validate(self, source="config"):
        checks = [
            (self.lora_r > 0, "lora_r", "must be > 0"),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (self.per_device_train_batch_size > 0, "per_device_train_batch_size", "must be > 0"),
            (self.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be > 0"),
            (self.max_seq_length >= 8, "max_seq_length", "must be >= 8"),
            (self.max_steps != 0, "max_steps", "must be > 0, or -1 for epochs"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise ConfigError(f"{source}: {key}={getattr(self, key)!r} {why}.")


def coerce(key: str, value, source: str):
    """Turn CLI strings into the field's type (YAML syntax: 'true', '1e-4', '[q_proj, v_proj]')."""
    default = TrainConfig.__dataclass_fields__[key].default
    if isinstance(value, str):
        parsed = yaml.safe_load(value) if value != "" else None
        value = parsed if not isinstance(parsed, (dict,)) else value
    if isinstance(value, str):
        value = _number_or_str(value)  # YAML 1.1 reads '2e-4' (no dot) as a string
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key}={value!r} must be true or false.")
    if isinstance(default, (int, float)) and not isinstance(default, bool) and not isinstance(value, (int, float)):
        raise ConfigError(f"{source}: {key}={value!r} must be a number.")
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    return value


def _number_or_str(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load_config(path: Optional[str], overrides: dict) -> TrainConfig:
    d = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found.")
        with open(path) as f:
            try:
                d = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML: {e}") from None
        TrainConfig.from_dict(d, source=path)  # name bad keys in the file before merging overrides
    d.update(overrides)
    return TrainConfig.from_dict(d, source=path or "command line")


def help_text() -> str:
    lines = []
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  --{f.name.replace('_', '-'):<32} {f.metadata['doc']} (default: {f.default!r})")
    return "\n".join(lines)

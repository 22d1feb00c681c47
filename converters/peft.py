"""PEFT LoRA adapters in and out, and merged Hugging Face exports.

On disk an adapter is what `peft` writes and `peft.PeftModel.from_pretrained` reads:
`adapter_config.json` and `adapter_model.safetensors` holding, per adapted projection and layer,
`base_model.model.<HF module path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] (no adapter
name in the key), plus full `base_model.model.<HF name>` tensors for modules_to_save. The Decoder
keeps lora_a [L, in, r] and lora_b [L, r, out]; the transposes happen here.

Ranks and scales may differ per projection (PEFT's rank_pattern / alpha_pattern). On import, ranks
that differ between the layers of one projection are zero-padded to the largest (a zero column of A
and zero row of B add nothing and get no gradient), and per-layer scales are folded into B, so the
result computes exactly what PEFT computes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from converters.hf import CheckpointReader, param_specs, hf_module_path, save_hf_model
from converters.safetensors_io import SafetensorsFile, write_safetensors
from unsloth_jax.errors import AdapterError, ConfigError
from unsloth_jax.models.decoder import PROJECTIONS
from unsloth_jax.quant import dequantize_nf4, is_nf4, nf4_layer

log = logging.getLogger("unsloth_jax")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT's key for one LoRA matrix (files written without the base_model.model. prefix load too).
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+))"
                       r"\.lora_([AB])\.weight$")
SAVE_METHODS = ("merged_16bit", "lora")
# With tied embeddings and a trained embed_tokens, PEFT (ensure_weight_tying) wraps the tied lm_head
# too and stores its own copy of the weight under this name.
TIED_HEAD = "lm_head.weight"
# LoraConfig options that change the computation in ways this loader does not reproduce.
_UNSUPPORTED_OPTIONS = {"use_dora": (False, None), "fan_in_fan_out": (False, None), "lora_bias": (False, None),
                        "layer_replication": (None,), "trainable_token_indices": (None,),
                        "target_parameters": (None,), "bias": ("none",)}


# ---- what the model holds ---------------------------------------------------------------------------

def adapted_linears(model) -> dict:
    """{projection name: StackedLinear} for the projections that carry LoRA, in PROJECTIONS order."""
    return {name: lin for name, lin in model.layers.linears().items() if lin.lora_a is not None}


def _savable_specs(model) -> dict:
    """{PEFT module name ('lm_head' / 'embed_tokens'): its ParamSpec} for the modules this model
    could train in full (no lm_head when it is tied to the embedding)."""
    from unsloth_jax.lora import SAVABLE_MODULES

    by_path = {spec.path: spec for spec in param_specs(model.config)}
    return {m: by_path[(attr,)] for m, attr in SAVABLE_MODULES.items() if (attr,) in by_path}


def _saved_module_specs(model) -> dict:
    """_savable_specs restricted to the model's modules_to_save."""
    saved = (getattr(model, "peft_config", None) or {}).get("modules_to_save") or ()
    return {m: _savable_specs(model)[m] for m in saved}


def _rank(lin) -> int:
    return int(lin.lora_a.value.shape[-1])


def _alpha_for(scale: float, rank: int, use_rslora: bool) -> float:
    """The lora_alpha that gives `scale` at `rank` (inverse of unsloth_jax.lora.lora_scale)."""
    return scale * (math.sqrt(rank) if use_rslora else rank)


# ---- export -----------------------------------------------------------------------------------------

def adapter_config(model, base_model_name_or_path: Optional[str] = None) -> dict:
    """The adapter_config.json PEFT's LoraConfig reads back, with rank/alpha patterns for any
    projection whose rank or scale differs from the global r / lora_alpha."""
    from unsloth_jax.lora import lora_scale

    pc = model.peft_config
    r, alpha, rslora = int(pc["r"]), pc["lora_alpha"], bool(pc["use_rslora"])
    rank_pattern, alpha_pattern = {}, {}
    for name, lin in adapted_linears(model).items():
        rank = _rank(lin)
        if rank != r:
            rank_pattern[name] = rank
        if not math.isclose(lin.lora_scale, lora_scale(rank, alpha, rslora), rel_tol=1e-6):
            alpha_pattern[name] = _alpha_for(lin.lora_scale, rank, rslora)
    saved = list(_saved_module_specs(model))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None),
        "r": r, "lora_alpha": alpha, "lora_dropout": float(pc.get("lora_dropout", 0.0)),
        "target_modules": list(adapted_linears(model)), "use_rslora": rslora,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "modules_to_save": saved or None, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_dora": False, "lora_bias": False,
        "layers_to_transform": None, "layers_pattern": None, "layer_replication": None,
        "revision": None, "auto_mapping": None, "megatron_config": None, "megatron_core": "megatron.core",
        "loftq_config": {},
    }
    if model.config.tie_word_embeddings and "embed_tokens" in saved:
        # PEFT ties a trained embed_tokens to lm_head only when asked; the Decoder always ties them.
        config["ensure_weight_tying"] = True
    return config


def adapter_tensors(model) -> list:
    """[(PEFT key, HF-layout shape, dtype, produce)] for every tensor of adapter_model.safetensors."""
    out = []
    for name, lin in adapted_linears(model).items():
        _, d_in, r = lin.lora_a.value.shape
        d_out = lin.lora_b.value.shape[-1]
        for i in range(model.config.num_layers):
            module = PREFIX + hf_module_path(name, i)
            out.append((f"{module}.lora_A.weight", (r, d_in), np.float32, lambda v=lin.lora_a, i=i: v.value[i].T))
            out.append((f"{module}.lora_B.weight", (d_out, r), np.float32, lambda v=lin.lora_b, i=i: v.value[i].T))
    for module, spec in _saved_module_specs(model).items():
        var = getattr(model, spec.path[0])
        names = [spec.hf_name] + ([TIED_HEAD] if module == "embed_tokens" and model.config.tie_word_embeddings else [])
        for name in names:
            out.append((PREFIX + name, _hf_shape(model, spec), np.dtype(model.dtype),
                        lambda v=var, t=spec.transpose: v.value.T if t else v.value))
    return out


@contextlib.contextmanager
def _atomic_dir(target: str):
    """Yield a fresh temp dir; on success move its files into `target`. A new target is renamed into
    place in one step; an existing one (it may hold a tokenizer the user saved) gets each file
    renamed over, weights before adapter_config.json so a config never points at stale weights."""
    tmp = target.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not os.path.isdir(target):
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        os.replace(tmp, target)
        return
    for fn in sorted(os.listdir(tmp), key=lambda f: f == ADAPTER_CONFIG):
        dst = os.path.join(target, fn)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(tmp, fn), dst)
    os.rmdir(tmp)


def save_adapter(model, save_directory, base_model_name_or_path: Optional[str] = None, *,
                 extra_files: Optional[Callable[[str], None]] = None) -> str:
    """Write the PEFT adapter (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(base, save_directory)` loads. A model without adapters (full
    fine-tuning, or no get_peft_model) is written as a full HF model instead. `extra_files(dir)`
    may add files (a tokenizer) before the directory is moved into place."""
    save_directory = str(save_directory)
    if not getattr(model, "peft_config", None):
        return save_hf_model(model, save_directory, extra_files=extra_files)
    tensors = adapter_tensors(model)
    producers = {name: produce for name, _, _, produce in tensors}
    with _atomic_dir(save_directory) as tmp:
        write_safetensors(os.path.join(tmp, ADAPTER_WEIGHTS), [t[:3] for t in tensors],
                          lambda name: np.asarray(producers[name]()), {"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(adapter_config(model, base_model_name_or_path), f, indent=2)
        if extra_files is not None:
            extra_files(tmp)
    return save_directory


# ---- import -----------------------------------------------------------------------------------------

def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json, checked for options this loader cannot reproduce exactly."""
    path = os.path.join(str(adapter_dir), ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise AdapterError(f"{path}: missing; an adapter directory holds adapter_config.json and "
                           f"{ADAPTER_WEIGHTS} (as written by save_pretrained).")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}.") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; only LoRA "
                           f"adapters (peft_type 'LORA') can be loaded.")
    for key, allowed in _UNSUPPORTED_OPTIONS.items():
        if config.get(key, allowed[0]) not in allowed:
            raise AdapterError(f"{path}: {key}={config[key]!r} is not supported (only {allowed[0]!r}); "
                               f"retrain or merge the adapter in PyTorch without it.")
    return config


def adapter_base_path(adapter_dir) -> str:
    """The base model an adapter directory was trained on (its base_model_name_or_path)."""
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{os.path.join(str(adapter_dir), ADAPTER_CONFIG)}: base_model_name_or_path is "
                           f"empty; load the base with from_pretrained(base) and call "
                           f"converters.peft.load_adapter(model, adapter_dir).")
    return base


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name it ends (a dotted
    suffix, regex allowed), e.g. 'q_proj' or 'layers.0.self_attn.q_proj'."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _group_adapter_keys(keys, weights_path: str, model) -> tuple[dict, dict]:
    """Sort file keys into ({projection: {layer: {'A': key, 'B': key}}}, {saved module: key});
    anything else is an AdapterError naming the tensor."""
    hf_names = {spec.hf_name: m for m, spec in _savable_specs(model).items()}
    if model.config.tie_word_embeddings:
        hf_names[TIED_HEAD] = TIED_HEAD
    saved_names = {prefix + name: m for name, m in hf_names.items() for prefix in (PREFIX, "")}
    lora, saved = {}, {}
    for key in keys:
        match = _LORA_KEY.match(key)
        if match and match.group(3) in PROJECTIONS and int(match.group(2)) < model.config.num_layers:
            lora.setdefault(match.group(3), {}).setdefault(int(match.group(2)), {})[match.group(4)] = key
        elif key in saved_names:
            saved[saved_names[key]] = key
        else:
            raise AdapterError(
                f"{weights_path}: tensor {key!r} does not belong to a LoRA adapter this model can load "
                f"(LoRA on {', '.join(PROJECTIONS)} of layers 0..{model.config.num_layers - 1}, and "
                f"modules_to_save embed_tokens / lm_head). Was the adapter trained on another base model "
                f"or with DoRA / LoRA on embeddings?")
    return lora, saved


def _read_checked(file: SafetensorsFile, key: str, expected: tuple, what: str) -> np.ndarray:
    shape = file.shape(key)
    if tuple(shape) != tuple(expected):
        raise AdapterError(f"{file.path}: tensor {key!r} has shape {list(shape)}, but this model needs "
                           f"{list(expected)} ({what}). The adapter was trained on a different base model "
                           f"or its adapter_config.json does not match its weights.")
    return np.asarray(file.get(key), np.float32)


def _load_projection(file, config, name, lin, layers: dict, num_layers: int):
    """(lora_a [L, in, r_max], lora_b [L, r_max, out], scale) for one projection; layers without
    tensors (layers_to_transform) get a zero adapter, per-layer scales are folded into B."""
    from unsloth_jax.lora import _kernel_shape, lora_scale

    _, d_in, d_out = _kernel_shape(lin.kernel.value)
    ranks, scales = {}, {}
    for i in layers:
        module = hf_module_path(name, i)
        ranks[i] = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
        alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
        scales[i] = lora_scale(ranks[i], alpha, bool(config.get("use_rslora")))
    r_max = max(ranks.values())
    scale = scales[min(scales)]
    a = np.zeros((num_layers, d_in, r_max), np.float32)
    b = np.zeros((num_layers, r_max, d_out), np.float32)
    for i, keys in sorted(layers.items()):
        for part, other in (("A", "B"), ("B", "A")):
            if part not in keys:
                raise AdapterError(f"{file.path}: {hf_module_path(name, i)} has lora_{other} but no "
                                   f"lora_{part}.weight; the adapter file is incomplete: re-save it.")
        r, module = ranks[i], hf_module_path(name, i)
        a[i, :, :r] = _read_checked(file, keys["A"], (r, d_in), f"r={r} x in_features={d_in} of {module}").T
        b[i, :r, :] = _read_checked(file, keys["B"], (d_out, r), f"out_features={d_out} x r={r} of {module}").T
        b[i] *= scales[i] / scale
    return a, b, scale


def _check_targets(config: dict, lora: dict, num_layers: int, config_path: str):
    """Every bare projection name listed in target_modules must have tensors for every layer (unless
    the adapter limits its layers); a target this model does not have is an error, not a skip."""
    targets = config.get("target_modules")
    if not isinstance(targets, (list, tuple)):
        return  # a regex: the tensors present are the targets
    # PEFT's rule for a list: a target names a module exactly or as its dotted suffix.
    modules = [hf_module_path(p, i) for p in PROJECTIONS for i in range(num_layers)]
    unknown = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if unknown:
        raise AdapterError(f"{config_path}: target_modules {unknown} name modules this model does not have or "
                           f"cannot adapt; supported: {', '.join(PROJECTIONS)}.")
    if config.get("layers_to_transform") is not None:
        return
    for name in (t for t in targets if t in PROJECTIONS):
        missing = [i for i in range(num_layers) if i not in lora.get(name, {})]
        if missing:
            raise AdapterError(f"{config_path}: targets {name!r} but {ADAPTER_WEIGHTS} has no "
                               f"{PREFIX}{hf_module_path(name, missing[0])}.lora_A.weight; the adapter file "
                               f"is incomplete or belongs to a model with fewer layers.")


def load_adapter(model, adapter_dir):
    """Attach the PEFT LoRA adapter in `adapter_dir` (saved here or by peft in PyTorch) to a base
    model without adapters, in place; returns the model. Shapes, ranks and targets are checked
    against the model before anything changes (AdapterError names the tensor and both shapes)."""
    adapter_dir = str(adapter_dir)
    if adapted_linears(model) or getattr(model, "peft_config", None):
        raise AdapterError(f"{adapter_dir}: the model already has LoRA adapters; load the adapter onto a fresh "
                           f"base (FastLanguageModel.from_pretrained('{adapter_dir}') does both).")
    config, projections, saved = read_adapter(model, adapter_dir)
    _attach(model, config, projections, saved, os.path.join(adapter_dir, ADAPTER_CONFIG))
    return model


def read_adapter(model, adapter_dir: str):
    """(config, {projection: (lora_a, lora_b, scale)}, {module_to_save: HF-layout weight}) read
    from `adapter_dir` and checked against `model`, which is not modified."""
    config = read_adapter_config(adapter_dir)
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights_path):
        legacy = " (found adapter_model.bin: re-save it with safe_serialization=True)" if os.path.isfile(
            os.path.join(adapter_dir, "adapter_model.bin")) else ""
        raise AdapterError(f"{weights_path}: missing{legacy}.")
    file = SafetensorsFile(weights_path)
    lora, saved_keys = _group_adapter_keys(file.keys(), weights_path, model)
    if not lora:
        raise AdapterError(f"{weights_path}: holds no lora_A/lora_B tensors for this model's layers.")
    _check_targets(config, lora, model.config.num_layers, config_path)
    # PEFT may list a module twice ('embed_tokens', 'model.embed_tokens'); the last name part is the module.
    modules_to_save = list(dict.fromkeys(m.rsplit(".", 1)[-1] for m in config.get("modules_to_save") or []))
    _check_tied_head(file, saved_keys, modules_to_save)
    savable = _savable_specs(model)
    for m in modules_to_save:
        if m not in savable or m not in saved_keys:
            raise AdapterError(f"{config_path}: modules_to_save lists {m!r} but {ADAPTER_WEIGHTS} has no "
                               f"{PREFIX}{savable[m].hf_name if m in savable else m} for this model.")
    projections = {name: _load_projection(file, config, name, getattr(model.layers, name), layers,
                                          model.config.num_layers) for name, layers in lora.items()}
    saved = {m: _read_checked(file, saved_keys[m], _hf_shape(model, savable[m]), f"{m} of the base model")
             for m in modules_to_save}
    return config, projections, saved


def _attach(model, config: dict, projections: dict, saved: dict, config_path: str):
    """Give the model LoRA structure with add_lora (targets, dropout, what trains), then the values."""
    from unsloth_jax.lora import add_lora

    try:
        add_lora(model, r=int(config["r"]), lora_alpha=config["lora_alpha"],
                 lora_dropout=float(config.get("lora_dropout") or 0.0), target_modules=list(projections),
                 use_rslora=bool(config.get("use_rslora")), modules_to_save=list(saved),
                 use_gradient_checkpointing=getattr(model, "remat_policy", "none"))
    except ConfigError as e:
        raise AdapterError(f"{config_path}: {e}") from None
    for name, (a, b, scale) in projections.items():
        lin = getattr(model.layers, name)
        lin.lora_a.value = jnp.asarray(a)
        lin.lora_b.value = jnp.asarray(b)
        lin.lora_scale = float(scale)
    for m, value in saved.items():
        spec = _savable_specs(model)[m]
        getattr(model, spec.path[0]).value = jnp.asarray(value.T if spec.transpose else value, model.dtype)


def _check_tied_head(file: SafetensorsFile, saved_keys: dict, modules_to_save: list):
    """A tied model may bring PEFT's copy of lm_head (TIED_HEAD) only as the trained embedding's twin."""
    key = saved_keys.pop(TIED_HEAD, None)
    if key is None:
        return
    embed = saved_keys.get("embed_tokens")
    if "embed_tokens" not in modules_to_save or embed is None or not np.array_equal(file.get(key), file.get(embed)):
        raise AdapterError(f"{file.path}: tensor {key!r} trains lm_head apart from embed_tokens, but this model "
                           f"ties lm_head to the embedding; load the adapter onto an untied base model.")


def _hf_shape(model, spec) -> tuple:
    shape = getattr(model, spec.path[0]).value.shape
    return tuple(shape[::-1]) if spec.transpose else tuple(shape)


# ---- merged export ----------------------------------------------------------------------------------

def merged_weight_fn(model, base_model_path: Optional[str] = None) -> Callable:
    """`weight_fn(spec, layer)` for save_hf_model: each adapted kernel becomes W + scale * A @ B (our
    [in, out] layout, fp32); other tensors are written as they are.

    W is the weight the adapter was trained against: for a QLoRA model the *dequantized NF4* weight
    (what the forward pass used). With `base_model_path`, W is read from that 16-bit checkpoint
    instead (the original weights, before quantization error)."""
    from unsloth_jax.lora import lora_delta

    reader = CheckpointReader(base_model_path) if base_model_path else None

    def weight_fn(spec, layer):
        if spec.path[0] != "layers" or spec.path[-1] != "kernel":
            return None
        lin = getattr(model.layers, spec.path[1])
        base = _dense_kernel(lin.kernel.value, spec, layer, reader)
        if lin.lora_a is None:
            return base
        base = lin.kernel.value[layer] if base is None else base
        return jnp.asarray(base, jnp.float32) + lora_delta(lin, layer)
    return weight_fn


def _dense_kernel(kernel, spec, layer: int, reader: Optional[CheckpointReader]):
    """One layer's [in, out] weight when it is not simply kernel[layer]: from the 16-bit base
    checkpoint (reader) or dequantized from NF4; None otherwise."""
    if reader is not None:
        from unsloth_jax.lora import _kernel_shape

        _, d_in, d_out = _kernel_shape(kernel)
        return np.asarray(reader.get(spec.hf_name.format(i=layer), (d_out, d_in)), np.float32).T
    if is_nf4(kernel):
        return dequantize_nf4(nf4_layer(kernel, layer)).T
    return None


def stop_token_ids(model, tokenizer=None) -> list[int]:
    """Every id generation should stop on: the chat template's end-of-turn token (what training
    taught the model to emit), the tokenizer's EOS, and the base config's EOS ids."""
    from unsloth_jax.generate import default_eos_ids

    ids = []
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        from unsloth_jax.data.templates import end_of_turn_token_ids
        from unsloth_jax.errors import DataError

        try:
            ids += end_of_turn_token_ids(tokenizer)
        except DataError as e:
            log.warning("generation_config.json: the chat template's end-of-turn token is not one token "
                        "(%s); stopping on the EOS token only.", e)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    ids += default_eos_ids(model)
    return list(dict.fromkeys(ids))


def write_generation_config(out_dir: str, model, tokenizer=None):
    """generation_config.json: the base model's (when its directory has one) with eos_token_id
    set to every stop id, so `transformers` generation stops where training taught it to."""
    config = {}
    base = getattr(model, "name_or_path", None)
    if base and os.path.isfile(os.path.join(str(base), "generation_config.json")):
        with open(os.path.join(str(base), "generation_config.json")) as f:
            config = json.load(f)
    eos = stop_token_ids(model, tokenizer)
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    for key in ("bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key, None) if tokenizer is not None else None
        value = value if value is not None else (model.config.hf_config or {}).get(key)
        if value is not None:
            config.setdefault(key, value)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def save_merged(model, save_directory, tokenizer=None, save_method: str = "merged_16bit", *,
                base_model_path: Optional[str] = None, dtype=None, max_shard_size="5GB") -> str:
    """Export for inference elsewhere, with the tokenizer (and its chat template) and a
    generation_config.json listing every stop id.

    save_method="merged_16bit": a full HF model with W + scale * B @ A folded in, in the model's
    dtype (bf16 on GPU) unless `dtype` says otherwise; for QLoRA, W is the dequantized NF4 weight
    the adapter was trained against, or the original 16-bit weight read from `base_model_path`.
    save_method="lora": the PEFT adapter only (as save_pretrained)."""
    if save_method not in SAVE_METHODS:
        raise ConfigError(f"save_method={save_method!r}: use one of {', '.join(SAVE_METHODS)}.")

    def extra_files(out_dir):
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        write_generation_config(out_dir, model, tokenizer)

    if save_method == "lora":
        return save_adapter(model, save_directory, extra_files=extra_files)
    return save_hf_model(model, str(save_directory), dtype=dtype, max_shard_size=max_shard_size,
                         weight_fn=merged_weight_fn(model, base_model_path), extra_files=extra_files)

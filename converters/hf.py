"""Hugging Face checkpoints <-> Decoder parameters.

HF stores projections as [out, in] per layer (`model.layers.{i}.self_attn.q_proj.weight`); the
Decoder keeps [in, out] stacked over layers. All transposes and name mapping live here. Loading
streams one tensor at a time (host peak: one tensor plus the result); writing does the same.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
import shutil
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.safetensors_io import SafetensorsFile, write_safetensors
from unsloth_jax.errors import CheckpointError
from unsloth_jax.models import Decoder, ModelConfig
from unsloth_jax.quant import (dequantize_nf4, from_bnb_tensors, is_bnb_4bit, is_nf4, nf4_layer, stack_nf4,
                               to_bnb_tensors)

INDEX_FILE = "model.safetensors.index.json"
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    path: tuple          # attribute path in the Decoder, e.g. ("layers", "q_proj", "kernel")
    hf_name: str         # HF tensor name; "{i}" is the layer index for stacked params
    transpose: bool      # HF [out, in] <-> ours [in, out]
    stacked: bool        # has a leading layer axis in the Decoder

    def hf_names(self, num_layers: int) -> list[str]:
        return [self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf_name]


def _norm_hf_names(cfg: ModelConfig) -> dict:
    names = {"attn_norm": "input_layernorm",
             "mlp_norm": "pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm"}
    if cfg.sandwich_norms:
        names.update(attn_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm")
    if cfg.qk_norm:
        names.update(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
    return names


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """Every parameter of the Decoder for `cfg` with its HF name: the single source of the mapping."""
    specs = [ParamSpec(("embed",), "model.embed_tokens.weight", False, False),
             ParamSpec(("final_norm",), "model.norm.weight", False, False)]
    if not cfg.tie_word_embeddings:
        specs.append(ParamSpec(("lm_head",), "lm_head.weight", True, False))
    biases = {"q_proj": cfg.qkv_bias, "k_proj": cfg.qkv_bias, "v_proj": cfg.qkv_bias, "o_proj": cfg.o_bias,
              "gate_proj": cfg.mlp_bias, "up_proj": cfg.mlp_bias, "down_proj": cfg.mlp_bias}
    for proj, has_bias in biases.items():
        module = f"model.layers.{{i}}.{'self_attn' if proj in ATTN_PROJ else 'mlp'}.{proj}"
        specs.append(ParamSpec(("layers", proj, "kernel"), module + ".weight", True, True))
        if has_bias:
            specs.append(ParamSpec(("layers", proj, "bias"), module + ".bias", False, True))
    for ours, theirs in _norm_hf_names(cfg).items():
        specs.append(ParamSpec(("layers", ours), f"model.layers.{{i}}.{theirs}.weight", False, True))
    return specs


def hf_module_path(proj: str, layer: int) -> str:
    """HF module path of a projection, e.g. model.layers.3.self_attn.q_proj (used by PEFT export)."""
    return f"model.layers.{layer}.{'self_attn' if proj in ATTN_PROJ else 'mlp'}.{proj}"


# ---- locating files ---------------------------------------------------------------------------

def resolve_model_dir(name_or_path: str) -> str:
    """A local directory as is; otherwise a hub id fetched with huggingface_hub.snapshot_download."""
    path = os.path.expanduser(str(name_or_path))
    if os.path.isdir(path):
        return path
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)) is not None
    if not looks_like_hub_id or os.path.exists(os.path.dirname(path) or "/nonexistent"):
        raise CheckpointError(f"{name_or_path}: no such model directory. Pass a local directory holding "
                              f"config.json and *.safetensors, or a hub id like 'org/name'.")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(str(name_or_path), allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # network or auth failure: say what to do
        raise CheckpointError(f"{name_or_path}: not a local directory, and downloading it from the hub failed "
                              f"({type(e).__name__}: {e}). Download it first and pass the directory.") from None


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; a model directory needs config.json next to its *.safetensors.")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}.") from None
    if "text_config" in d and d.get("model_type") not in ("gemma3_text",):
        d = {**d["text_config"], **{k: v for k, v in d.items() if k == "tie_word_embeddings"}}
    return d


class CheckpointReader:
    """Finds which file holds each tensor (index, single file, or all *.safetensors) and reads lazily."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        index = os.path.join(model_dir, INDEX_FILE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e}).") from None
            self.location = {name: os.path.join(model_dir, fn) for name, fn in weight_map.items()}
            for fn in sorted(set(self.location.values())):
                if not os.path.isfile(fn):
                    raise CheckpointError(f"{fn}: shard listed in {index} is missing; re-download the checkpoint.")
        else:
            files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
            files = [f for f in files if not os.path.basename(f).startswith("adapter_model")]
            if not files:
                extra = " (found PyTorch .bin weights: re-save them with safe_serialization=True)" if glob.glob(
                    os.path.join(model_dir, "*.bin")) else ""
                raise CheckpointError(f"{model_dir}: no *.safetensors weights found{extra}.")
            self.location = {}
            for fn in files:
                for name in SafetensorsFile(fn).keys():
                    self.location[name] = fn
        self._files: dict[str, SafetensorsFile] = {}

    def file(self, name: str) -> SafetensorsFile:
        fn = self.location[name]
        if fn not in self._files:
            self._files[fn] = SafetensorsFile(fn)
        return self._files[fn]

    def __contains__(self, name):
        return name in self.location

    def __getitem__(self, name) -> np.ndarray:
        return self.file(name).get(name)

    def get(self, name: str, expected_shape: tuple) -> np.ndarray:
        if name not in self.location:
            raise CheckpointError(f"{self.model_dir}: checkpoint is missing weight {name!r} "
                                  f"(expected shape {list(expected_shape)}); is config.json from the same model?")
        f = self.file(name)
        if name not in f:
            raise CheckpointError(f"{f.path}: the index says it holds {name!r} but it does not; re-download.")
        arr = f.get(name)
        if tuple(arr.shape) != tuple(expected_shape):
            raise CheckpointError(f"{f.path}: tensor {name!r} has shape {list(arr.shape)}, expected "
                                  f"{list(expected_shape)} from config.json.")
        return arr


# ---- loading ----------------------------------------------------------------------------------

def _get_var(model, path):
    obj = model
    for p in path:
        obj = getattr(obj, p)
    return obj


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(buf, i, value):
    """buf[i] = value in place (the stacked buffer is donated), so loading never holds two copies."""
    return jax.lax.dynamic_update_index_in_dim(buf, value, i, 0)


def load_decoder(model_dir: str, dtype=jnp.float32, *, quantize: Optional[Callable] = None,
                 quantize_filter: Callable[[ParamSpec], bool] = lambda s: False) -> Decoder:
    """Build the Decoder from config.json + safetensors, streaming tensor by tensor.

    `quantize(w_hf_out_in_fp32) -> NF4Tensor` is applied per layer to specs where `quantize_filter`
    is true (load_in_4bit), so the 16-bit weight never sits on the device whole.
    """
    cfg = ModelConfig.from_hf(read_hf_config(model_dir), source=os.path.join(model_dir, "config.json"))
    reader = CheckpointReader(model_dir)
    model = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype))
    for spec in param_specs(cfg):
        var = _get_var(model, spec.path)
        target = var.value  # ShapeDtypeStruct of the stacked (or single) parameter
        per_shape = target.shape[1:] if spec.stacked else target.shape
        hf_shape = tuple(reversed(per_shape)) if spec.transpose else tuple(per_shape)
        if spec.stacked and is_bnb_4bit(_module_of(spec.hf_name.format(i=0)), reader):
            var.value = stack_nf4(_read_bnb(reader, spec, cfg, hf_shape))  # pre-quantized: used as is
            continue
        if spec.stacked and quantize is not None and quantize_filter(spec):
            parts = [quantize(np.asarray(reader.get(n, hf_shape), np.float32)) for n in spec.hf_names(cfg.num_layers)]
            var.value = stack_nf4(parts)
            continue
        if spec.stacked:
            buf = jnp.zeros(target.shape, target.dtype)
            for i, name in enumerate(spec.hf_names(cfg.num_layers)):
                buf = _set_layer(buf, i, _to_ours(reader.get(name, hf_shape), spec, target.dtype))
            var.value = buf
        else:
            var.value = jnp.asarray(_to_ours(reader.get(spec.hf_name, hf_shape), spec, target.dtype))
    return model


def _module_of(weight_name: str) -> str:
    return weight_name[: -len(".weight")]


def _read_bnb(reader: CheckpointReader, spec: ParamSpec, cfg: ModelConfig, hf_shape: tuple) -> list:
    parts = []
    for name in spec.hf_names(cfg.num_layers):
        q = from_bnb_tensors(_module_of(name), reader)
        if tuple(q.shape) != tuple(hf_shape):
            raise CheckpointError(f"{reader.location[name]}: 4-bit tensor {name!r} has shape {list(q.shape)}, "
                                  f"expected {list(hf_shape)} from config.json.")
        parts.append(q)
    return parts


def _to_ours(arr: np.ndarray, spec: ParamSpec, dtype) -> np.ndarray:
    arr = arr.T if spec.transpose else arr
    return np.asarray(arr, dtype=np.float32).astype(dtype) if arr.dtype != dtype else np.asarray(arr)


# ---- writing ----------------------------------------------------------------------------------

def parse_size(size) -> int:
    if isinstance(size, (int, float)):
        return int(size)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use bytes or a string like '5GB'")
    unit = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20,
            "GIB": 2**30, "TIB": 2**40}[m.group(2) or ""]
    return int(float(m.group(1)) * unit)


def export_tensors(model: Decoder, weight_fn: Optional[Callable] = None):
    """[(hf_name, hf_shape, dtype, getter)] for every HF tensor of the model; dtype None means the
    export dtype. `weight_fn(spec, layer)` may override what is written (merged LoRA, dequantized
    NF4); it returns our layout for that slice. Without a weight_fn, NF4 weights are written in the
    bitsandbytes 4-bit layout (packed uint8 + absmax + quant_state), as HF `*-bnb-4bit` repos hold them."""
    cfg = model.config
    out = []
    for spec in param_specs(cfg):
        var = _get_var(model, spec.path)
        quantized = is_nf4(var.value)
        for i, name in enumerate(spec.hf_names(cfg.num_layers)):
            layer = i if spec.stacked else None
            if quantized and weight_fn is None:
                out += _bnb_entries(name, var, layer)
                continue

            def get(spec=spec, layer=layer, var=var, quantized=quantized):
                value = weight_fn(spec, layer) if weight_fn is not None else None
                if value is None and quantized:  # written 16-bit: dequantize, in our [in, out] layout
                    value = dequantize_nf4(nf4_layer(var.value, layer)).T
                elif value is None:
                    value = var.value[layer] if layer is not None else var.value
                value = np.asarray(value)
                return value.T if spec.transpose else value
            if quantized:  # the HF shape comes from the NF4 metadata
                hf_shape = tuple(var.value.shape)
            else:
                shape = var.value.shape[1:] if spec.stacked else var.value.shape
                hf_shape = tuple(reversed(shape)) if spec.transpose else tuple(shape)
            out.append((name, hf_shape, None, get))
    return out


def _bnb_entries(weight_name: str, var, layer: int) -> list:
    prefix = _module_of(weight_name)
    layer_q = lambda: nf4_layer(var.value, layer)
    tensors = to_bnb_tensors(prefix, layer_q())  # once for the shapes; again when written
    return [(name, arr.shape, arr.dtype, lambda name=name: to_bnb_tensors(prefix, layer_q())[name])
            for name, arr in tensors.items()]


def bnb_quantization_config(compute_dtype: str) -> dict:
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": ["lm_head"]}


def save_hf_model(model: Decoder, out_dir: str, *, dtype=None, max_shard_size="5GB",
                  weight_fn: Optional[Callable] = None, extra_files: Optional[Callable[[str], None]] = None) -> str:
    """Write config.json + safetensors (sharded with an index past max_shard_size) that transformers
    loads. Written into a temp dir and renamed into place, so a failed export leaves nothing half-done."""
    cfg = model.config
    np_dtype = np.dtype(dtype if dtype is not None else model.dtype)
    tensors = export_tensors(model, weight_fn)
    limit = parse_size(max_shard_size)
    shards, current, size = [], [], 0
    for t in tensors:
        nbytes = int(np.prod(t[1])) * np.dtype(t[2] or np_dtype).itemsize
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    shards.append(current)

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    hf = dict(cfg.hf_config or {})
    dtype_name = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[np_dtype.name]
    hf["torch_dtype"] = dtype_name
    hf["dtype"] = dtype_name
    hf.pop("quantization_config", None)
    if any(t[2] is not None for t in tensors):
        hf["quantization_config"] = bnb_quantization_config(dtype_name)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    weight_map = {}
    for k, shard in enumerate(shards):
        fn = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        getters = {name: get for name, _, _, get in shard}
        dtypes = {name: np.dtype(dt or np_dtype) for name, _, dt, _ in shard}
        write_safetensors(os.path.join(tmp, fn), [(name, shape, dtypes[name]) for name, shape, _, _ in shard],
                          lambda name: np.asarray(getters[name]()).astype(dtypes[name]), {"format": "pt"})
        weight_map.update({name: fn for name, _, _, _ in shard})
    if len(shards) > 1:
        total = sum(int(np.prod(s)) * np.dtype(dt or np_dtype).itemsize for _, s, dt, _ in tensors)
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if extra_files is not None:
        extra_files(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


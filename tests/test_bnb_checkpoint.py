"""bitsandbytes 4-bit checkpoints (as HF `*-bnb-4bit` repos hold them) load without re-quantizing,
give the logits of the PyTorch model on the same dequantized weights, and save back byte for byte."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.hf import save_hf_model
from converters.safetensors_io import SafetensorsFile, write_safetensors
from hf_models import make_hf_model, torch_logits
from unsloth_jax import FastLanguageModel

import bitsandbytes.functional as bnb_f  # noqa: E402  (in the test extras)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_bnb_checkpoint(hf, out):
    """Quantize every decoder projection with bitsandbytes itself; return the dequantized model."""
    hf.save_pretrained(out)
    tensors = {}
    with torch.no_grad():
        for name, p in hf.state_dict().items():
            if name.endswith(".weight") and any(f".{x}." in name for x in PROJ):
                packed, qs = bnb_f.quantize_4bit(p.float().contiguous(), blocksize=64, quant_type="nf4",
                                                 compress_statistics=True)
                tensors[name] = packed.numpy()
                for k, v in qs.as_dict(packed=True).items():
                    tensors[f"{name}.{k}"] = v.numpy()
                p.copy_(bnb_f.dequantize_4bit(packed, qs).reshape(p.shape))  # the base PyTorch sees
            else:
                tensors[name] = p.numpy()
    write_safetensors(str(out / "model.safetensors"), [(k, v.shape, v.dtype) for k, v in tensors.items()],
                      tensors.__getitem__)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                  "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    (out / "config.json").write_text(json.dumps(cfg))
    return tensors


def test_bnb_checkpoint_loads_and_round_trips(tmp_path):
    hf = make_hf_model("qwen2", intermediate_size=128, hidden_size=64)
    tensors = write_bnb_checkpoint(hf, tmp_path / "bnb")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "bnb"), dtype="float32")
    assert hasattr(model.layers.q_proj.kernel.value, "packed")  # kept 4-bit, not expanded
    ids = np.random.default_rng(0).integers(0, 101, (2, 13))
    ref = torch_logits(hf, ids)
    ours = np.asarray(model(jnp.asarray(ids)))
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5

    save_hf_model(model, str(tmp_path / "again"))
    saved = SafetensorsFile(str(tmp_path / "again" / "model.safetensors"))
    for name, arr in tensors.items():
        if ".weight." in name or (name.endswith(".weight") and arr.dtype == np.uint8):
            np.testing.assert_array_equal(np.asarray(saved.get(name)), arr, err_msg=name)
    reloaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "again"), dtype="float32")
    np.testing.assert_array_equal(np.asarray(reloaded(jnp.asarray(ids))), ours)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["load_in_4bit"]


def test_load_in_4bit_reports_model_bytes(tmp_path, caplog):
    make_hf_model("llama").save_pretrained(tmp_path / "m")
    with caplog.at_level("INFO", logger="unsloth_jax"):
        model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype="float32", load_in_4bit=True)
    assert hasattr(model.layers.down_proj.kernel.value, "packed")
    assert any("device bytes" in r.message and "NF4" in r.message for r in caplog.records)

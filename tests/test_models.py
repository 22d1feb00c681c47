"""Logit parity with transformers for every family, packing, export round trip, bad input."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import FAMILY_CONFIGS, make_hf_model, torch_logits
from unsloth_jax import FastLanguageModel
from unsloth_jax.errors import CheckpointError, UnsupportedModelError


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_logits_match_transformers(family, tmp_path):
    hf = make_hf_model(family)
    hf.save_pretrained(tmp_path / "m", max_shard_size="20KB")  # several shards + index
    assert os.path.exists(tmp_path / "m" / "model.safetensors.index.json")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype="float32")
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, (2, 19))  # 19 > every sliding window
    err = rel_err(model(jnp.asarray(ids)), torch_logits(hf, ids))
    print(f"PARITY {family} {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_packed_rows_equal_separate_runs(family, tmp_path):
    hf = make_hf_model(family)
    hf.save_pretrained(tmp_path / "m")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype="float32")
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 101, 9), rng.integers(0, 101, 8)
    packed = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 9 + [2] * 8 + [0, 0]])
    out = np.asarray(model(jnp.asarray(packed), segment_ids=jnp.asarray(seg)))
    np.testing.assert_allclose(out[0, :9], np.asarray(model(jnp.asarray(a[None])))[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0, 9:17], np.asarray(model(jnp.asarray(b[None])))[0], rtol=1e-5, atol=1e-5)


def test_loss_matches_transformers(tmp_path):
    import torch

    hf = make_hf_model("qwen2")
    hf.save_pretrained(tmp_path / "m")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype="float32")
    ids = np.random.default_rng(3).integers(0, 101, (2, 12))
    hf_labels = ids.copy()
    hf_labels[0, :4] = -100
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids), labels=torch.as_tensor(hf_labels)).loss.item()
    ours_labels = np.concatenate([hf_labels[:, 1:], np.full((2, 1), -100)], axis=1)  # already shifted
    loss = float(model.loss(jnp.asarray(ids), jnp.asarray(ours_labels)))
    assert abs(loss - ref) < 1e-5 * abs(ref)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_export_round_trip(family, tmp_path):
    import transformers

    from converters.hf import save_hf_model

    hf = make_hf_model(family)
    hf.save_pretrained(tmp_path / "m")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype="float32")
    save_hf_model(model, str(tmp_path / "out"), max_shard_size="30KB")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").float()
    ids = np.random.default_rng(4).integers(0, 101, (1, 11))
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(hf, ids), rtol=0, atol=1e-6)


# ---- bad input ---------------------------------------------------------------------------------

@pytest.fixture
def saved_llama(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_missing_dir_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory"):
        FastLanguageModel.from_pretrained(str(tmp_path / "nope"))


def test_unsupported_model_type_lists_supported(saved_llama):
    cfg = json.loads((saved_llama / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (saved_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"falcon.*llama, mistral, qwen2"):
        FastLanguageModel.from_pretrained(str(saved_llama))


def test_unsupported_rope_type_is_named(saved_llama):
    cfg = json.loads((saved_llama / "config.json").read_text())
    key = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
    cfg[key] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (saved_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        FastLanguageModel.from_pretrained(str(saved_llama))


def test_corrupt_shard_is_named(saved_llama):
    path = saved_llama / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        FastLanguageModel.from_pretrained(str(saved_llama))


def test_missing_weight_is_named(saved_llama):
    from converters.safetensors_io import SafetensorsFile, write_safetensors

    path = str(saved_llama / "model.safetensors")
    f = SafetensorsFile(path)
    keep = [k for k in f.keys() if k != "model.layers.1.mlp.up_proj.weight"]
    tensors = {k: np.array(f.get(k)) for k in keep}
    del f
    write_safetensors(path, [(k, tensors[k].shape, tensors[k].dtype) for k in keep], tensors.__getitem__)
    with pytest.raises(CheckpointError, match=r"missing weight 'model.layers.1.mlp.up_proj.weight'"):
        FastLanguageModel.from_pretrained(str(saved_llama))


def test_wrong_shape_is_named(saved_llama):
    cfg = json.loads((saved_llama / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (saved_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gate_proj.weight.*shape \[80, 48\], expected \[96, 48\]"):
        FastLanguageModel.from_pretrained(str(saved_llama))


def test_missing_shard_is_named(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path / "m", max_shard_size="20KB")
    os.remove(tmp_path / "m" / "model-00002-of-00006.safetensors") if os.path.exists(
        tmp_path / "m" / "model-00002-of-00006.safetensors") else os.remove(
        sorted((tmp_path / "m").glob("model-0000*.safetensors"))[1])
    with pytest.raises(CheckpointError, match=r"shard.*missing"):
        FastLanguageModel.from_pretrained(str(tmp_path / "m"))


def test_hub_id_that_cannot_be_fetched_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network in tests: the download must fail fast
    with pytest.raises(CheckpointError, match=r"(?s)not a local directory.*hub failed.*pass the directory"):
        FastLanguageModel.from_pretrained("some-org/some-model-that-is-not-cached")

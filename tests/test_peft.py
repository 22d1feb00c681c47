"""PEFT round trips: adapters trained here load in PyTorch `peft` with the same logits, adapters made
with `peft` load here, merged exports load in `transformers`; bad adapters are named."""
import json
import logging
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from converters.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter
from converters.safetensors_io import SafetensorsFile, write_safetensors
from hf_models import make_hf_model, torch_logits
from unsloth_jax import FastLanguageModel
from unsloth_jax.errors import AdapterError
from unsloth_jax.lora import trainable_filter

IDS = np.random.default_rng(7).integers(0, 101, (2, 13))
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def load_base(family, tmp_path):
    make_hf_model(family).save_pretrained(tmp_path / "base")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "base"), dtype="float32")
    return model


def train_a_few_steps(model, steps=3):
    """Real optimisation of the adapters: Adam on the next-token loss of random data."""
    graphdef, params, rest = nnx.split(model, trainable_filter(model), ...)
    tx = optax.adam(3e-2)
    opt_state = tx.init(params)
    labels = np.concatenate([IDS[:, 1:], np.full((2, 1), -100)], axis=1)

    @jax.jit
    def step(params, opt_state):
        loss_fn = lambda p: nnx.merge(graphdef, p, rest).loss(jnp.asarray(IDS), jnp.asarray(labels))
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    nnx.update(model, params)


def randomize_adapters(model, seed=0):
    """Non-zero B (and perturbed modules_to_save) so every adapter tensor changes the logits."""
    rng = np.random.default_rng(seed)
    for lin in model.layers.linears().values():
        if lin.lora_b is not None:
            lin.lora_b.value = jnp.asarray(0.05 * rng.standard_normal(lin.lora_b.value.shape), jnp.float32)
    for name in model.peft_config["modules_to_save"] or ():
        var = model.embed if name == "embed_tokens" else model.lm_head
        var.value = var.value + 0.05 * rng.standard_normal(var.value.shape).astype(np.float32)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_in_peft(base_dir, adapter_dir):
    """peft.PeftModel.from_pretrained on a fresh transformers base, failing on any missing- or
    unexpected-key report (warnings or log lines) and on any difference between the file's keys
    and the keys PEFT itself would save for the loaded model."""
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").float()
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    reports = [str(w.message) for w in caught] + handler.messages
    bad = [m for m in reports if re.search(r"missing|unexpected|mismatch|not initiali[sz]ed", m, re.I)]
    assert not bad, bad
    saved_keys = set(SafetensorsFile(str(adapter_dir / ADAPTER_WEIGHTS)).keys())
    assert saved_keys == set(peft.get_peft_model_state_dict(model).keys())
    return model


CASES = {  # family, get_peft_model kwargs, how the adapters become non-trivial
    "llama-trained": ("llama", dict(r=8, lora_alpha=16), train_a_few_steps),
    "qwen2-rslora-lm_head": ("qwen2", dict(r=8, lora_alpha=16, use_rslora=True, modules_to_save=["lm_head"]),
                             randomize_adapters),
    "gemma2-tied-embed": ("gemma2", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                         modules_to_save=["embed_tokens"]), randomize_adapters),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_and_merged_export_match_pytorch(case, tmp_path):
    import transformers

    from unsloth_jax.data import train_bpe_tokenizer

    family, lora_kwargs, make_nontrivial = CASES[case]
    model = load_base(family, tmp_path)
    base_logits = np.asarray(model(IDS))
    model = FastLanguageModel.get_peft_model(model, use_gradient_checkpointing=False, **lora_kwargs)
    make_nontrivial(model)
    ours = np.asarray(model(IDS))
    assert rel_err(ours, base_logits) > 1e-3  # the adapters do something

    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    err = rel_err(torch_logits(load_in_peft(tmp_path / "base", tmp_path / "adapter"), IDS), ours)
    print(f"PEFT {case} {err:.2e}")
    assert err <= 1e-4

    tokenizer = train_bpe_tokenizer(["hello there", "a chat"] * 4, vocab_size=300, chat_template="chatml")
    model.save_pretrained_merged(tmp_path / "merged", tokenizer, save_method="merged_16bit", dtype="float32")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    assert rel_err(torch_logits(merged, IDS), ours) <= 1e-4
    generation = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    stop_ids = {tokenizer.convert_tokens_to_ids("<|im_end|>"), model.config.hf_config["eos_token_id"]} - {None}
    assert set(np.atleast_1d(generation["eos_token_id"]).tolist()) == stop_ids
    assert (tmp_path / "merged" / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (tmp_path / "merged" / "tokenizer_config.json").read_text())


def test_adapter_made_in_pytorch_loads_here(tmp_path):
    """Rank/alpha patterns (per projection and per layer), non-zero B and a trained lm_head."""
    import peft
    import transformers

    make_hf_model("llama").save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").float()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=ALL, init_lora_weights=False, task_type="CAUSAL_LM",
                             rank_pattern={"v_proj": 4, "model.layers.1.self_attn.q_proj": 2},
                             alpha_pattern={"o_proj": 4}, modules_to_save=["lm_head"])
    torch.manual_seed(0)
    pm = peft.get_peft_model(base, config).eval()
    with torch.no_grad():  # init_lora_weights=False gives a random B; move lm_head too
        pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)
    pm.save_pretrained(tmp_path / "adapter")
    reference = torch_logits(pm, IDS)

    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), dtype="float32")
    assert rel_err(model(IDS), reference) <= 1e-4
    assert model.layers.q_proj.lora_a.value.shape[-1] == 8 and model.layers.v_proj.lora_a.value.shape[-1] == 4

    model.save_pretrained(tmp_path / "again")  # and back: PEFT reads the patterns we write
    assert rel_err(torch_logits(load_in_peft(tmp_path / "base", tmp_path / "again"), IDS), reference) <= 1e-4


# ---- bad input ----------------------------------------------------------------------------------

def rewrite_weights(adapter_dir, change):
    """Apply change(dict of arrays) to adapter_model.safetensors in place."""
    path = str(adapter_dir / ADAPTER_WEIGHTS)
    f = SafetensorsFile(path)
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    change(tensors)
    write_safetensors(path, [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.__getitem__)


def edit_config(adapter_dir, **changes):
    path = adapter_dir / ADAPTER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_bad_adapters_are_named(tmp_path):
    import shutil

    base = load_base("llama", tmp_path)
    trained = FastLanguageModel.get_peft_model(load_base("llama", tmp_path), r=4, lora_alpha=8,
                                               target_modules=["q_proj", "up_proj"])
    trained.save_pretrained(tmp_path / "good")

    def broken(name, weights=None, **config):
        shutil.copytree(tmp_path / "good", tmp_path / name)
        if weights is not None:
            rewrite_weights(tmp_path / name, weights)
        edit_config(tmp_path / name, **config)
        return tmp_path / name

    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    wrong_shape = broken("shape", lambda t: t.__setitem__(key, np.zeros((64, 4), np.float32)))
    with pytest.raises(AdapterError, match=re.escape(f"{key}' has shape [64, 4], but this model needs [80, 4]")):
        load_adapter(base, wrong_shape)
    with pytest.raises(AdapterError, match=r"q_proj.lora_A.weight' has shape \[4, 48\].*needs \[6, 48\]"):
        load_adapter(base, broken("rank", r=6))
    with pytest.raises(AdapterError, match=r"target_modules \['c_attn'\]"):
        load_adapter(base, broken("targets", target_modules=["q_proj", "c_attn"]))
    dora = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    with pytest.raises(AdapterError, match=re.escape(dora)):
        load_adapter(base, broken("dora", lambda t: t.__setitem__(dora, np.ones(64, np.float32))))
    with pytest.raises(AdapterError, match="use_dora=True is not supported"):
        load_adapter(base, broken("dora_config", use_dora=True))
    missing = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    with pytest.raises(AdapterError, match=re.escape(f"has no {missing}")):
        load_adapter(base, broken("missing", lambda t: (t.pop(missing), t.pop(missing.replace("_A", "_B")))))
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        load_adapter(base, tmp_path / "base")
    with pytest.raises(AdapterError, match="already has LoRA adapters"):
        load_adapter(trained, tmp_path / "good")
    np.testing.assert_array_equal(load_adapter(base, tmp_path / "good")(IDS), trained(IDS))  # base untouched until now


def test_model_without_adapters_saves_full_model(tmp_path):
    import transformers

    model = load_base("qwen2", tmp_path)
    model.save_pretrained(tmp_path / "full")
    assert not (tmp_path / "full" / ADAPTER_CONFIG).exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full", attn_implementation="eager")
    assert rel_err(torch_logits(reloaded, IDS), np.asarray(model(IDS))) <= 1e-5


def test_qlora_merges_into_the_dequantized_nf4_weights(tmp_path):
    """A QLoRA adapter is trained against dequantize(NF4(W)): PyTorch gets that base, the merged
    export folds the adapter into it, and base_model_path merges into the original W instead."""
    import transformers

    from converters.hf import save_hf_model
    from converters.peft import merged_weight_fn
    from unsloth_jax.lora import lora_delta

    make_hf_model("llama").save_pretrained(tmp_path / "base")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "base"), dtype="float32", load_in_4bit=True)
    save_hf_model(model, str(tmp_path / "dequantized"), weight_fn=merged_weight_fn(model))
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    reference = torch_logits(load_in_peft(tmp_path / "dequantized", tmp_path / "adapter"), IDS)
    assert rel_err(model(IDS), reference) <= 1e-4

    model.save_pretrained_merged(tmp_path / "merged", dtype="float32")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    assert rel_err(torch_logits(merged, IDS), reference) <= 1e-4

    model.save_pretrained_merged(tmp_path / "from_16bit", dtype="float32", base_model_path=str(tmp_path / "base"))
    name = "model.layers.1.mlp.down_proj.weight"
    original = SafetensorsFile(str(tmp_path / "base" / "model.safetensors")).get(name)
    written = SafetensorsFile(str(tmp_path / "from_16bit" / "model.safetensors")).get(name)
    np.testing.assert_allclose(written, original + np.asarray(lora_delta(model.layers.down_proj, 1)).T, atol=1e-6)

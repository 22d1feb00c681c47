"""The train step: LoRA learns, base weights stay bit-identical, accumulation == big batch, remat
policies give the same gradients, bad LoRA settings are refused."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_models import make_hf_model
from unsloth_jax import FastLanguageModel
from unsloth_jax.errors import ConfigError
from unsloth_jax.train.optim import make_optimizer
from unsloth_jax.train.step import init_state, loss_sum_and_count, make_train_step, split_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    make_hf_model("llama").save_pretrained(d)
    return str(d)


def lora_model(model_dir, load_in_4bit=False, **kw):
    model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=load_in_4bit)
    return FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, **kw)


def random_batch(rng, k, b, T, vocab=101):
    ids = rng.integers(0, vocab, (k, b, T)).astype(np.int32)
    labels = np.concatenate([ids[..., 1:], np.full((k, b, 1), -100)], axis=-1).astype(np.int32)
    labels[..., : T // 3] = -100  # a prompt part without loss, different learned counts per row
    labels[:, 0, T // 2:] = -100
    seg = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), ids.shape).copy()
    return {"input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos}


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["lora", "qlora"])
def test_lora_loss_falls_and_base_is_untouched(model_dir, load_in_4bit):
    model = lora_model(model_dir, load_in_4bit)
    base_before = jax.tree.map(np.array, nnx.state(model, nnx.Not(nnx.Any(*[type(model.layers.q_proj.lora_a)]))))
    split, params = split_model(model)
    tx = make_optimizer(split.names, learning_rate=1e-2, total_steps=30, lr_scheduler_type="constant")
    state = init_state(params, tx, 0)
    step = make_train_step(split, tx)
    batch = random_batch(np.random.default_rng(0), 1, 4, 16)
    counting = (np.arange(16)[None, None] + np.arange(4)[None, :, None] * 7) % 101  # learnable: next = +1
    batch["input_ids"] = counting.astype(np.int32)
    batch["labels"] = np.where(batch["labels"] == -100, -100, (counting + 1) % 101).astype(np.int32)
    losses = []
    for _ in range(30):
        state, m = step(state, split.frozen, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.85 * losses[0] and losses[-1] < min(losses[:10]), losses
    after = jax.tree.map(np.array, split.frozen)
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


def test_gradient_accumulation_equals_one_big_batch(model_dir):
    batch = random_batch(np.random.default_rng(1), 4, 2, 12)
    big = {k: v.reshape(1, 8, 12) for k, v in batch.items()}
    results = []
    for b in (batch, big):
        split, params = split_model(lora_model(model_dir))
        params = {n: p + 0.01 * jax.random.normal(jax.random.PRNGKey(i), p.shape) for i, (n, p) in
                  enumerate(sorted(params.items()))}  # non-zero B so every adapter gets gradient
        tx = make_optimizer(split.names, learning_rate=1e-3, total_steps=1, warmup_steps=0, max_grad_norm=0)
        state, _ = make_train_step(split, tx)(init_state(params, tx, 0), split.frozen, b)
        results.append(jax.tree.map(np.array, state.params))
    for name in results[0]:
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "selective", "unsloth"])
def test_remat_policies_give_same_gradients(model_dir, policy):
    batch = {k: v[0] for k, v in random_batch(np.random.default_rng(2), 1, 2, 10).items()}

    def grads(use_gc):
        model = lora_model(model_dir)
        model.remat_policy = __import__("unsloth_jax.lora", fromlist=["x"]).resolve_remat(use_gc)
        split, params = split_model(model)
        params = {n: p + 0.01 for n, p in params.items()}
        f = lambda p: loss_sum_and_count(split, p, split.frozen, batch, None)[0]
        return jax.grad(f)(params)

    ref, got = grads(False), grads(policy)
    for n in ref:
        np.testing.assert_allclose(got[n], ref[n], rtol=1e-4, atol=1e-6)


def test_modules_to_save_and_full_finetuning_train_the_right_weights(model_dir):
    model = lora_model(model_dir, modules_to_save=["lm_head"])
    split, params = split_model(model)
    assert "lm_head" in split.names and any("lora_a" in n for n in split.names)
    full, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", full_finetuning=True)
    split, params = split_model(full)
    assert "layers.q_proj.kernel" in split.names and "embed" in split.names


@pytest.mark.parametrize("kw,match", [
    ({"r": 0}, "r=0"), ({"r": 100}, "r=100 is larger"),
    ({"target_modules": ["qproj"]}, "qproj.*q_proj, k_proj"), ({"lora_alpha": -1}, "lora_alpha"),
])
def test_bad_lora_settings(model_dir, kw, match):
    model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32")
    with pytest.raises(ConfigError, match=match):
        FastLanguageModel.get_peft_model(model, **kw)


def test_bad_learning_rate():
    with pytest.raises(ConfigError, match="learning_rate"):
        make_optimizer(["x"], learning_rate=0.0, total_steps=1)

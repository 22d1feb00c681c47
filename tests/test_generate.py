"""KV-cache generation: greedy equals transformers' greedy generate token for token (left padding,
sliding windows, EOS handling); sampling options behave."""
import numpy as np
import pytest
import torch

from hf_models import make_hf_model
from unsloth_jax import FastLanguageModel
from unsloth_jax.errors import ConfigError

PAD = 0


def load_pair(family, tmp_path, **overrides):
    hf = make_hf_model(family, **overrides)
    hf.save_pretrained(tmp_path / "m")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype="float32")
    return hf, FastLanguageModel.for_inference(model)


def left_padded(rows):
    """ids and attention_mask [B, max_len] with the shorter rows padded on the left."""
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), PAD, np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = r
        mask[b, T - len(r):] = 1
    return ids, mask


def hf_greedy(hf, ids, mask, max_new_tokens, eos):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                          max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=PAD)
    return out.numpy()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_greedy_matches_transformers_with_left_padding(family, tmp_path):
    # gemma2's sliding window (6) is shorter than prompt + 12 generated tokens.
    hf, model = load_pair(family, tmp_path)
    rng = np.random.default_rng(0)
    ids, mask = left_padded([rng.integers(3, 101, 7), rng.integers(3, 101, 4), rng.integers(3, 101, 1)])
    ours = model.generate(ids, max_new_tokens=12, temperature=0.0, attention_mask=mask, eos_token_id=-1,
                          pad_token_id=PAD)
    np.testing.assert_array_equal(ours, hf_greedy(hf, ids, mask, 12, eos=-1))


def test_eos_stops_rows_and_pads_like_transformers(tmp_path):
    hf, model = load_pair("qwen2", tmp_path)
    ids, mask = left_padded([np.arange(5, 11), np.arange(40, 43)])
    free = model.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=-1)
    T = ids.shape[1]
    eos = int(free[0, T + 2])  # row 0 emits this at its third step
    ours = model.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=eos, pad_token_id=PAD)
    np.testing.assert_array_equal(ours, hf_greedy(hf, ids, mask, 8, eos=eos))
    assert ours[0, T + 3:].tolist() == [PAD] * (ours.shape[1] - T - 3)
    # Once every row is done the loop stops: here both rows end on their first token.
    both = [int(free[0, T]), int(free[1, T])]
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=both),
                                  free[:, : T + 1])


def test_sampling_options(tmp_path):
    _, model = load_pair("llama", tmp_path)
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    greedy = model.generate(ids, max_new_tokens=6, eos_token_id=-1)
    sample = lambda **kw: model.generate(ids, max_new_tokens=6, eos_token_id=-1, **kw)
    # top_k=1 (or a tiny top_p) leaves only the argmax, whatever the temperature.
    np.testing.assert_array_equal(sample(temperature=2.0, top_k=1), greedy)
    np.testing.assert_array_equal(sample(temperature=2.0, top_p=1e-6), greedy)
    hot = sample(temperature=5.0, seed=1)
    np.testing.assert_array_equal(hot, sample(temperature=5.0, seed=1))
    assert (hot != greedy).any()  # a hot temperature on a random model leaves the greedy path
    with pytest.raises(ConfigError, match="left"):
        model.generate(np.array([[5, 6, 0]]), attention_mask=np.array([[1, 1, 0]]), max_new_tokens=2)


def test_lora_model_generates_its_own_argmax(tmp_path):
    """The cached decode path includes LoRA: every generated token is the full forward's argmax."""
    _, model = load_pair("qwen2", tmp_path)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    for lin in model.layers.linears().values():
        lin.lora_b.value = 0.1 * np.random.default_rng(0).standard_normal(lin.lora_b.value.shape, np.float32)
    out = model.generate(np.array([[3, 4, 5, 6]]), max_new_tokens=5, eos_token_id=-1)
    logits = np.asarray(model(out[:, :-1]))
    np.testing.assert_array_equal(logits[0, 3:].argmax(-1), out[0, 4:])

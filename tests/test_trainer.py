"""Trainer and CLI: demo end to end, exact resume, metrics, and the errors bad input gets."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from unsloth_jax import FastLanguageModel
from unsloth_jax.data import DEMO_EVAL, DEMO_TRAIN
from unsloth_jax.errors import ConfigError, DataError
from unsloth_jax.train import SFTTrainer, TrainingArguments, TrainingError
from unsloth_jax.train.__main__ import main


@pytest.fixture(scope="module")
def demo_model_dir(tmp_path_factory):
    from unsloth_jax.demo import build_demo_model

    return build_demo_model(str(tmp_path_factory.mktemp("demo") / "model"))


def make_trainer(demo_model_dir, out, **kw):
    model, tok = FastLanguageModel.from_pretrained(demo_model_dir, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.1,
                                             use_gradient_checkpointing=True)
    args = TrainingArguments(output_dir=str(out), max_seq_length=128, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=3e-3, warmup_steps=2, **kw)
    return SFTTrainer(model=model, tokenizer=tok, train_dataset=DEMO_TRAIN, args=args), model


def test_resume_continues_exactly(demo_model_dir, tmp_path):
    straight, model_a = make_trainer(demo_model_dir, tmp_path / "a", max_steps=10, save_steps=5)
    straight.train()
    losses_a = [r["loss"] for r in straight.history]
    # The same run, stopped after step 5: drop the later checkpoint, resume in a fresh process-like setup.
    shutil.copytree(tmp_path / "a" / "checkpoints" / "5", tmp_path / "b" / "checkpoints" / "5")
    resumed, model_b = make_trainer(demo_model_dir, tmp_path / "b", max_steps=10, save_steps=5)
    resumed.train(resume_from_checkpoint=True)
    losses_b = [r["loss"] for r in resumed.history]
    assert losses_b == losses_a[5:]
    for a, b in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_new_run_into_an_earlier_runs_output_dir(demo_model_dir, tmp_path):
    """A second, not resumed run into the same output_dir stops before training (naming the fix)
    instead of failing at its first save; with overwrite_output_dir it replaces the old checkpoints."""
    first, _ = make_trainer(demo_model_dir, tmp_path, max_steps=4, save_steps=2)
    first.train()
    again, _ = make_trainer(demo_model_dir, tmp_path, max_steps=2, save_steps=1)
    with pytest.raises(ConfigError, match="earlier run.*resume-from-checkpoint.*overwrite-output-dir"):
        again.train()
    assert again.history == [] and first.checkpoints.steps() == [2, 4]
    fresh, _ = make_trainer(demo_model_dir, tmp_path, max_steps=2, save_steps=1, overwrite_output_dir=True)
    fresh.train()
    assert fresh.checkpoints.steps() == [1, 2] and len(fresh.history) == 2


def test_metrics_jsonl_and_eval(demo_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(demo_model_dir, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4)
    args = TrainingArguments(output_dir=str(tmp_path), max_seq_length=128, per_device_train_batch_size=2,
                             gradient_accumulation_steps=1, max_steps=4, eval_steps=2, max_eval_batches=2)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=DEMO_TRAIN, eval_dataset=DEMO_EVAL, args=args)
    result = trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and np.isfinite(r["loss"]) for r in steps)
    assert [r["step"] for r in evals][:2] == [2, 4] and result["eval_perplexity"] == pytest.approx(
        np.exp(result["eval_loss"]))
    from tensorboard_reader import read_scalars

    scalars = read_scalars(tmp_path / "tensorboard")
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors") and result["adapter_dir"]
    assert scalars["loss"][-1][1] == pytest.approx(steps[-1]["loss"], rel=1e-6)


def test_ctrl_c_saves_a_checkpoint_that_resumes(demo_model_dir, tmp_path):
    trainer, _ = make_trainer(demo_model_dir, tmp_path, max_steps=6)
    make_iterator = trainer._batch_iterator

    def interrupted_after_3():  # the 4th batch request is where the user pressed Ctrl-C
        it = make_iterator()
        real_next, calls = it.next_batch, []

        def next_batch():
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return real_next()
        it.next_batch = next_batch
        return it

    trainer._batch_iterator = interrupted_after_3
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.checkpoints.latest_step() == 3
    resumed, _ = make_trainer(demo_model_dir, tmp_path, max_steps=6)
    resumed.train(resume_from_checkpoint=True)
    straight, _ = make_trainer(demo_model_dir, tmp_path / "straight", max_steps=6)
    straight.train()
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history][3:]


def test_nan_loss_stops_and_names_the_step(demo_model_dir, tmp_path):
    trainer, _ = make_trainer(demo_model_dir, tmp_path, max_steps=6, max_grad_norm=0.0, save_steps=1)
    trainer.args.learning_rate = 1e30  # the first update blows the adapters up
    with pytest.raises(TrainingError, match=r"loss became nan at step \d+.*last good checkpoint is step") as e:
        trainer.train()
    import re

    bad, good = map(int, re.search(r"at step (\d+).*checkpoint is step (\d+)", str(e.value)).groups())
    assert good == bad - 1 and bad <= 6


def test_cli_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    result = main(["--config", "configs/demo.yaml", "--output-dir", str(out), "--max-steps", "8",
                   "--max-seq-length", "128", "--eval-steps", "4", "--max-new-tokens", "8",
                   "--logging-steps", "1"])
    assert os.path.isfile(out / "adapter" / "adapter_config.json")
    assert os.path.isfile(out / "adapter" / "adapter_model.safetensors")
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8]
    assert "sample" in result and "Estimated device memory" in capsys.readouterr().out


def test_cli_values_parse_like_a_user_types_them():
    from unsloth_jax.train.config import load_config

    cfg = load_config("configs/demo.yaml", {"learning_rate": "2e-4", "max_steps": "7", "packing": "false",
                                             "target_modules": "[q_proj, v_proj]", "embedding_learning_rate": "1e-5"})
    assert (cfg.learning_rate, cfg.max_steps, cfg.packing) == (2e-4, 7, False)
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.embedding_learning_rate == 1e-5


def test_cli_help_documents_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for key in TrainingArguments.keys():
        assert f"--{key.replace('_', '-')}" in text


@pytest.mark.parametrize("argv,err,match", [
    (["--learning-rte", "1e-4"], ConfigError, "learning_rte.*did you mean 'learning_rate'"),
    (["--learning-rate", "0"], ConfigError, "learning_rate=0.0"),
    (["--lora-r", "0"], ConfigError, "lora_r=0"),
    (["--target-modules", "[qkv]"], ConfigError, "qkv"),
])
def test_cli_bad_values(tmp_path, argv, err, match):
    with pytest.raises(err, match=match):
        main(["--config", "configs/demo.yaml", "--output-dir", str(tmp_path)] + argv)


def test_dataset_without_learnable_rows(demo_model_dir, tmp_path):
    path = tmp_path / "only_users.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    model, tok = FastLanguageModel.from_pretrained(demo_model_dir, dtype="float32")
    with pytest.raises(DataError):
        SFTTrainer(model=FastLanguageModel.get_peft_model(model, r=4), tokenizer=tok, train_dataset=str(path),
                   args=TrainingArguments(output_dir=str(tmp_path / "o"), max_seq_length=64))

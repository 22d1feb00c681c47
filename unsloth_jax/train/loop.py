"""SFTTrainer: data -> jitted steps -> progress, metrics.jsonl, eval, checkpoints -> PEFT adapter."""
from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from unsloth_jax.errors import ConfigError, DataError, UnslothJaxError
from unsloth_jax.train.checkpoint import Checkpointer
from unsloth_jax.train.config import TrainConfig
from unsloth_jax.train.memory import device_peak_bytes, estimate_memory, format_estimate, gib
from unsloth_jax.train.optim import make_optimizer, make_schedule
from unsloth_jax.train.step import (TrainState, init_state, make_eval_step, make_train_step, split_model,
                                    update_model)

log = logging.getLogger("unsloth_jax")

# TRL/Unsloth users write TrainingArguments(...); it is the same set of options as the CLI config.
TrainingArguments = TrainConfig


class TrainingError(UnslothJaxError):
    """Training stopped (NaN loss, interrupted); the message says where the last good state is."""


def _tensorboard_writer(logdir: str):
    """TensorBoard event files when tensorboardX is installed (optional); metrics.jsonl always."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir)


class SFTTrainer:
    def __init__(self, model, tokenizer=None, train_dataset=None, eval_dataset=None, args: TrainConfig = None,
                 processing_class=None, **kwargs):
        self.args = args or TrainConfig()
        self.model = model
        self.tokenizer = tokenizer or processing_class
        self.train_rows, self.train_summary = self._prepare(train_dataset, "train_dataset")
        self.eval_rows = self._prepare(eval_dataset, "eval_dataset")[0] if eval_dataset is not None else None
        os.makedirs(self.args.output_dir, exist_ok=True)
        self.metrics_path = os.path.join(self.args.output_dir, "metrics.jsonl")
        self.checkpoints = Checkpointer(os.path.join(self.args.output_dir, "checkpoints"), self.args.save_total_limit)
        self.tensorboard = _tensorboard_writer(os.path.join(self.args.output_dir, "tensorboard"))
        self.history: list[dict] = []

    # ---- data ----------------------------------------------------------------------------------
    def _prepare(self, source, what):
        from unsloth_jax import data

        if source is None:
            raise DataError(f"{what} is required.")
        a = self.args
        rows, summary = data.prepare_dataset(
            source, self.tokenizer, max_seq_length=a.max_seq_length, format=a.dataset_format,
            chat_template=a.chat_template, train_on_responses_only=a.train_on_responses_only, packing=a.packing,
            dataset_text_field=a.dataset_text_field, skip_malformed=a.skip_malformed)
        print(f"[{what}] {summary}")
        return rows, summary

    def _batch_iterator(self):
        from unsloth_jax import data

        a = self.args
        return data.BatchIterator(self.train_rows, a.per_device_train_batch_size * a.gradient_accumulation_steps,
                                  seed=a.seed, shuffle=True)

    def total_steps(self) -> int:
        a = self.args
        if a.max_steps and a.max_steps > 0:
            return a.max_steps
        per_step = a.per_device_train_batch_size * a.gradient_accumulation_steps
        return max(1, math.ceil(a.num_train_epochs * len(self.train_rows) / per_step))

    def _micro_batches(self, batch: dict) -> dict:
        a = self.args
        k, b = a.gradient_accumulation_steps, a.per_device_train_batch_size
        return {key: np.asarray(v).reshape(k, b, *np.asarray(v).shape[1:]) for key, v in batch.items()}

    # ---- training --------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None):
        a = self.args
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else a.resume_from_checkpoint
        if len(self.train_rows) == 0:
            raise DataError("train_dataset yielded no training rows; see the data summary above.")
        self.model.training = True
        split, params = split_model(self.model)
        total = self.total_steps()
        tx = make_optimizer(split.names, learning_rate=a.learning_rate, total_steps=total,
                            warmup_steps=a.warmup_steps, lr_scheduler_type=a.lr_scheduler_type,
                            weight_decay=a.weight_decay, max_grad_norm=a.max_grad_norm, optim=a.optim,
                            embedding_learning_rate=a.embedding_learning_rate)
        schedule = make_schedule(a.learning_rate, total, a.warmup_steps, a.lr_scheduler_type)
        state = init_state(params, tx, a.seed)
        batches = self._batch_iterator()
        start = 0
        if resume:
            start, state, batches = self._resume(resume, state, batches)
        else:
            self._clear_earlier_checkpoints()
        print(format_estimate(estimate_memory(self.model, state.params, batch_size=a.per_device_train_batch_size,
                                              seq_len=a.max_seq_length, remat_policy=self.model.remat_policy)))
        train_step = make_train_step(split, tx)
        frozen = split.frozen
        self.state, self.split = state, split

        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
        pending, last_time, last_step = None, time.perf_counter(), start
        step = start
        try:
            for step in range(start, total):
                batch = batches.next_batch()
                n_tokens = int(np.sum(np.asarray(batch["segment_ids"]) > 0)) if "segment_ids" in batch else \
                    int(np.asarray(batch["input_ids"]).size)
                state, metrics = train_step(state, frozen, self._micro_batches(batch))
                self.state = state
                if pending is not None:  # read the previous step's metrics while this one runs
                    last_time, last_step = self._log(bar, pending, schedule, last_time, last_step)
                pending = (step + 1, metrics, n_tokens, batches.state()["epoch"])
                done = step + 1
                if (a.save_steps and done % a.save_steps == 0) or (a.eval_steps and done % a.eval_steps == 0):
                    last_time, last_step = self._log(bar, pending, schedule, last_time, last_step)
                    pending = None
                    if a.eval_steps and done % a.eval_steps == 0 and self.eval_rows is not None:
                        self.evaluate(step=done)
                    if a.save_steps and done % a.save_steps == 0:
                        self._save(done, state, batches)
            if pending is not None:
                self._log(bar, pending, schedule, last_time, last_step)
        except KeyboardInterrupt:
            bar.close()
            self._save(step, self.state, batches)  # the last completed step
            print(f"Interrupted: checkpoint saved at step {int(self.state.step)} in {self.checkpoints.directory}; "
                  f"resume with --resume-from-checkpoint true.")
            raise
        bar.close()
        self._save(total, state, batches)
        update_model(self.model, split, state.params)
        self.model.training = False
        adapter_dir = os.path.join(a.output_dir, "adapter")
        self.model.save_pretrained(adapter_dir)
        print(f"PEFT adapter written to {adapter_dir}")
        result = {"steps": total, "train_loss": self.history[-1]["loss"] if self.history else None,
                  "adapter_dir": adapter_dir}
        if self.eval_rows is not None:
            evaluated_last = a.eval_steps and total % a.eval_steps == 0
            result.update(self.last_eval if evaluated_last else self.evaluate(step=total))
        return result

    def _log(self, bar, pending, schedule, last_time, last_step):
        done, metrics, n_tokens, epoch = pending
        m = jax.device_get(metrics)
        loss = float(m["loss"])
        if not math.isfinite(loss):
            good = self.checkpoints.latest_step()
            where = f"the last good checkpoint is step {good} in {self.checkpoints.directory}" if good is not None \
                else "no checkpoint was saved before it"
            raise TrainingError(f"loss became {loss} at step {done}; training stopped ({where}). "
                                f"Lower learning_rate or check the data.")
        now = time.perf_counter()
        steps = max(done - last_step, 1)
        record = {"step": done, "loss": loss, "lr": float(schedule(done - 1)), "grad_norm": float(m["grad_norm"]),
                  "learned_tokens": int(m["tokens"]), "tokens_per_s": n_tokens * steps / max(now - last_time, 1e-9),
                  "epoch": epoch}
        mem = device_peak_bytes()
        if mem is not None:
            record["peak_device_bytes"] = mem
        self.history.append(record)
        if self.args.logging_steps and (done % self.args.logging_steps == 0 or done == bar.total):
            self._write_metrics(record)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                        mem=gib(mem) if mem else "n/a", refresh=False)
        bar.update(done - bar.n)
        return now, done

    def _write_metrics(self, record: dict):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()

    def _save(self, done: int, state: TrainState, batches):
        if self.checkpoints.latest_step() == done:
            return
        self.checkpoints.save(done, state, batches.state(), {"step": done})

    def _clear_earlier_checkpoints(self):
        """A new run must not meet an earlier run's checkpoints at its first save (orbax refuses an
        existing step, and they would mix two runs): stop before training, or remove them."""
        old = self.checkpoints.steps()
        if not old:
            return
        where = self.checkpoints.directory
        if not self.args.overwrite_output_dir:
            raise ConfigError(f"output_dir: {where} holds checkpoints of an earlier run (steps {old}). Continue it "
                              f"with --resume-from-checkpoint true, pick another --output-dir, or pass "
                              f"--overwrite-output-dir true to remove them and start over.")
        self.checkpoints.delete_all()
        print(f"overwrite_output_dir: removed the earlier run's checkpoints (steps {old}) in {where}")

    def _resume(self, resume, state, batches):
        ckpt = self.checkpoints if resume is True or str(resume).lower() == "true" else Checkpointer(str(resume))
        step, restored, meta = ckpt.restore(state)
        batches.restore(meta["data_state"])
        print(f"Resumed from step {step} ({ckpt.directory}).")
        return int(step), TrainState(*restored) if not isinstance(restored, TrainState) else restored, batches

    # ---- evaluation ------------------------------------------------------------------------------
    def evaluate(self, step=None) -> dict:
        from unsloth_jax import data

        if self.eval_rows is None:
            return {}
        eval_step = make_eval_step(self.split)
        it = data.BatchIterator(self.eval_rows, self.args.per_device_train_batch_size, seed=0, shuffle=False)
        total, count = 0.0, 0
        n_batches = min(self.args.max_eval_batches, max(1, len(self.eval_rows) //
                                                            self.args.per_device_train_batch_size))
        for _ in range(n_batches):
            s, c = eval_step(self.state.params, self.split.frozen, it.next_batch())
            total, count = total + float(s), count + int(c)
        loss = total / max(count, 1)
        record = {"step": step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
        self._write_metrics(record)
        self.last_eval = record
        print(f"[eval] step {step}: loss {loss:.4f}, perplexity {record['eval_perplexity']:.2f}")
        return record

"""Optimizer and learning-rate schedules (optax)."""
from __future__ import annotations

import logging

import optax

from unsloth_jax.errors import ConfigError

log = logging.getLogger("unsloth_jax")

SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit")


def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0, kind: str = "linear"):
    if kind not in SCHEDULES:
        raise ConfigError(f"lr_scheduler_type={kind!r}: use one of {SCHEDULES}.")
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup_steps, 1)
    decay = {"linear": optax.linear_schedule(lr, 0.0, decay_steps),
             "cosine": optax.cosine_decay_schedule(lr, decay_steps),
             "constant": optax.constant_schedule(lr)}[kind]
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])


def make_optimizer(param_names, *, learning_rate, total_steps, warmup_steps=0, lr_scheduler_type="linear",
                   weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                   optim="adamw", embedding_learning_rate=None):
    """AdamW with clipping; params named `embed`/`lm_head` (modules_to_save) may get their own lr."""
    if learning_rate is None or learning_rate <= 0:
        raise ConfigError(f"learning_rate={learning_rate!r}: must be > 0 (LoRA typically 2e-4).")
    if optim not in OPTIMIZERS:
        raise ConfigError(f"optim={optim!r}: use one of {OPTIMIZERS}.")
    if optim == "adamw_8bit":
        log.info("optim='adamw_8bit': optax has no 8-bit AdamW state; using fp32 AdamW "
                 "(LoRA optimizer state is small).")

    def adamw(lr):
        return optax.adamw(make_schedule(lr, total_steps, warmup_steps, lr_scheduler_type), b1=adam_beta1,
                           b2=adam_beta2, eps=adam_epsilon, weight_decay=weight_decay)

    if embedding_learning_rate is None:
        opt = adamw(learning_rate)
    else:
        labels = {n: "embedding" if n in ("embed", "lm_head") else "adapter" for n in param_names}
        opt = optax.multi_transform({"adapter": adamw(learning_rate), "embedding": adamw(embedding_learning_rate)},
                                    labels)
    chain = [opt] if not max_grad_norm else [optax.clip_by_global_norm(max_grad_norm), opt]
    return optax.chain(*chain)

"""The jitted train step: gradient accumulation over micro-batches, clipping, AdamW, donated state.

The model is split once into (graphdef, trainable, frozen). Trainable arrays travel as a flat
{name: array} dict so the optimizer state and checkpoints have stable, readable keys; frozen
weights are a separate argument (never baked into the compiled step as constants) and never get
gradients or optimizer state.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unsloth_jax.lora import trainable_filter


class TrainState(NamedTuple):
    params: dict        # {name: array} trainable arrays
    opt_state: object
    step: jnp.ndarray   # int32 scalar: optimizer steps taken
    rng: jnp.ndarray    # PRNG key for dropout


class SplitModel(NamedTuple):
    graphdef: object
    treedef: object     # of the trainable nnx.State
    names: tuple        # flat names, in treedef leaf order
    frozen: object      # nnx.State of everything that does not train


def _leaf_name(path) -> str:
    name = jax.tree_util.keystr(path)
    name = re.sub(r"\['?([^'\]]+)'?\]", r".\1", name).replace(".value", "")
    return name.lstrip(".")


def split_model(model) -> tuple[SplitModel, dict]:
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(model), ...)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(trainable)
    names = tuple(_leaf_name(p) for p, _ in leaves_with_path)
    params = {n: leaf for n, (_, leaf) in zip(names, leaves_with_path)}
    return SplitModel(graphdef, treedef, names, frozen), params


def _trainable_state(split: SplitModel, params: dict):
    return jax.tree_util.tree_unflatten(split.treedef, [params[n] for n in split.names])


def merge_model(split: SplitModel, params: dict, frozen=None):
    """The model with `params` as its trainable arrays (and `frozen`, default the split's, as the rest)."""
    return nnx.merge(split.graphdef, _trainable_state(split, params), split.frozen if frozen is None else frozen)


def update_model(model, split: SplitModel, params: dict):
    """Write trained arrays back into the live model (for export and generation)."""
    nnx.update(model, _trainable_state(split, params))
    return model


def loss_sum_and_count(split: SplitModel, params, frozen, batch, rng):
    return merge_model(split, params, frozen).loss_sum_and_count(
        batch["input_ids"], batch["labels"], batch.get("positions"), batch.get("segment_ids"), dropout_rng=rng)


def make_train_step(split: SplitModel, tx: optax.GradientTransformation):
    """step(state, frozen, batches) -> (state, metrics). Each leaf of `batches` is [k, b, T]: k
    micro-batches whose gradients are summed, then divided by the learned tokens of all k, so the
    update equals one batch of k*b rows."""

    def micro_step(params, frozen, rng, carry, xs):
        grads_acc, loss_acc, count_acc = carry
        batch, i = xs
        grad_fn = jax.value_and_grad(lambda p: loss_sum_and_count(split, p, frozen, batch, jax.random.fold_in(rng, i)),
                                     has_aux=True)
        (total, count), grads = grad_fn(params)
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        return (grads_acc, loss_acc + total, count_acc + count), None

    def step(state: TrainState, frozen, batches):
        rng, step_rng = jax.random.split(state.rng)
        k = jax.tree.leaves(batches)[0].shape[0]
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (grads, total, count), _ = jax.lax.scan(
            lambda c, xs: micro_step(state.params, frozen, step_rng, c, xs), init, (batches, jnp.arange(k)))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": total / denom, "tokens": count, "grad_norm": optax.global_norm(grads)}
        return TrainState(params, opt_state, state.step + 1, rng), metrics

    return jax.jit(step, donate_argnums=(0,))


def make_eval_step(split: SplitModel):
    @jax.jit
    def eval_step(params, frozen, batch):
        return loss_sum_and_count(split, params, frozen, batch, None)
    return eval_step


def init_state(params: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed))

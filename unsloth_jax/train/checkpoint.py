"""Orbax checkpoints of the train state (adapters/trainable weights, optimizer, step, RNG) plus the
data position, so a resumed run continues exactly. Orbax writes to a temp dir and renames it into
place, so an interrupted save never leaves a checkpoint that looks complete."""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from unsloth_jax.errors import ConfigError


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), create=True))

    def save(self, step: int, state, data_state: dict, extra: dict | None = None) -> None:
        meta = {"data_state": data_state, **(extra or {})}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def delete_all(self) -> None:
        for step in self.steps():
            self.manager.delete(step)

    def latest_step(self):
        return self.manager.latest_step()

    def restore(self, like_state, step=None):
        step = self.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"resume_from_checkpoint: no checkpoint found in {self.directory}; "
                              f"start without resuming or point to a run's checkpoints/ directory.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      meta=ocp.args.JsonRestore()))
        return step, restored["state"], restored["meta"]

    def close(self):
        self.manager.close()

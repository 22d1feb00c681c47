"""Deterministic, resumable batch iteration over TokenRows.

The batches of epoch e are a pure function of (rows, batch_size, seed, e): rows are shuffled
within each length group, cut into batches, and the batches of all groups are shuffled together.
So the iterator's position is just (epoch, index), which the trainer checkpoints; `restore` puts a
fresh iterator at the same place and it yields exactly the batches the old one would have.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from unsloth_jax.data.packing import BATCH_KEYS, TokenRows, _empty_rows
from unsloth_jax.errors import DataError

Batch = dict[str, np.ndarray]  # BATCH_KEYS -> int32 [B, T]


class BatchIterator:
    """Yields static-shape batches {input_ids, labels, segment_ids, positions}, each int32 [B, T].

    shuffle=False keeps row order (evaluation). A last, short batch of a length group is filled
    with padding rows (labels -100, segment 0) so B is always `batch_size`, unless drop_last.
    num_epochs=None iterates forever (the trainer stops at max_steps)."""

    def __init__(self, rows: TokenRows, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, num_epochs: int | None = None):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.shuffle, self.drop_last, self.num_epochs = shuffle, drop_last, num_epochs
        self.epoch, self.index = 0, 0
        self._plan = self._epoch_plan(0)
        if not self._plan:
            raise DataError(f"no batches: {len(rows)} rows with batch_size={batch_size} and "
                            f"drop_last={drop_last}. Fix: lower batch_size or set drop_last=False.")

    @property
    def batches_per_epoch(self) -> int:
        return len(self._plan)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The epoch's batches as (row length, row indices), in order."""
        rng = np.random.default_rng([self.seed, epoch])
        plan = []
        for length in self.rows.lengths:
            n = len(self.rows.groups[length]["input_ids"])
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            for start in range(0, n, self.batch_size):
                chunk = order[start:start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    plan.append((length, chunk))
        if self.shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        return plan

    def _make_batch(self, length: int, indices: np.ndarray) -> Batch:
        group = self.rows.groups[length]
        batch = {key: group[key][indices] for key in BATCH_KEYS}
        missing = self.batch_size - len(indices)
        if missing:
            filler = _empty_rows(missing, length, self.rows.pad_id)
            batch = {key: np.concatenate([batch[key], filler[key]]) for key in BATCH_KEYS}
        return batch

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.index >= len(self._plan):
            if self.num_epochs is not None and self.epoch + 1 >= self.num_epochs:
                raise StopIteration
            self.epoch, self.index = self.epoch + 1, 0
            self._plan = self._epoch_plan(self.epoch)
        length, indices = self._plan[self.index]
        self.index += 1
        return self._make_batch(length, indices)

    def next_batch(self) -> Batch:
        """The next batch (same as next(iterator))."""
        return next(self)

    def state(self) -> dict[str, int]:
        """Position to checkpoint: the next batch is batch `index` of epoch `epoch`."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "batches_per_epoch": self.batches_per_epoch}

    def restore(self, state: dict[str, int]) -> "BatchIterator":
        """Continue from a `state()`; refuses one taken on different data or settings."""
        if int(state["seed"]) != self.seed or int(state["batches_per_epoch"]) != self.batches_per_epoch:
            raise DataError(
                f"cannot resume the data iterator: checkpoint has seed={state['seed']}, "
                f"{state['batches_per_epoch']} batches/epoch; now seed={self.seed}, "
                f"{self.batches_per_epoch} batches/epoch. Fix: resume with the same dataset, "
                "max_seq_length, packing, batch size and seed as the checkpointed run.")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._plan = self._epoch_plan(self.epoch)
        return self


def iterate_batches(rows: TokenRows, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                    drop_last: bool = False, num_epochs: int | None = 1) -> BatchIterator:
    """Shorthand for BatchIterator with one epoch by default (e.g. for evaluation)."""
    return BatchIterator(rows, batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                         num_epochs=num_epochs)

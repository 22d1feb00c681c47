"""Turn tokenized examples into fixed-length rows: packed, or padded to a few length buckets.

A row is four int32 arrays of one length T:
  input_ids    token ids, pad_id after the last segment
  labels       already-shifted targets (see masking.py), -100 on padding and at segment ends
  segment_ids  1..n for the examples in the row, 0 for padding (attention stays within a segment)
  positions    0,1,2,... restarting at every segment (RoPE positions), 0 on padding
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from unsloth_jax.data.masking import IGNORE_INDEX

BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions")


@dataclass
class TokenRows:
    """All rows of a dataset, grouped by row length: `groups[T][key]` is an int32 [N_T, T] array.

    Packed data has one group (T = max_seq_length); unpacked data has one group per bucket."""
    groups: dict[int, dict[str, np.ndarray]]
    pad_id: int
    packed: bool

    def __len__(self) -> int:
        return sum(len(g["input_ids"]) for g in self.groups.values())

    @property
    def lengths(self) -> list[int]:
        """The row lengths present, ascending (one per compiled shape)."""
        return sorted(self.groups)

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens."""
        return int(sum((g["segment_ids"] > 0).sum() for g in self.groups.values()))

    @property
    def num_slots(self) -> int:
        """Token slots including padding."""
        return sum(g["input_ids"].size for g in self.groups.values())

    @property
    def num_learned(self) -> int:
        return int(sum((g["labels"] != IGNORE_INDEX).sum() for g in self.groups.values()))

    def empty_row(self, length: int) -> dict[str, np.ndarray]:
        """A row of pure padding: used to fill the last batch to a static batch size."""
        return _empty_rows(1, length, self.pad_id)


def _empty_rows(n: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.full((n, length), pad_id, np.int32),
            "labels": np.full((n, length), IGNORE_INDEX, np.int32),
            "segment_ids": np.zeros((n, length), np.int32),
            "positions": np.zeros((n, length), np.int32)}


def length_buckets(max_seq_length: int, smallest: int = 64) -> list[int]:
    """Row lengths for unpacked data: powers of two from `smallest`, capped by max_seq_length.

    Few distinct shapes means few compilations; powers of two waste at most half a row."""
    buckets, length = [], smallest
    while length < max_seq_length:
        buckets.append(length)
        length *= 2
    return buckets + [max_seq_length]


def best_fit_packing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows of at most `capacity` tokens (best-fit decreasing).

    Longest examples are placed first, each into the open row with the least room that still
    fits it; this wastes little space and is deterministic. Every length must be <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (room left, row index), kept sorted
    for i in order:
        at = bisect.bisect_left(open_rows, (lengths[i], -1))
        if at < len(open_rows):
            room, row = open_rows.pop(at)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        room -= lengths[i]
        if room > 0:
            bisect.insort(open_rows, (room, row))
    return rows


def pack_rows(examples: list[tuple[np.ndarray, np.ndarray]], max_seq_length: int, pad_id: int) -> TokenRows:
    """Pack (input_ids, labels) examples, each <= max_seq_length, into rows of max_seq_length."""
    rows = best_fit_packing([len(ids) for ids, _ in examples], max_seq_length)
    arrays = _empty_rows(len(rows), max_seq_length, pad_id)
    for r, members in enumerate(rows):
        start = 0
        # Restore input order inside a row: segment ids then follow the order of the data file.
        for segment, i in enumerate(sorted(members), start=1):
            ids, labels = examples[i]
            end = start + len(ids)
            arrays["input_ids"][r, start:end] = ids
            arrays["labels"][r, start:end] = labels
            arrays["segment_ids"][r, start:end] = segment
            arrays["positions"][r, start:end] = np.arange(len(ids))
            start = end
    return TokenRows({max_seq_length: arrays}, pad_id, packed=True)


def pad_rows(examples: list[tuple[np.ndarray, np.ndarray]], buckets: list[int], pad_id: int) -> TokenRows:
    """One example per row, padded to the smallest bucket that holds it."""
    by_bucket: dict[int, list[int]] = {}
    for i, (ids, _) in enumerate(examples):
        bucket = buckets[bisect.bisect_left(buckets, len(ids))]
        by_bucket.setdefault(bucket, []).append(i)
    groups = {}
    for length, members in sorted(by_bucket.items()):
        arrays = _empty_rows(len(members), length, pad_id)
        for r, i in enumerate(members):
            ids, labels = examples[i]
            n = len(ids)
            arrays["input_ids"][r, :n] = ids
            arrays["labels"][r, :n] = labels
            arrays["segment_ids"][r, :n] = 1
            arrays["positions"][r, :n] = np.arange(n)
        groups[length] = arrays
    return TokenRows(groups, pad_id, packed=False)

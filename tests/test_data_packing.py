"""Data pipeline: packing with segment ids, length buckets, resumable batch iteration, summary."""
import random

import numpy as np
import pytest

from unsloth_jax.data import (BATCH_KEYS, DEMO_EVAL, DEMO_TRAIN, IGNORE_INDEX, BatchIterator,
                              best_fit_packing, demo_tokenizer, iterate_batches, length_buckets,
                              prepare_dataset)
from unsloth_jax.errors import DataError

T = 64


@pytest.fixture(scope="module")
def tok():
    return demo_tokenizer(vocab_size=384)


def _examples(n=120, seed=0):
    """Chats of varied length: some replies exceed T tokens to exercise truncation."""
    rng = random.Random(seed)
    words = ["rain", "fox", "window", "kettle", "blue", "seven", "river", "stone"]
    data = []
    for _ in range(n):
        reply = " ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 8, 20, 60])))
        data.append({"messages": [{"role": "user", "content": f"Say {rng.randrange(100)} words."},
                                  {"role": "assistant", "content": reply}]})
    return data


def _segments(rows):
    """Yield (input_ids, labels, positions) of every segment of every row."""
    for group in rows.groups.values():
        for ids, labels, seg, pos in zip(*(group[k] for k in BATCH_KEYS)):
            for s in range(1, seg.max() + 1):
                at = seg == s
                yield ids[at], labels[at], pos[at]


@pytest.fixture(scope="module")
def packed(tok):
    return prepare_dataset(_examples(), tok, max_seq_length=T)


@pytest.fixture(scope="module")
def unpacked(tok):
    return prepare_dataset(_examples(), tok, max_seq_length=T, packing=False, buckets=[16, 32, 48, 64])


def test_packed_rows_layout(packed):
    rows, summary = packed
    (group,) = rows.groups.values()
    assert rows.lengths == [T]
    for key in BATCH_KEYS:
        assert group[key].dtype == np.int32 and group[key].shape == (len(rows), T)
    for ids, labels, seg, pos in zip(*(group[k] for k in BATCH_KEYS)):
        n = int((seg > 0).sum())
        # Segments are 1..k, contiguous, in order, then padding (0) to the end of the row.
        assert (seg[:n] > 0).all() and (seg[n:] == 0).all()
        assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all() and seg[0] == 1
        # Positions restart at 0 in every segment and count up.
        starts = np.r_[0, np.flatnonzero(np.diff(seg[:n])) + 1]
        assert (pos[starts] == 0).all()
        inner = np.setdiff1d(np.arange(1, n), starts)
        assert (pos[inner] == pos[inner - 1] + 1).all()
        assert (labels[n:] == IGNORE_INDEX).all() and (pos[n:] == 0).all()


def test_no_label_crosses_a_segment(packed):
    rows, _ = packed
    (group,) = rows.groups.values()
    ids, labels, seg = group["input_ids"], group["labels"], group["segment_ids"]
    b, t = np.nonzero(labels[:, :-1] != IGNORE_INDEX)
    # Every target inside a row comes from the same segment (a truncated example fills a whole
    # row, so its kept "next token" label sits at the last column, outside this check).
    assert (seg[b, t + 1] == seg[b, t]).all()
    assert (labels[b, t] == ids[b, t + 1]).all()
    # Segment ends are not learned, except the last column of a truncated (full-row) example.
    ends = (seg[:, :-1] > 0) & (seg[:, 1:] != seg[:, :-1])
    assert (labels[:, :-1][ends] == IGNORE_INDEX).all()


def test_every_token_exactly_once(packed, unpacked):
    rows, summary = packed
    ref_rows, ref_summary = unpacked
    packed_segments = sorted(tuple(ids) + tuple(labels) for ids, labels, _ in _segments(rows))
    reference = sorted(tuple(ids) + tuple(labels) for ids, labels, _ in _segments(ref_rows))
    assert packed_segments == reference  # same examples, each whole, none twice
    assert len(packed_segments) == summary.examples_kept == ref_summary.examples_kept
    assert summary.tokens == ref_summary.tokens == sum(len(s) for s, _, _ in _segments(rows))


def test_truncation_and_efficiency_reported(packed, tok):
    rows, summary = packed
    assert summary.truncated > 0 and summary.dropped == 0
    assert summary.longest_example > T
    assert summary.packing_efficiency == pytest.approx(summary.tokens / (len(rows) * T))
    assert summary.packing_efficiency > 0.85
    assert 0 < summary.learned_fraction < 1
    text = str(summary)
    for needle in ["examples read", "truncated", f"{summary.truncated}", "efficiency", "learned"]:
        assert needle in text
    _, dropping = prepare_dataset(_examples(), tok, max_seq_length=T, truncate=False)
    assert dropping.dropped == summary.truncated and dropping.truncated == 0
    assert dropping.examples_kept == summary.examples_kept - summary.truncated


def test_best_fit_packing_is_a_partition():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 500).tolist()
    rows = best_fit_packing(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) <= 1.15 * sum(lengths) / 100 + 1  # close to the lower bound
    assert best_fit_packing(lengths, 100) == rows  # deterministic


def test_unpacked_buckets(unpacked):
    rows, summary = unpacked
    assert length_buckets(300) == [64, 128, 256, 300] and length_buckets(32) == [32]
    assert not summary.packed and summary.row_lengths == rows.lengths
    lower = {16: 0, 32: 16, 48: 32, 64: 48}
    for length, group in rows.groups.items():
        n = (group["segment_ids"] > 0).sum(axis=1)
        assert (n <= length).all() and (n > lower[length]).all()  # the smallest bucket that fits
        assert set(np.unique(group["segment_ids"])) <= {0, 1}


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(all(np.array_equal(x[k], y[k]) for k in BATCH_KEYS) for x, y in zip(a, b))


def test_batches_cover_each_row_once_per_epoch(packed):
    rows, _ = packed
    it = BatchIterator(rows, batch_size=4, seed=1)
    epoch = _take(it, len(it))
    assert all(b[k].shape == (4, T) and b[k].dtype == np.int32 for b in epoch for k in BATCH_KEYS)
    seen = sorted(tuple(r) for b in epoch for r, s in zip(b["input_ids"], b["segment_ids"]) if s.any())
    assert seen == sorted(tuple(r) for r in rows.groups[T]["input_ids"])
    assert it.state()["epoch"] == 0 and it.state()["index"] == len(it)
    next_epoch = _take(it, len(it))
    assert it.state()["epoch"] == 1 and not _same(epoch, next_epoch)  # reshuffled
    assert _same(epoch, _take(BatchIterator(rows, batch_size=4, seed=1), len(it)))  # f(seed, epoch)


@pytest.mark.parametrize("where", [0.3, 0.95, 1.5])  # mid-epoch, near its end, in the next epoch
def test_resume_mid_epoch_yields_same_batches(unpacked, where):
    rows, _ = unpacked
    assert len(rows.lengths) > 1  # batches of several shapes
    it = BatchIterator(rows, batch_size=8, seed=7)
    _take(it, int(where * len(it)))
    state = dict(it.state())
    expected = _take(it, 12)
    resumed = BatchIterator(rows, batch_size=8, seed=7).restore(state)
    assert _same([resumed.next_batch() for _ in range(12)], expected)


def test_restore_refuses_other_settings(packed):
    rows, _ = packed
    state = BatchIterator(rows, batch_size=4, seed=1).state()
    with pytest.raises(DataError, match="same dataset"):
        BatchIterator(rows, batch_size=4, seed=2).restore(state)
    with pytest.raises(DataError, match="same dataset"):
        BatchIterator(rows, batch_size=8, seed=1).restore(state)


def test_eval_iteration_in_order_one_epoch(unpacked):
    rows, _ = unpacked
    batches = list(iterate_batches(rows, batch_size=16, shuffle=False))
    assert len(batches) == sum(-(-len(g["input_ids"]) // 16) for g in rows.groups.values())
    last = batches[-1]
    assert last["input_ids"].shape[0] == 16  # filled with padding rows
    with pytest.raises(DataError, match="lower batch_size"):
        iterate_batches(rows, batch_size=10_000, drop_last=True)


def test_demo_dataset(tok):
    rows, summary = prepare_dataset(DEMO_TRAIN, tok, max_seq_length=256)
    assert summary.examples_read == summary.examples_kept >= 300 and summary.num_skipped == 0
    assert summary.packing_efficiency > 0.9 and summary.truncated == 0
    _, eval_summary = prepare_dataset(DEMO_EVAL, tok, max_seq_length=256)
    assert eval_summary.examples_kept >= 40

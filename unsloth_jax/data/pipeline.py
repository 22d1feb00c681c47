"""prepare_dataset: source -> records -> messages/text -> tokens + shifted labels -> rows."""
from __future__ import annotations

from collections import Counter

import numpy as np

from unsloth_jax.data.formats import (ExampleError, apply_column_mapping, canonical_format,
                                      detect_format, normalize)
from unsloth_jax.data.loading import describe_source, iter_records
from unsloth_jax.data.masking import (IGNORE_INDEX, conversation_spans, shifted_labels,
                                      tokenize_text, tokenize_with_mask)
from unsloth_jax.data.packing import TokenRows, length_buckets, pack_rows, pad_rows
from unsloth_jax.data.summary import DataSummary
from unsloth_jax.data.templates import ChatTemplate, check_end_of_turn, resolve_chat_template
from unsloth_jax.errors import DataError

CHUNK = 512  # examples tokenized per call: batching lets the Rust tokenizer amortise overhead


class _Builder:
    """State of one prepare_dataset call (kept in one place so the steps stay small functions)."""

    def __init__(self, tokenizer, summary: DataSummary, *, chat_template, train_on_responses_only,
                 skip_malformed, truncate):
        self.tokenizer, self.summary = tokenizer, summary
        self.chat_template_arg = chat_template
        self.template: ChatTemplate | None = None
        self.train_on_responses_only = train_on_responses_only
        self.skip_malformed, self.truncate = skip_malformed, truncate
        self.examples: list[tuple[np.ndarray, np.ndarray]] = []  # (input_ids, labels), kept
        self.roles = Counter()  # roles seen: explains an all-masked dataset
        self.unlearned_after_truncation = 0

    def bad_example(self, location: str, error: ExampleError, fmt: str | None = None) -> None:
        if not self.skip_malformed:
            hint = ""
            if error.reason == "missing field" and fmt:
                hint = (f" (format={fmt!r}; if the whole dataset names its columns differently, "
                        "pass column_mapping={'<your column>': '<expected field>'} or format=)")
            raise DataError(f"{location}: {error.detail}{hint}. Fix the example, or pass "
                            "skip_malformed=True to skip (and count) such examples.")
        self.summary.skip(error.reason, location, error.detail)

    def chat_template(self) -> ChatTemplate:
        if self.template is None:
            self.template = resolve_chat_template(self.tokenizer, self.chat_template_arg)
            check_end_of_turn(self.tokenizer, self.template)
            self.summary.chat_template = self.template.name
        return self.template

    def add_chunk(self, pending: list[tuple[str, list | str]]) -> None:
        """Tokenize a chunk of normalized examples and keep those with something to learn."""
        if not pending:
            return
        if isinstance(pending[0][1], str):
            locations = [loc for loc, _ in pending]
            tokenized = tokenize_text(self.tokenizer, [text for _, text in pending])
        else:
            locations, texts, spans = self.render_chats(pending)
            tokenized = tokenize_with_mask(self.tokenizer, texts, spans) if texts else []
        for location, (ids, learned) in zip(locations, tokenized):
            self.add_example(location, ids, learned)

    def render_chats(self, pending):
        template = self.chat_template()
        locations, texts, spans = [], [], []
        for location, messages in pending:
            self.roles.update(m["role"] for m in messages)
            try:
                text, text_spans = conversation_spans(self.tokenizer, template, messages,
                                                      self.train_on_responses_only)
            except ExampleError as e:
                self.bad_example(location, e)
                continue
            locations.append(location)
            texts.append(text)
            spans.append(text_spans)
        return locations, texts, spans

    def add_example(self, location: str, ids: np.ndarray, learned: np.ndarray) -> None:
        summary, limit = self.summary, self.summary.max_seq_length
        labels = shifted_labels(ids, learned)
        summary.longest_example = max(summary.longest_example, len(ids))
        detail = "nothing to learn (no assistant reply, or the template renders none)"
        if len(ids) > limit:
            if not self.truncate:
                summary.dropped += 1
                return
            summary.truncated += 1
            # Labels were shifted before cutting, so the last kept position still predicts the
            # first cut token: truncation loses no supervision for the kept positions.
            if (labels != IGNORE_INDEX).any() and not (labels[:limit] != IGNORE_INDEX).any():
                self.unlearned_after_truncation += 1
                detail = f"every learned token lies beyond max_seq_length={limit}"
            ids, labels = ids[:limit], labels[:limit]
        if not (labels != IGNORE_INDEX).any():
            summary.skip("no learned tokens", location, detail)
            return
        self.examples.append((ids, labels))


def prepare_dataset(source, tokenizer, *, max_seq_length: int, format: str | None = None,
                    chat_template: str | None = None, train_on_responses_only: bool = True,
                    packing: bool = True, dataset_text_field: str | None = None,
                    column_mapping: dict[str, str] | None = None, skip_malformed: bool = False,
                    truncate: bool = True, buckets: list[int] | None = None
                    ) -> tuple[TokenRows, DataSummary]:
    """Read, normalize, template, tokenize, mask and pack a dataset. See the package docstring."""
    if max_seq_length < 2:
        raise DataError(f"max_seq_length must be >= 2, got {max_seq_length}")
    summary = DataSummary(source=describe_source(source), max_seq_length=max_seq_length, packed=packing)
    builder = _Builder(tokenizer, summary, chat_template=chat_template,
                       train_on_responses_only=train_on_responses_only,
                       skip_malformed=skip_malformed, truncate=truncate)
    fmt = canonical_format(format) if format else None

    def skipped_while_reading(reason: str, location: str, detail: str) -> None:
        summary.examples_read += 1
        summary.skip(reason, location, detail)

    pending: list[tuple[str, list | str]] = []
    for record in iter_records(source, skip_malformed=skip_malformed, on_skip=skipped_while_reading):
        summary.examples_read += 1
        try:
            data = apply_column_mapping(record.data, column_mapping)
            if fmt is None:  # decided by the first readable example, then enforced on all
                fmt = detect_format(data, record.location, dataset_text_field)
                summary.format = fmt
            pending.append((record.location, normalize(data, fmt, dataset_text_field)))
        except ExampleError as e:
            builder.bad_example(record.location, e, fmt)
        if len(pending) >= CHUNK:
            builder.add_chunk(pending)
            pending = []
    builder.add_chunk(pending)
    summary.format = fmt or ""

    _check_kept(builder, summary)
    pad_id = _pad_id(tokenizer)
    if packing:
        rows = pack_rows(builder.examples, max_seq_length, pad_id)
    else:
        rows = pad_rows(builder.examples, sorted(buckets or length_buckets(max_seq_length)), pad_id)
    _fill_counts(summary, builder, rows)
    return rows, summary


def _pad_id(tokenizer) -> int:
    # Padding never reaches the loss (labels -100) or other segments (segment 0), so any id works.
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0


def _check_kept(builder: _Builder, summary: DataSummary) -> None:
    """Every example dropped or skipped: stop here with the most likely cause."""
    if builder.examples:
        return
    if summary.examples_read == 0:
        raise DataError(f"{summary.source}: no examples found (empty file or dataset).")
    first = "\n".join(f"    {s}" for s in summary.skip_examples)
    reasons = ", ".join(f"{r}: {n}" for r, n in summary.skipped.items()) or "none"
    if summary.dropped:
        hint = (f"{summary.dropped} examples were longer than max_seq_length={summary.max_seq_length} "
                "and dropped (truncate=False). Fix: raise max_seq_length or pass truncate=True.")
    elif summary.skipped.get("no learned tokens") and builder.unlearned_after_truncation:
        hint = (f"max_seq_length={summary.max_seq_length} cut every response off. Fix: raise it.")
    elif summary.skipped.get("no learned tokens"):
        roles = dict(builder.roles) if builder.roles else "none (text data)"
        hint = ("no example has a token to learn. Roles seen: "
                f"{roles}. Possible causes: the data has no assistant turns (wrong format? detected "
                f"format={summary.format!r}; map columns with column_mapping or pass format=), "
                f"or the chat template ({summary.chat_template}) renders no assistant text (a "
                "template without an assistant turn?). Fix the data or template, or pass "
                "train_on_responses_only=False to learn every token.")
    else:
        hint = "every example was malformed. Fix the data (see the examples above)."
    raise DataError(f"{summary.source}: no usable examples out of {summary.examples_read} read "
                    f"(skipped: {reasons}).\n{first}\n{hint}")


def _fill_counts(summary: DataSummary, builder: _Builder, rows: TokenRows) -> None:
    summary.examples_kept = len(builder.examples)
    summary.tokens = rows.num_tokens
    summary.learned_tokens = rows.num_learned
    summary.rows = len(rows)
    summary.slots = rows.num_slots
    summary.row_lengths = rows.lengths

"""Token ids and (already shifted) labels from rendered conversations.

How responses are located: the conversation is rendered prefix by prefix. For the assistant
message i, `render(messages[:i], add_generation_prompt=True)` ends exactly where the reply starts,
and `render(messages[:i+1])` ends after the reply and its end-of-turn token (plus any whitespace
separating turns, which is not learned). No marker strings are searched for, so replies that
contain template-like text are handled, and every assistant turn of a multi-turn chat is learned.

The full text is tokenized once and each token is mapped to the characters it covers (offset
mapping). A token is learned when its last character lies in a learned span; using the end offset
keeps this right for tokenizers that trim leading whitespace from offsets.

Label convention of this project: labels are ALREADY SHIFTED.
    labels[t] = input_ids[t + 1]  if token t + 1 is learned, else -100
so labels[t] is the target of the prediction made at position t, and a model's loss is
cross_entropy(logits[:, t], labels[:, t]) with no further shifting. The last position of an example
has label -100, unless the example was truncated, in which case it keeps the next (cut) token.
"""
from __future__ import annotations

import numpy as np

from unsloth_jax.data.formats import ExampleError
from unsloth_jax.data.templates import ChatTemplate, render

IGNORE_INDEX = -100


def conversation_spans(tokenizer, template: ChatTemplate, messages: list[dict[str, str]],
                       train_on_responses_only: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages`; return the text and the [start, end) character spans to learn."""
    try:
        text = render(tokenizer, template, messages, add_generation_prompt=False)
    except Exception as e:  # Jinja TemplateError, or raise_exception() inside the template
        raise ExampleError("template error", f"chat template {template.name!r} failed: {e}") from None
    if not train_on_responses_only:
        return text, [(0, len(text))]
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            spans.append(_assistant_span(tokenizer, template, messages, i, text))
    return text, spans


def _assistant_span(tokenizer, template: ChatTemplate, messages, i: int, text: str) -> tuple[int, int]:
    try:
        before = render(tokenizer, template, messages[:i], add_generation_prompt=True)
        # The last message's "through" render is the full text: skip re-rendering it.
        through = text if i + 1 == len(messages) else render(
            tokenizer, template, messages[:i + 1], add_generation_prompt=False)
    except Exception as e:
        raise ExampleError("template error", f"chat template {template.name!r} failed on the "
                                             f"first {i + 1} messages: {e}") from None
    if not (text.startswith(through) and through.startswith(before)):
        raise ExampleError("template not incremental", (
            f"chat template {template.name!r} renders messages[:{i}] differently inside the full "
            "conversation, so the reply cannot be located. Fix: use a built-in chat_template "
            "(e.g. 'chatml'), or a template that renders earlier turns independently of later ones"))
    # Whitespace after the end-of-turn token only separates turns; the model should stop at the
    # end-of-turn token, not learn to emit a newline after it.
    end = len(through.rstrip())
    return len(before), max(end, len(before))


def tokenize_with_mask(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokenize rendered texts in one batch; return (input_ids, learned) per text, where
    learned[k] says whether token k is a training target."""
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                        return_attention_mask=False, verbose=False)
    out = []
    for text, text_spans, ids, offsets in zip(texts, spans, encoded["input_ids"], encoded["offset_mapping"]):
        char_learned = np.zeros(len(text) + 1, dtype=bool)
        for start, end in text_spans:
            char_learned[start:end] = True
        ends = np.fromiter((e for _, e in offsets), dtype=np.int64, count=len(offsets))
        learned = char_learned[np.maximum(ends - 1, 0)]
        out.append((np.asarray(ids, dtype=np.int32), learned))
    return out


def tokenize_text(tokenizer, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Plain text (continued pretraining): the tokenizer's own special tokens (e.g. BOS), then EOS
    so the model learns where documents end; every token is learned."""
    encoded = tokenizer(texts, add_special_tokens=True, return_attention_mask=False, verbose=False)
    eos = tokenizer.eos_token_id
    out = []
    for ids in encoded["input_ids"]:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = list(ids) + [eos]
        ids = np.asarray(ids, dtype=np.int32)
        out.append((ids, np.ones(len(ids), dtype=bool)))
    return out


def shifted_labels(input_ids: np.ndarray, learned: np.ndarray) -> np.ndarray:
    """labels[t] = input_ids[t+1] where token t+1 is learned, else -100; last label -100."""
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int32)
    labels[:-1] = np.where(learned[1:], input_ids[1:], IGNORE_INDEX)
    return labels

"""Data pipeline: a file (or Python dataset) -> fixed-shape int32 training batches.

    from unsloth_jax.data import prepare_dataset, BatchIterator
    rows, summary = prepare_dataset("data.jsonl", tokenizer, max_seq_length=2048)
    print(summary)                                  # read / skipped / truncated / tokens / efficiency
    batches = BatchIterator(rows, batch_size=8, seed=3407)
    batch = next(batches)                           # {"input_ids", "labels", "segment_ids", "positions"}
    state = batches.state()                         # {"epoch", "index", ...}: checkpoint it
    BatchIterator(rows, 8, seed=3407).restore(state)  # yields exactly the batches that followed

prepare_dataset(source, tokenizer, *, max_seq_length, format=None, chat_template=None,
                train_on_responses_only=True, packing=True, dataset_text_field=None,
                column_mapping=None, skip_malformed=False, truncate=True, buckets=None)
    -> (TokenRows, DataSummary)

  source     path to .jsonl (streamed line by line) / .json (a list) / .parquet / .csv, each
             optionally .gz; or a datasets.Dataset, a pandas DataFrame, or a list of dicts.
  format     detected from the first example's keys unless given:
               messages           {"messages": [{"role": "system"|"user"|"assistant", "content"}]}
               sharegpt           {"conversations": [{"from": "system"|"human"|"gpt", "value"}]}
               alpaca             {"instruction", "input" (optional), "output", "system" (optional)}
               prompt_completion  {"prompt", "completion"} (strings, or lists of messages)
               text               {"text"} or dataset_text_field=<column>: continued pretraining,
                                  every token learned, EOS appended
             column_mapping={"question": "instruction", "answer": "output"} renames columns first.
  chat_template  None: the tokenizer's own `chat_template`; or a built-in name: "chatml",
             "llama-3", "gemma", "mistral", "qwen-2.5", "alpaca"; or a Jinja string. The token
             the template ends an assistant turn with is learned; `end_of_turn_token_ids`
             gives the ids to stop generation on. `get_chat_template(tokenizer, name)` attaches a
             built-in template to a tokenizer (so it is saved with it).
  train_on_responses_only  learn only assistant turns (every one of a multi-turn chat): their
             content and end-of-turn token. The spans come from rendering the conversation
             prefix by prefix, not from searching marker strings. False: learn every token.
  packing    True: examples are best-fit packed into rows of max_seq_length; segment_ids number
             them 1..n in a row (0 = padding) and positions restart at 0 in each. An example is
             never split; a longer one is truncated (truncate=True) or dropped, and counted.
             False: one example per row, padded to a length bucket (powers of two from 64 up to
             max_seq_length, or `buckets`), so the train step compiles once per bucket.
  skip_malformed  False: a malformed JSON line or example raises DataError naming file:line.
             True: it is skipped and counted in the summary.
             Examples with nothing to learn are always skipped and counted; if none is left,
             DataError says why.

Batches (BatchIterator / iterate_batches): dict of int32 numpy arrays, each [B, T]:
  input_ids    token ids (pad id on padding)
  labels       ALREADY SHIFTED targets: labels[t] = input_ids[t+1] if token t+1 is learned,
               else -100. So loss = cross_entropy(logits[:, t], labels[:, t]) with no shift.
               The last position of each segment is -100 (a truncated example instead keeps the
               next, cut-off token). Padding is -100.
  segment_ids  1..n per packed example in a row, 0 for padding: attend only within a segment
  positions    position of the token inside its segment (restarts at 0), for RoPE

BatchIterator(rows, batch_size, seed=0, shuffle=True, drop_last=False, num_epochs=None): the order
of epoch e is a function of (seed, e) only; .state() -> {"epoch", "index", "seed",
"batches_per_epoch"}, .restore(state). A short last batch is filled with padding rows so B is
static. iterate_batches(rows, batch_size, seed=0, shuffle=True, drop_last=False, num_epochs=1)
is the same with one epoch by default (evaluation: shuffle=False).

Tokenizer for tests/demo: train_bpe_tokenizer(texts, vocab_size=512, chat_template="chatml",
attach_template=True) -> transformers.PreTrainedTokenizerFast (byte-level BPE, deterministic);
demo_tokenizer(). Demo data: DEMO_TRAIN, DEMO_EVAL (OpenAI messages JSONL).
"""
from unsloth_jax.data.batching import Batch, BatchIterator, iterate_batches
from unsloth_jax.data.demo import DEMO_EVAL, DEMO_TRAIN, demo_texts
from unsloth_jax.data.formats import FORMATS, detect_format, normalize
from unsloth_jax.data.loading import iter_records
from unsloth_jax.data.masking import IGNORE_INDEX, shifted_labels
from unsloth_jax.data.packing import BATCH_KEYS, TokenRows, best_fit_packing, length_buckets
from unsloth_jax.data.pipeline import prepare_dataset
from unsloth_jax.data.summary import DataSummary
from unsloth_jax.data.templates import (BUILTIN_TEMPLATES, ChatTemplate, end_of_turn_token_ids,
                                        get_chat_template, resolve_chat_template)
from unsloth_jax.data.tokenizer import demo_tokenizer, train_bpe_tokenizer

__all__ = [
    "prepare_dataset", "BatchIterator", "iterate_batches", "Batch", "BATCH_KEYS", "TokenRows",
    "DataSummary", "IGNORE_INDEX", "FORMATS", "BUILTIN_TEMPLATES", "ChatTemplate",
    "resolve_chat_template", "get_chat_template", "end_of_turn_token_ids", "train_bpe_tokenizer",
    "demo_tokenizer", "DEMO_TRAIN", "DEMO_EVAL", "demo_texts", "detect_format", "normalize",
    "iter_records", "shifted_labels", "best_fit_packing", "length_buckets",
]

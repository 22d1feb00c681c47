"""A small byte-level BPE tokenizer trained offline, for tests and the demo (no network needed)."""
from __future__ import annotations

from typing import Iterable

from unsloth_jax.data.templates import BUILTIN_TEMPLATES, builtin_template
from unsloth_jax.errors import DataError

BASE_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: str = "chatml",
                        attach_template: bool = True, model_max_length: int = 2048):
    """Train a byte-level BPE on `texts` and wrap it as a `transformers.PreTrainedTokenizerFast`.

    The vocabulary holds '<|endoftext|>', '<|pad|>' and the special tokens of the built-in
    `chat_template` (e.g. '<|im_start|>', '<|im_end|>' for chatml). eos_token is the template's
    end-of-turn token ('<|endoftext|>' for alpaca), pad_token is '<|pad|>'. With
    `attach_template=False` the tokenizer has those tokens but no `chat_template`, like a base
    model's tokenizer. Training is deterministic: the same texts give the same tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template = builtin_template(chat_template)
    if template is None:
        raise DataError(f"unknown chat_template {chat_template!r}; use one of {sorted(BUILTIN_TEMPLATES)}")
    special = list(BASE_SPECIAL_TOKENS) + [t for t in template.special_tokens if t not in BASE_SPECIAL_TOKENS]

    bpe = Tokenizer(models.BPE())
    # No prefix space: a chunk of text tokenizes the same whether or not it starts the string.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(texts), trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=template.eos or "<|endoftext|>", pad_token="<|pad|>",
        bos_token=template.bos, model_max_length=model_max_length)
    if attach_template:
        tokenizer.chat_template = template.jinja
    return tokenizer


def demo_tokenizer(vocab_size: int = 512, chat_template: str = "chatml"):
    """A tokenizer trained on the shipped demo dataset (train + eval texts)."""
    from unsloth_jax.data.demo import demo_texts
    return train_bpe_tokenizer(demo_texts(), vocab_size=vocab_size, chat_template=chat_template)

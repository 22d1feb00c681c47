"""Data pipeline: formats, chat templates and response-only loss masks, bad input."""
import csv
import json

import numpy as np
import pytest

from unsloth_jax.data import (BUILTIN_TEMPLATES, IGNORE_INDEX, end_of_turn_token_ids, get_chat_template,
                              prepare_dataset, train_bpe_tokenizer)
from unsloth_jax.errors import DataError

CORPUS = [
    "system", "user", "assistant", "You are a terse assistant.", "What is 2 + 3?", "2 + 3 = 5.",
    "Translate 'cat' to French.", "chat", "Name a colour.", "Blue is a colour.",
    "Write a haiku about rain.", "Rain on the window\nsoft drums in the afternoon\nthe kettle answers",
    "Thanks!", "You're welcome.", "Continue the story.", "Once upon a time there was a fox.",
] * 4

SYSTEM = "You are a terse assistant."
CHAT = [  # multi-turn with a system prompt; one reply spans lines
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Write a haiku about rain."},
    {"role": "assistant", "content": "Rain on the window\nsoft drums in the afternoon\nthe kettle answers"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]

_TOKENIZERS = {}


def tokenizer_for(template="chatml", attach=True):
    """Offline-trained tokenizers, cached: training takes a fraction of a second each."""
    key = (template, attach)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = train_bpe_tokenizer(CORPUS, vocab_size=400, chat_template=template,
                                               attach_template=attach)
    return _TOKENIZERS[key]


@pytest.fixture(scope="module")
def tok():
    return tokenizer_for("chatml")


def only_row(rows):
    """input_ids and labels of the single example in unpacked rows."""
    (group,) = rows.groups.values()
    assert len(group["input_ids"]) == 1
    n = int((group["segment_ids"][0] > 0).sum())
    return group["input_ids"][0, :n], group["labels"][0, :n]


def learned_runs(tokenizer, ids, labels):
    """Decode each contiguous run of learned targets; checks labels are input_ids shifted by one."""
    learned = np.flatnonzero(labels != IGNORE_INDEX)
    assert (labels[learned] == ids[learned + 1]).all(), "labels must equal the next input token"
    runs, start = [], None
    for k, t in enumerate(learned):
        if start is None:
            start = t
        if k + 1 == len(learned) or learned[k + 1] != t + 1:
            runs.append(tokenizer.decode(labels[start:t + 1].tolist(), skip_special_tokens=False))
            start = None
    return runs


def prepare_one(example, tokenizer, **kw):
    rows, summary = prepare_dataset([example], tokenizer, max_seq_length=kw.pop("max_seq_length", 256),
                                    packing=False, **kw)
    return only_row(rows), summary


def replies(messages, end):
    return [m["content"] + end for m in messages if m["role"] == "assistant"]


# ---------------------------------------------------------------- formats x masks

def test_openai_messages_multi_turn_with_system(tok):
    (ids, labels), summary = prepare_one({"messages": CHAT}, tok)
    assert summary.format == "messages"
    assert learned_runs(tok, ids, labels) == replies(CHAT, "<|im_end|>")
    # The rendered input is the template's text, and nothing of system/user is learned.
    assert tok.decode(ids.tolist()) == tok.apply_chat_template(CHAT, tokenize=False)


def test_sharegpt(tok):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    convo = [{"from": names[m["role"]], "value": m["content"]} for m in CHAT]
    (ids, labels), summary = prepare_one({"conversations": convo}, tok)
    assert summary.format == "sharegpt"
    assert learned_runs(tok, ids, labels) == replies(CHAT, "<|im_end|>")


def test_alpaca_with_input_and_system(tok):
    example = {"instruction": "Translate 'cat' to French.", "input": "cat", "output": "chat",
               "system": SYSTEM}
    (ids, labels), summary = prepare_one(example, tok)
    assert summary.format == "alpaca"
    assert learned_runs(tok, ids, labels) == ["chat<|im_end|>"]
    text = tok.decode(ids.tolist())
    assert SYSTEM in text and "Translate 'cat' to French.\n\ncat" in text


@pytest.mark.parametrize("conversational", [False, True])
def test_prompt_completion(tok, conversational):
    if conversational:  # TRL's conversational prompt-completion: message lists on both sides
        example = {"prompt": CHAT[:4], "completion": CHAT[4:]}
        expected = replies(CHAT, "<|im_end|>")
    else:
        example = {"prompt": "Name a colour.", "completion": "Blue is a colour."}
        expected = ["Blue is a colour.<|im_end|>"]
    (ids, labels), summary = prepare_one(example, tok)
    assert summary.format == "prompt_completion"
    assert learned_runs(tok, ids, labels) == expected


def test_text_learns_every_token_and_eos(tok):
    text = "Once upon a time there was a fox."
    (ids, labels), summary = prepare_one({"text": text}, tok)
    assert summary.format == "text"
    assert tok.decode(ids.tolist()) == text + tok.eos_token
    assert (labels[:-1] == ids[1:]).all() and labels[-1] == IGNORE_INDEX


def test_dataset_text_field_and_column_mapping(tok):
    (ids, _), summary = prepare_one({"body": "Once upon a time."}, tok, dataset_text_field="body")
    assert summary.format == "text" and tok.decode(ids.tolist()).startswith("Once upon a time.")
    example = {"question": "What is 2 + 3?", "answer": "2 + 3 = 5."}
    (ids, labels), summary = prepare_one(example, tok, column_mapping={"question": "instruction",
                                                                       "answer": "output"})
    assert summary.format == "alpaca"
    assert learned_runs(tok, ids, labels) == ["2 + 3 = 5.<|im_end|>"]


def test_format_override(tok):
    # Keys of two formats: detection prefers messages, format= picks the other.
    example = {"messages": CHAT, "text": "Once upon a time there was a fox."}
    (_, labels), summary = prepare_one(example, tok, format="text")
    assert summary.format == "text" and (labels != IGNORE_INDEX).sum() > 5


def test_train_on_everything(tok):
    (ids, labels), _ = prepare_one({"messages": CHAT}, tok, train_on_responses_only=False)
    assert (labels[:-1] == ids[1:]).all()


def test_reply_containing_template_markers(tok):
    # The mask comes from rendering spans, so a reply that mentions the template's own markers
    # is learned whole, and the user turn that mentions 'assistant' is not.
    chat = [{"role": "user", "content": "How does <|im_start|>assistant work?"},
            {"role": "assistant", "content": "It opens a turn: <|im_start|>assistant\nthen text."}]
    (ids, labels), _ = prepare_one({"messages": chat}, tok)
    assert learned_runs(tok, ids, labels) == replies(chat, "<|im_end|>")


def test_offsets_trimmed_by_post_processor():
    # Some tokenizers (ByteLevel trim_offsets=True) give whitespace tokens empty offsets; the
    # mask uses end offsets, so replies with spaces and blank lines are still learned whole.
    from tokenizers import processors
    tok = train_bpe_tokenizer(CORPUS, vocab_size=400)
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    chat = [{"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "  Blue  is\n\n a colour. "}]
    (ids, labels), _ = prepare_one({"messages": chat}, tok)
    assert learned_runs(tok, ids, labels) == replies(chat, "<|im_end|>")


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_template_when_tokenizer_has_none(name):
    tok = tokenizer_for(name, attach=False)
    assert not tok.chat_template
    (ids, labels), summary = prepare_one({"messages": CHAT}, tok, chat_template=name)
    assert summary.chat_template == name
    end = BUILTIN_TEMPLATES[name].eos or tok.eos_token
    assert learned_runs(tok, ids, labels) == replies(CHAT, end)
    assert end_of_turn_token_ids(tok, name)[0] == tok.convert_tokens_to_ids(end)
    text = tok.decode(ids.tolist())
    assert SYSTEM in text and "Thanks!" in text


def test_get_chat_template_attaches_builtin():
    tok = train_bpe_tokenizer(CORPUS, vocab_size=400, chat_template="llama-3", attach_template=False)
    get_chat_template(tok, "llama3")
    assert tok.chat_template == BUILTIN_TEMPLATES["llama-3"].jinja
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_end_of_turn_ids(tok):
    assert end_of_turn_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    alpaca = tokenizer_for("alpaca", attach=False)
    assert end_of_turn_token_ids(alpaca, "alpaca") == [alpaca.eos_token_id]


def test_truncated_example_keeps_next_token_label(tok):
    long_reply = " ".join(["Rain on the window"] * 30)
    chat = [{"role": "user", "content": "Write a haiku about rain."},
            {"role": "assistant", "content": long_reply}]
    (full_ids, full_labels), _ = prepare_one({"messages": chat}, tok, max_seq_length=1024)
    (ids, labels), summary = prepare_one({"messages": chat}, tok, max_seq_length=40)
    assert summary.truncated == 1 and len(ids) == 40
    assert (ids == full_ids[:40]).all() and (labels == full_labels[:40]).all()
    assert labels[-1] == full_ids[40]  # the last kept position still predicts the cut token


# ---------------------------------------------------------------- loading

ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
          {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5."}]


def _write_jsonl(path, items):
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


def _arrays(rows):
    return {k: v.tolist() for g in rows.groups.values() for k, v in g.items()}


def test_file_types_agree(tok, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    jsonl = _write_jsonl(tmp_path / "d.jsonl", ALPACA)
    (tmp_path / "d.json").write_text(json.dumps(ALPACA))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ALPACA)
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "d.parquet")
    expected = _arrays(prepare_dataset(str(jsonl), tok, max_seq_length=128)[0])
    for source in [tmp_path / "d.json", tmp_path / "d.csv", tmp_path / "d.parquet", ALPACA]:
        rows, summary = prepare_dataset(source, tok, max_seq_length=128)
        assert summary.examples_read == 2 and _arrays(rows) == expected, source


def test_dataset_like_object(tok):
    class FakeDataset:  # what datasets.Dataset looks like to us: an iterable of dicts
        def __iter__(self):
            return iter(ALPACA)
    rows, summary = prepare_dataset(FakeDataset(), tok, max_seq_length=128)
    assert summary.examples_kept == 2 and summary.source == "FakeDataset"
    with pytest.raises(DataError, match=r"dataset\['train'\]"):
        prepare_dataset({"train": FakeDataset()}, tok, max_seq_length=128)


# ---------------------------------------------------------------- bad input

def test_malformed_jsonl_line_names_file_and_line(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": CHAT})
    path.write_text(f"{good}\n{{\"messages\": [oops\n{good}\n")
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON.*skip_malformed=True"):
        prepare_dataset(str(path), tok, max_seq_length=256)
    rows, summary = prepare_dataset(str(path), tok, max_seq_length=256, skip_malformed=True)
    assert summary.examples_read == 3 and summary.examples_kept == 2
    assert summary.skipped == {"malformed JSON": 1}
    assert f"{path}:2" in str(summary)


def test_malformed_json_file_names_line(tok, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        prepare_dataset(str(path), tok, max_seq_length=64)


def test_missing_field_names_line_and_field(tok, tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", ALPACA + [{"instruction": "Hi", "input": ""}])
    with pytest.raises(DataError, match=rf"{path}:3: field 'output' is missing"):
        prepare_dataset(str(path), tok, max_seq_length=128)
    _, summary = prepare_dataset(str(path), tok, max_seq_length=128, skip_malformed=True)
    assert summary.skipped == {"missing field": 1} and summary.examples_kept == 2


def test_bad_role_names_field(tok):
    chat = [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]
    with pytest.raises(DataError, match=r"example 0: messages\[0\]\.role is 'narrator'"):
        prepare_dataset([{"messages": chat}], tok, max_seq_length=64)


def test_unknown_keys_list_formats_and_mapping(tok, tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        prepare_dataset(str(path), tok, max_seq_length=64)
    message = str(err.value)
    assert f"{path}:1" in message and "['answer', 'question']" in message
    for needle in ["messages", "sharegpt", "alpaca", "prompt_completion", "text", "column_mapping",
                   "dataset_text_field"]:
        assert needle in message


def test_example_without_reply_is_skipped_and_counted(tok):
    data = [{"messages": CHAT}, {"messages": [{"role": "user", "content": "Thanks!"}]}]
    rows, summary = prepare_dataset(data, tok, max_seq_length=256)
    assert summary.skipped == {"no learned tokens": 1} and summary.examples_kept == 1
    assert "example 1" in str(summary)


def test_nothing_learned_anywhere_explains(tok):
    data = [{"messages": [{"role": "user", "content": "Thanks!"}]}] * 3
    with pytest.raises(DataError, match=r"(?s)no usable examples.*no assistant turns.*wrong format"):
        prepare_dataset(data, tok, max_seq_length=64)


def test_template_without_assistant_turn(tok):
    users_only = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(DataError, match="template without an assistant turn"):
        prepare_dataset([{"messages": CHAT}], tok, max_seq_length=64, chat_template=users_only)


def test_template_not_incremental(tok):
    # Renders the *last* message differently: prefix renders are not prefixes of the full render.
    odd = ("{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}"
           "<|im_end|>{% endif %}{% endfor %}")
    with pytest.raises(DataError, match="not incremental"):
        prepare_dataset([{"messages": CHAT}], tok, max_seq_length=64, chat_template=odd)


def test_no_template_and_wrong_template(tok):
    bare = tokenizer_for("chatml", attach=False)
    with pytest.raises(DataError, match="no chat_template.*chat_template="):
        prepare_dataset([{"messages": CHAT}], bare, max_seq_length=64)
    with pytest.raises(DataError, match="unknown chat_template 'vicuna'"):
        prepare_dataset([{"messages": CHAT}], bare, max_seq_length=64, chat_template="vicuna")
    # llama-3 ends turns with <|eot_id|>, which this chatml tokenizer splits into pieces.
    with pytest.raises(DataError, match="splits into"):
        prepare_dataset([{"messages": CHAT}], bare, max_seq_length=64, chat_template="llama-3")


def test_missing_file_and_unknown_format(tok, tmp_path):
    with pytest.raises(DataError, match="not found"):
        prepare_dataset(str(tmp_path / "nope.jsonl"), tok, max_seq_length=64)
    with pytest.raises(DataError, match="unknown file type"):
        prepare_dataset(str(_write_jsonl(tmp_path / "x.txt", ALPACA)), tok, max_seq_length=64)
    with pytest.raises(DataError, match="(?s)unknown format 'yaml'.*alpaca"):
        prepare_dataset(ALPACA, tok, max_seq_length=64, format="yaml")


def test_dropped_when_not_truncating(tok):
    data = [{"text": "Once upon a time there was a fox. " * 20}]
    with pytest.raises(DataError, match="truncate=True"):
        prepare_dataset(data, tok, max_seq_length=16, truncate=False)
    rows, summary = prepare_dataset(data + [{"text": "Thanks!"}], tok, max_seq_length=16, truncate=False)
    assert summary.dropped == 1 and summary.examples_kept == 1

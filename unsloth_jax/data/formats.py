"""Dataset formats: detect which one a record is in and normalize it.

Every chat format becomes a list of {"role", "content"} messages (roles system/user/assistant/
tool); the `text` format stays raw text for continued pretraining.
"""
from __future__ import annotations

from typing import Any

from unsloth_jax.errors import DataError

FORMATS = {
    "messages": '{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} (OpenAI)',
    "sharegpt": '{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}',
    "alpaca": '{"instruction": "...", "input": "..." (optional), "output": "...", "system": (optional)}',
    "prompt_completion": '{"prompt": "..." or [messages], "completion": "..." or [messages]}',
    "text": '{"text": "..."} (continued pretraining; every token learned)',
}
_FORMAT_ALIASES = {"openai": "messages", "chat": "messages", "conversations": "sharegpt",
                   "prompt-completion": "prompt_completion", "completion": "prompt_completion",
                   "raw": "text", "pretraining": "text"}

# Role spellings seen in the wild, mapped to the four roles templates understand.
_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user",
          "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
          "chatgpt": "assistant", "tool": "tool", "function": "tool", "ipython": "tool"}

Example = list[dict[str, str]] | str  # messages, or raw text for the text format


class ExampleError(Exception):
    """One record is malformed (raised or skipped by the caller, who knows its location)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def canonical_format(name: str) -> str:
    key = name.strip().lower()
    key = _FORMAT_ALIASES.get(key, key)
    if key not in FORMATS:
        raise DataError(f"unknown format {name!r}. Recognised formats:\n{_format_list()}")
    return key


def _format_list() -> str:
    return "\n".join(f"  {name:18s} {shape}" for name, shape in FORMATS.items())


def apply_column_mapping(data: dict[str, Any], column_mapping: dict[str, str] | None) -> dict[str, Any]:
    """Rename the user's columns to the names a format expects, e.g. {"question": "instruction"}."""
    if not column_mapping:
        return data
    missing = [src for src in column_mapping if src not in data]
    if missing:
        raise ExampleError("missing field", f"column_mapping names column(s) {missing} that the "
                           f"example does not have (its keys: {sorted(data)})")
    renamed = {k: v for k, v in data.items() if k not in column_mapping}
    renamed.update({dst: data[src] for src, dst in column_mapping.items()})
    return renamed


def detect_format(data: dict[str, Any], location: str, dataset_text_field: str | None = None) -> str:
    """Guess the format from a record's keys; DataError with the options if nothing fits."""
    if dataset_text_field is not None:
        return "text"
    keys = set(data)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{location}: cannot tell the data format from the keys {sorted(keys)}. Recognised "
        f"formats:\n{_format_list()}\nFix: rename columns with column_mapping, e.g. "
        "column_mapping={'<question column>': 'instruction', '<answer column>': 'output'}, "
        "or name the text column with dataset_text_field='<column>', or pass format=<name>.")


def normalize(data: dict[str, Any], fmt: str, dataset_text_field: str | None = None) -> Example:
    """Turn one record into messages (chat formats) or a string (text). Raises ExampleError."""
    if fmt == "text":
        return _text(data, dataset_text_field or "text")
    if fmt == "messages":
        return _messages(_field(data, "messages", list), "messages")
    if fmt == "sharegpt":
        return _messages(_field(data, "conversations", list), "conversations")
    if fmt == "alpaca":
        return _alpaca(data)
    if fmt == "prompt_completion":
        return _prompt_completion(data)
    raise DataError(f"unknown format {fmt!r}. Recognised formats:\n{_format_list()}")


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...]):
    if name not in data:
        raise ExampleError("missing field", f"field {name!r} is missing (keys: {sorted(data)})")
    value = data[name]
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ExampleError("bad field", f"field {name!r} should be a {want}, got {type(value).__name__}")
    return value


def _text(data: dict[str, Any], field: str) -> str:
    text = _field(data, field, str)
    if not text.strip():
        raise ExampleError("empty text", f"field {field!r} is empty")
    return text


def _content(value: Any, where: str) -> str:
    """Message content: a string, None, or OpenAI-style parts [{"type": "text", "text": ...}]."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise ExampleError("bad field", f"{where} should be a string (or a list of text parts), "
                                    f"got {type(value).__name__}")


def _messages(turns: list, field: str) -> list[dict[str, str]]:
    messages = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise ExampleError("bad field", f"{where} should be an object, got {type(turn).__name__}")
        # ShareGPT and OpenAI spellings are both accepted in either field.
        role_key = "role" if "role" in turn else "from"
        content_key = "content" if "content" in turn or "value" not in turn else "value"
        if role_key not in turn:
            raise ExampleError("missing field", f"{where} has no 'role' (or 'from') key")
        role = _ROLES.get(str(turn[role_key]).strip().lower())
        if role is None:
            raise ExampleError("bad field", f"{where}.{role_key} is {turn[role_key]!r}; expected one "
                                            f"of {sorted(set(_ROLES))}")
        messages.append({"role": role, "content": _content(turn.get(content_key), f"{where}.{content_key}")})
    if not messages:
        raise ExampleError("empty conversation", f"field {field!r} is an empty list")
    return messages


def _alpaca(data: dict[str, Any]) -> list[dict[str, str]]:
    instruction = _field(data, "instruction", str)
    extra = data.get("input") or ""
    output = _content(_field(data, "output", (str, type(None))), "output")
    prompt = f"{instruction}\n\n{extra}" if str(extra).strip() else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if data.get("system"):
        messages.insert(0, {"role": "system", "content": str(data["system"])})
    return messages


def _prompt_completion(data: dict[str, Any]) -> list[dict[str, str]]:
    prompt = _field(data, "prompt", (str, list))
    completion = _field(data, "completion", (str, list))
    # TRL's conversational variant: both sides are already message lists.
    prompt_msgs = _messages(prompt, "prompt") if isinstance(prompt, list) else [
        {"role": "user", "content": prompt}]
    completion_msgs = _messages(completion, "completion") if isinstance(completion, list) else [
        {"role": "assistant", "content": completion}]
    return prompt_msgs + completion_msgs

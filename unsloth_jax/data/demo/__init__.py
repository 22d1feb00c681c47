"""The shipped demo dataset (OpenAI messages JSONL); regenerate with make_demo.py."""
from __future__ import annotations

import json
import os

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))
DEMO_TRAIN = os.path.join(DEMO_DIR, "demo.jsonl")
DEMO_EVAL = os.path.join(DEMO_DIR, "demo_eval.jsonl")


def demo_texts() -> list[str]:
    """Every role name and message content of both demo files: a corpus to train a tokenizer on."""
    texts = ["system", "user", "assistant"]
    for path in (DEMO_TRAIN, DEMO_EVAL):
        with open(path, encoding="utf-8") as f:
            for line in f:
                texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts

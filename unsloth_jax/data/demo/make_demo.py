"""Write demo.jsonl and demo_eval.jsonl: small chat examples with patterns a tiny model can learn.

Run `python -m unsloth_jax.data.demo.make_demo` to regenerate; the output is deterministic.
Four tasks with fixed answer shapes: adding single digits, capitals of made-up countries, colours
of things, reversing short words. Some examples have a system prompt, some have two turns.
The eval file holds sums and words the training file never shows, plus the training facts asked
with phrasings kept out of training.
"""
from __future__ import annotations

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 1234
NUM_TRAIN, NUM_EVAL = 400, 60

# Invented, so a model cannot know them from pretraining: it has to learn them from this file.
CAPITALS = {
    "Zorbia": "Quillon", "Maravel": "Tesk", "Ostrune": "Pellam", "Vantor": "Brisco",
    "Kelmora": "Udrin", "Feldany": "Corvale", "Istrella": "Momba", "Drakkon": "Salvo",
    "Pumeria": "Zentil", "Garoth": "Lindale", "Wexholm": "Arrow", "Tavizia": "Nolo",
}
COLOURS = {
    "a banana": "yellow", "the sky": "blue", "grass": "green", "snow": "white",
    "coal": "black", "a tomato": "red", "an orange": "orange", "a plum": "purple",
    "a lemon": "yellow", "the sea": "blue", "a leaf": "green", "milk": "white",
    "a crow": "black", "a cherry": "red", "a carrot": "orange", "a grape": "purple",
}
WORDS = ["cat", "dog", "sun", "map", "pen", "cup", "hat", "box", "red", "top", "star", "frog",
         "milk", "lamp", "tree", "bird", "fish", "rain", "moon", "book", "door", "king", "ship",
         "wolf", "gold", "sand", "leaf", "rock", "bell", "kite"]
EVAL_WORDS = {"cup", "frog", "rain", "ship", "bell"}
SYSTEM_PROMPTS = ["You are a helpful assistant.",
                  "You are a concise assistant. Answer in one short sentence."]

# Question phrasings per task; the last one of each list is only used in the eval file.
ASK = {
    "add": ["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.", "What is {a} plus {b}?"],
    "capital": ["What is the capital of {x}?", "Which city is the capital of {x}?",
                "Name the capital of {x}."],
    "colour": ["What colour is {x}?", "What is the colour of {x}?", "Tell me the colour of {x}."],
    "reverse": ["Reverse the word {w}.", "Write {w} backwards.", "Spell {w} in reverse."],
}


def qa(task: str, rng: random.Random, held_out: bool) -> tuple[str, str]:
    """One (question, answer) pair; `held_out` picks items and phrasings kept out of training."""
    phrasings = ASK[task][-1:] if held_out and task in ("capital", "colour") else ASK[task][:-1]
    ask = rng.choice(phrasings)
    if task == "add":
        while True:
            a, b = rng.randrange(10), rng.randrange(10)
            if ((a * 7 + b * 3) % 5 == 0) == held_out:  # a fixed fifth of the sums is eval-only
                break
        return ask.format(a=a, b=b), f"{a} + {b} = {a + b}."
    if task == "capital":
        country = rng.choice(sorted(CAPITALS))
        return ask.format(x=country), f"The capital of {country} is {CAPITALS[country]}."
    if task == "colour":
        thing = rng.choice(sorted(COLOURS))
        return ask.format(x=thing), f"{thing[0].upper() + thing[1:]} is {COLOURS[thing]}."
    words = sorted(EVAL_WORDS) if held_out else [w for w in WORDS if w not in EVAL_WORDS]
    word = rng.choice(words)
    return ask.format(w=word), f"{word} reversed is {word[::-1]}."


def conversation(rng: random.Random, held_out: bool) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(2 if rng.random() < 0.25 else 1):
        question, answer = qa(rng.choice(sorted(ASK)), rng, held_out)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write(path: str, examples: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    write(os.path.join(HERE, "demo.jsonl"), [conversation(rng, False) for _ in range(NUM_TRAIN)])
    write(os.path.join(HERE, "demo_eval.jsonl"), [conversation(rng, True) for _ in range(NUM_EVAL)])


if __name__ == "__main__":
    main()

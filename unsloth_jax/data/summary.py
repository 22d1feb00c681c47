"""What happened to the data, printed before training so surprises show up before the GPU time."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MAX_SKIP_EXAMPLES = 5


@dataclass
class DataSummary:
    source: str = ""
    format: str = ""
    chat_template: str | None = None
    max_seq_length: int = 0
    packed: bool = True
    examples_read: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skip_examples: list[str] = field(default_factory=list)  # first few "location: detail"
    truncated: int = 0
    dropped: int = 0
    examples_kept: int = 0
    tokens: int = 0  # non-padding tokens in the rows
    learned_tokens: int = 0  # labels != -100
    rows: int = 0
    slots: int = 0  # rows x row length, padding included
    row_lengths: list[int] = field(default_factory=list)
    longest_example: int = 0  # before truncation

    def skip(self, reason: str, location: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.skip_examples) < MAX_SKIP_EXAMPLES:
            self.skip_examples.append(f"{location}: {detail}")

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def learned_fraction(self) -> float:
        return self.learned_tokens / self.tokens if self.tokens else 0.0

    @property
    def packing_efficiency(self) -> float:
        """Fraction of token slots holding real tokens (1.0 = no padding)."""
        return self.tokens / self.slots if self.slots else 0.0

    def to_dict(self) -> dict:
        return {"source": self.source, "format": self.format, "chat_template": self.chat_template,
                "examples_read": self.examples_read, "examples_kept": self.examples_kept,
                "skipped": dict(self.skipped), "truncated": self.truncated, "dropped": self.dropped,
                "tokens": self.tokens, "learned_tokens": self.learned_tokens,
                "learned_fraction": self.learned_fraction, "rows": self.rows,
                "row_lengths": self.row_lengths, "packing_efficiency": self.packing_efficiency}

    def __str__(self) -> str:
        template = f", template={self.chat_template}" if self.chat_template else ""
        reasons = ", ".join(f"{reason}: {n:,}" for reason, n in self.skipped.most_common())
        layout = (f"packed into rows of {self.max_seq_length}" if self.packed
                  else f"padded to lengths {self.row_lengths}")
        lines = [
            f"Data: {self.source} (format={self.format}{template})",
            f"  examples read     {self.examples_read:,}",
            f"  kept              {self.examples_kept:,}",
            f"  skipped           {self.num_skipped:,}" + (f"  ({reasons})" if reasons else ""),
            *(f"      {s}" for s in self.skip_examples),
            f"  truncated         {self.truncated:,}  (longer than max_seq_length="
            f"{self.max_seq_length}; longest example {self.longest_example:,} tokens)",
            f"  dropped           {self.dropped:,}",
            f"  tokens            {self.tokens:,}  (learned {self.learned_fraction:.1%})",
            f"  rows              {self.rows:,}  {layout}; efficiency {self.packing_efficiency:.1%}",
        ]
        return "\n".join(lines)

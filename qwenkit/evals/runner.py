"""`qwenkit eval`: run evaluation tasks on a model, resumably, and write what people read.

    results = qwenkit.evals.run("demo", ["humaneval", "gsm8k"], limit=20, out="eval-demo")

Each task's records go to OUT/{task}-{mode}.jsonl as they are made (the first line records the setup:
model, mode, dtype, quantization, qwenkit version); a rerun with the same setup skips the records it
finds, and one with another setup is refused, so nothing written is lost. OUT/results.json holds every
score, the setup, the data files' hashes and the time each task took; OUT/results.md the table, with
the published figure beside ours where the model is one the Qwen-7B release reports.

The model is a local one (`backend.LocalModel`, loaded here) or an OpenAI-compatible server
(`backend.ServerModel`, `server=URL`); HumanEval's `samples=FILE` needs neither. Under torchrun every
process makes a share of each task's records and rank 0 merges, scores and writes them (shards.py).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from ..errors import QwenkitError
from ..progress import progress
from . import shards
from .choice import CEVAL, CMMLU, MMLU, ChoiceTask
from .data import file_hash, read_jsonl
from .gsm8k import GSM8K
from .humaneval import HumanEval
from .loglikelihood import ARC_CHALLENGE, ARC_EASY, HELLASWAG, LoglikelihoodTask
from .perplexity import LongPerplexity, perplexity
from .sandbox import isolation
from .tooluse import ToolUse


class Perplexity:
    """Perplexity of held-out text (Python standard-library files, as `qwenkit quantize` reports it)."""
    name = "ppl"
    tokens, seq_len = 8192, 512

    def load(self, data_dir: Path | None) -> tuple[list[dict], list[Path]]:
        return [{"id": "stdlib-heldout"}], []

    def score(self, items: list[dict], records: dict[str, dict]) -> dict:
        return {k: v for k, v in records["stdlib-heldout"].items() if k != "id"}


TASKS = {task.name: task for task in (MMLU, CEVAL, CMMLU, GSM8K(), HumanEval(), Perplexity(), ARC_EASY,
                                      ARC_CHALLENGE, HELLASWAG, LongPerplexity(), ToolUse())}
MODES = ("base", "chat")
# The Qwen-7B release's README (2023-09-25, spec §8): Qwen-7B-Chat (v1.0), BF16 and Int4.
PUBLISHED = {"qwen-7b-chat-int4": {"mmlu": 52.6, "ceval": 52.9, "gsm8k": 38.1, "humaneval": 23.8},
             "qwen-7b-chat": {"mmlu": 53.9, "ceval": 54.2, "gsm8k": 41.1, "humaneval": 24.4}}


def published_for(model_name: str) -> dict:
    name = model_name.lower()
    return next((scores for key, scores in PUBLISHED.items() if name.endswith(key)), {})


def default_mode(source: Path, generation_config: dict) -> str:
    """chat for chat and instruct checkpoints (Qwen v1's chat_format, or the name), else base."""
    chat_format = (generation_config or {}).get("chat_format")
    if chat_format in ("chatml", "raw"):
        return "chat" if chat_format == "chatml" else "base"
    return "chat" if any(word in source.name.lower() for word in ("instruct", "chat")) else "base"


def run(model: str | Path = "demo", tasks: list[str] | tuple[str, ...] = ("mmlu",), mode: str | None = None,
        limit: int | None = None, out: str | Path | None = None, data_dir: str | Path | None = None,
        batch_size: int | None = None, samples: str | Path | None = None, dtype: str = "auto", device: str = "auto",
        quantize: str | None = "auto", max_seq_len: int = 2048, server: str | None = None, api_key: str | None = None,
        compare: str | None = None, rope_scaling: str | None = None, dynamic_ntk: bool | None = None,
        logn: bool | None = None, train_length: int | None = None, window_attention: str | None = None,
        context: int | None = None, kv_cache: str = "float", lengths: list[int] | None = None,
        techniques: list[str] | None = None, tp: int | None = None, devices: str | list | None = None,
        verbose: bool = True) -> dict:
    """Evaluate `model` on `tasks` (see TASKS); returns what results.json holds.

    `limit`: the first N questions of each subject (multiple choice) or of the task. `batch_size`: sequences
    generated together (default: up to 32, as many as 1 GiB of KV cache holds; over a server, 8 requests at a
    time) and log-likelihood questions scored together (default 8). `samples`: score
    a human-eval style file of completions (task_id, completion) for humaneval, loading no model.
    `server`: evaluate the model an OpenAI-compatible server at this URL serves instead (`api_key` for
    its auth), chat mode unless `mode` says base. `max_seq_len`: multiple-choice prompts keep their
    last max_seq_len - 1 tokens when longer (a server applies its own limit). `compare`: evaluate the
    model again loaded with this quantization (none, int8, int4, gguf) into OUT/compare-{compare}/ and
    write OUT/comparison.md, the Qwen-7B release's BF16-against-Int4 table for this model; results.json
    then holds the other run's scores under "compare". `rope_scaling`, `dynamic_ntk`, `logn`, `train_length`,
    `window_attention`, `context`, `kv_cache`: as qwenkit.load takes them (ppl-long's window technique uses the
    windows given). `lengths`, `techniques`: ppl-long's (perplexity.LongPerplexity). Under torchrun (WORLD_SIZE > 1)
    each process makes a share of every task (shards.py); rank 0 returns the results, the others {}. `tp`: split
    the model over the torchrun processes instead (qwenkit.parallel; as many as they are), which make every
    record together. `devices`: the model split by layers over them in this process (qwenkit.load's).
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise QwenkitError(f"unknown task(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(TASKS)}")
    if mode not in (None, *MODES):
        raise QwenkitError(f"mode must be base or chat, not {mode!r}")
    if limit is not None and limit < 1:
        raise QwenkitError(f"--limit must be at least 1, not {limit}")
    if batch_size is not None and batch_size < 1:
        raise QwenkitError(f"--batch-size must be at least 1, not {batch_size}")
    if devices is not None and shards.world().size > 1:
        raise QwenkitError("under torchrun each process loads the model on a device of its own: drop --devices "
                           "(a layer split runs in one process)")
    data_dir = None if data_dir is None else Path(data_dir)
    long_context = dict(rope_scaling=rope_scaling, dynamic_ntk=dynamic_ntk, logn=logn, train_length=train_length,
                        window_attention=window_attention, context=context, kv_cache=kv_cache)
    task_of = {**TASKS, "ppl-long": LongPerplexity(lengths, techniques, train_length, window_attention)}
    if compare is not None and (samples is not None or server is not None or compare == quantize):
        raise QwenkitError("--compare loads the model a second time with another quantization: it needs -m (not "
                           "--samples or --server) and a --quantize other than its own")
    scored_by_tokens = [t for t in tasks if isinstance(TASKS[t], (Perplexity, LoglikelihoodTask, LongPerplexity))]
    if server is not None and scored_by_tokens:
        raise QwenkitError(f"{', '.join(scored_by_tokens)} score every token of a text, which needs the model "
                           "itself (OpenAI-compatible servers do not all return prompt log-probabilities): drop "
                           "--server and pass -m")
    if samples is not None:
        if list(tasks) != ["humaneval"]:
            raise QwenkitError("--samples scores HumanEval completions: use it with --tasks humaneval alone")
        samples = Path(samples)
        if not samples.is_file():
            raise QwenkitError(f"--samples {samples} does not exist")
    if tp is not None and (samples is not None or server is not None):
        raise QwenkitError("--tp splits the model this command loads: not with --samples or --server")
    with shards.joined(device if samples is None and server is None else None, tp or 1) as device:
        tensor_parallel = None
        if tp is not None:
            from ..loading import resolve_device
            from ..parallel import start
            tensor_parallel, device = start(tp, resolve_device(device))
        if samples is not None:
            backend, setup = None, {"model": f"samples:{samples.name}", "samples_hash": file_hash(samples),
                                    "mode": "base"}
        elif server is not None:
            from .backend import ServerModel
            backend = ServerModel(server, batch_size, api_key)
            setup = {"model": backend.name, "server": backend.url, "mode": mode or "chat"}
        else:
            backend, setup = _load(model, dtype, device, quantize, batch_size, long_context, tensor_parallel,
                                   devices)
            setup["mode"] = mode = mode or default_mode(Path(setup["source"]), backend.model.generation_config)
        setup = shards.agreed(setup)
        out = Path(out) if out is not None else Path(f"qwenkit-eval-{Path(setup['model']).stem}")
        results = _evaluate(task_of, tasks, limit, out, data_dir, backend, setup, samples, max_seq_len, verbose)
        if compare is not None:
            del backend  # one model in memory at a time
            backend, other_setup = _load(model, dtype, device, compare, batch_size, long_context, tensor_parallel,
                                         devices)
            other_setup = shards.agreed({**other_setup, "mode": setup["mode"]})
            other = _evaluate(task_of, tasks, limit, out / f"compare-{compare}", data_dir, backend, other_setup,
                              None, max_seq_len, verbose)
            if shards.world().rank == 0:
                results["compare"] = {"setup": other["setup"], "tasks": other["tasks"]}
                (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
                table = comparison([results, other])
                (out / "comparison.md").write_text(table)
                if verbose:
                    print(table)
    return results


def _evaluate(task_of, tasks, limit, out: Path, data_dir, backend, setup, samples, max_seq_len, verbose) -> dict:
    """Every task on one backend into `out`: its records, results.json and results.md. Under torchrun the
    ranks share each task's records and rank 0 alone scores and writes (the others return {})."""
    out.mkdir(parents=True, exist_ok=True)
    versions = {"qwenkit": _version(), "torch": torch.__version__, "python": platform.python_version()}
    results = {"setup": {**setup, **versions, "sandbox": isolation() if "humaneval" in tasks else None},
               "tasks": {}, "data_files": {}}
    for name in tasks:
        task = task_of[name]
        items, files = task.load(data_dir)
        items = _limited(items, limit)
        results["data_files"].update({str(p): file_hash(p) for p in files})
        start = time.perf_counter()
        made = _records(task, items, setup, out, backend, samples, max_seq_len, verbose)
        if made is None:  # another rank than 0
            continue
        records, truncated = made
        score = task.score(items, records)
        if samples is not None:
            score["missing_samples"] = sum(records[item["id"]].get("missing", False) for item in items)
        # raw text in either mode; tools are offered through the chat template in either mode
        mode_shown = "base" if isinstance(task, LoglikelihoodTask) else "chat" if isinstance(task, ToolUse) \
            else setup["mode"]
        results["tasks"][name] = {**score, "mode": mode_shown, "seconds": round(time.perf_counter() - start, 1),
                                  "truncated_prompts": truncated, "limit": limit}
        (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    if shards.world().rank:
        return {}
    table = markdown(results, published_for(setup["model"]))
    (out / "results.md").write_text(table)
    if verbose:
        print(table)
    return results


def comparison(runs: list[dict]) -> str:
    """One row per run (its quantization), one column per task, as the Qwen-7B release's quantization table."""
    tasks = list(runs[0]["tasks"])
    lines = ["| quantization | dtype | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for r in runs:
        setup = r["setup"]
        layers = ", ".join(setup.get("quantized_layers") or []) or "none"
        scores = [f"{r['tasks'][t]['score']:.4f}" if t.startswith("ppl") else f"{r['tasks'][t]['score']:.2f}"
                  for t in tasks]
        lines.append(f"| {setup.get('quantize')} ({layers}) | {setup.get('dtype')} | " + " | ".join(scores) + " |")
    return "\n".join(lines) + "\n"


def _version() -> str:
    from .. import __version__
    return __version__


def _load(model, dtype, device, quantize, batch_size, long_context: dict, tensor_parallel=None, devices=None):
    from ..loading import load, resolve_source
    from .backend import LocalModel

    source = resolve_source(model)
    net, tokenizer = load(source, dtype=dtype, device=device, quantize=quantize, tensor_parallel=tensor_parallel,
                          devices=devices, **long_context)
    quantized = sorted({type(m).__name__ for m in net.modules() if hasattr(m, "bits")})
    setup = {"model": source.name, "source": str(source), "dtype": str(net.dtype).removeprefix("torch."),
             "device": str(net.device), "quantize": quantize, "quantized_layers": quantized}
    # Only what was asked for: earlier runs' records keep matching their setup.
    setup |= {k: v for k, v in long_context.items() if v not in (None, "float")}  # (float: the default cache)
    return LocalModel(net, tokenizer, batch_size), setup


def _limited(items: list[dict], limit: int | None) -> list[dict]:
    if limit is None or not items:
        return items
    if "subject" not in items[0]:
        return items[:limit]
    seen: dict[str, int] = {}
    kept = []
    for item in items:  # the first `limit` of each subject
        seen[item["subject"]] = seen.get(item["subject"], 0) + 1
        if seen[item["subject"]] <= limit:
            kept.append(item)
    return kept


def _records(task, items, setup, out, backend, samples, max_seq_len, verbose) -> tuple[dict[str, dict], int] | None:
    """Every item's record and how many prompts were cut, reading those earlier runs of this setup wrote and
    making the rest; under torchrun each rank makes its share, rank 0 gets them all, the others return None."""
    path = out / f"{task.name}-{setup['mode']}.jsonl"
    main = shards.world().rank == 0
    records, left = _earlier(path, setup) if main else ({}, {})
    done = records.keys() | left.keys()
    missing = set(shards.from_rank0(lambda: [item["id"] for item in items if item["id"] not in done]))
    mine = shards.my_share([item for item in items if item["id"] in missing])
    made, truncated = _make(task, mine, setup, shards.own_file(path), backend, samples, max_seq_len,
                            verbose) if mine else ({}, 0)
    everyone = shards.to_rank0((made, truncated) if shards.world().writes else ({}, 0))  # (--tp: once a model)
    if not main:
        return None
    others = {i: r for made_by, _ in everyone[1:] for i, r in made_by.items()}
    if left or others:  # all in the task's file, on disk, before the rank files holding them go
        with _opened(path, setup) as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in (*left.values(), *others.values()))
            f.flush()
            os.fsync(f.fileno())
    for rank_file in shards.rank_files(path):
        rank_file.unlink()
    return {**records, **left, **made, **others}, sum(cut for _, cut in everyone)


def _earlier(path: Path, setup: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """The records earlier runs of this setup wrote: those in the task's file, and those only in the rank files
    an interrupted sharded run left."""
    records, left = _cached(path, setup), {}
    for rank_file in shards.rank_files(path):
        left |= {i: r for i, r in _cached(rank_file, setup).items() if i not in records}
    return records, left


def _opened(path: Path, setup: dict):
    """`path` open for appending records, its first line the setup."""
    if not path.exists():
        path.write_text(json.dumps({"setup": setup}, ensure_ascii=False) + "\n")
    return open(path, "a", encoding="utf-8")


def _make(task, todo, setup, path, backend, samples, max_seq_len, verbose) -> tuple[dict[str, dict], int]:
    """The records of `todo`, each appended to `path` as it is made; and how many prompts were cut."""
    records = {}
    truncated = 0
    with _opened(path, setup) as f, progress(f"{task.name} ({setup['mode']})", len(todo), show=verbose) as advance:
        def save(item: dict, record: dict) -> None:
            records[item["id"]] = record = {"id": item["id"], **record}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            advance()

        if samples is not None:
            completions = _samples(samples)
            for item in todo:  # a task the file lacks is judged as an empty completion (failed), and marked
                record = task.judge(item, completions.get(item["id"], ""), "base")
                save(item, {**record, "missing": True} if item["id"] not in completions else record)
        elif task.name == "ppl":
            from ..quant.calibration import heldout_ids
            ids = heldout_ids(backend.tokenizer, task.tokens)
            save(todo[0], {"score": perplexity(backend.model, ids, seq_len=task.seq_len), "tokens": len(ids),
                           "lower_is_better": True})
        elif isinstance(task, LongPerplexity):
            task.run(backend.model, backend.tokenizer, todo, save)
        elif isinstance(task, LoglikelihoodTask):
            truncated = _loglikelihoods(task, todo, backend, max_seq_len, save)
        elif isinstance(task, ToolUse):
            truncated = backend.tool_calls([task.request(item) for item in todo], task.max_new_tokens,
                                           lambda i, calls, content: save(todo[i], task.judge(todo[i], calls, content)))
        elif isinstance(task, ChoiceTask) and setup["mode"] == "base":
            truncated = _choices(task, todo, backend, max_seq_len, save)
        else:
            truncated = _generations(task, todo, backend, setup["mode"], save)
    return records, truncated


def _cached(path: Path, setup: dict) -> dict[str, dict]:
    if not path.exists():
        return {}
    lines = read_jsonl(path)
    if not lines or lines[0].get("setup") != setup:
        raise QwenkitError(f"{path} holds records of another setup ({lines[0].get('setup') if lines else 'none'}; "
                           f"this run: {setup}): pass another --out, or delete the file to start it again")
    return {r["id"]: r for r in lines[1:]}


def _samples(path: Path) -> dict[str, str]:
    completions = {}
    for number, record in enumerate(read_jsonl(path), 1):
        if not isinstance(record.get("task_id"), str) or not isinstance(record.get("completion"), str):
            raise QwenkitError(f"{path}, record {number}: expected task_id and completion (human-eval's format)")
        completions.setdefault(record["task_id"], record["completion"])  # pass@1: the first sample of each task
    return completions


def _choices(task: ChoiceTask, items, backend, max_seq_len, save) -> int:
    truncated = 0
    for item in items:
        probs, cut = backend.choice_probs(task.base_prompt(item), task.choice_tokens, max_seq_len)
        truncated += cut
        prediction = "ABCD"[max(range(4), key=lambda i: probs[i])]
        save(item, {"probs": [round(p, 6) for p in probs], "prediction": prediction,
                    "correct": prediction == item["answer"]})
    return truncated


def _loglikelihoods(task: LoglikelihoodTask, items, backend, max_seq_len, save) -> int:
    """`batch_size` questions at a time (LocalModel.loglikelihood_batch: one forward for all); each batch's
    records are saved as it finishes."""
    truncated = 0
    for at in range(0, len(items), backend.batch_size):
        batch = items[at:at + backend.batch_size]
        for item, (logprobs, cut) in zip(batch, backend.loglikelihood_batch([task.request(i) for i in batch],
                                                                              max_seq_len)):
            truncated += cut
            save(item, task.judge(item, logprobs))
    return truncated


def _generations(task, items, backend, mode, save) -> int:
    decided = getattr(task, "decided", None)  # a task that can tell when the rest of a reply cannot matter
    return backend.generate([task.prompt(item, mode) for item in items], mode == "chat", task.max_new_tokens,
                            task.stop(mode), lambda i, text: save(items[i], task.judge(items[i], text, mode)),
                            done_when=decided and (lambda i, text: decided(items[i], text, mode)))


def markdown(results: dict, published: dict) -> str:
    setup = results["setup"]
    title = f"# {setup['model']} ({setup.get('mode')}, {setup.get('dtype', '-')}, quantize {setup.get('quantize')})"
    lines = [title, "",
             "| task | score | published | questions | truncated prompts | seconds |", "|---|---|---|---|---|---|"]
    for name, r in results["tasks"].items():
        shown = f"{r['score']:.4f}" if name.startswith("ppl") else f"{r['score']:.2f}"
        lines.append(f"| {name} | {shown} | {published.get(name, '')} | {r.get('questions', '')} | "
                     f"{r['truncated_prompts']} | {r['seconds']} |")
    for name, r in results["tasks"].items():
        parts = [f"{c} {v:.2f}" for c, v in r.get("categories", {}).items()]
        if "hard" in r:
            parts.append(f"Hard {r['hard']:.2f}")
        if "acc_norm" in r:
            parts.append(f"acc_norm {r['acc_norm']:.2f}")
        parts += [f"{label} {r[key]:.2f}" for key, label in (("tool_selection", "tool selection"),
                                                             ("arguments_exact", "arguments exact"),
                                                             ("false_positive_rate", "false positives")) if key in r]
        if "table" in r:  # ppl-long: perplexity per technique and length
            lengths = [str(n) for n in r["lengths"]]
            marks = [f"{n}*" if int(n) > r["train_length"] else n for n in lengths]
            lines += ["", f"{name} (perplexity; * past the trained length, {r['train_length']}):", "",
                      "| technique | " + " | ".join(marks) + " |", "|---" * (len(lengths) + 1) + "|"]
            lines += [f"| {t} | " + " | ".join(f"{row.get(n, float('nan')):.3f}" for n in lengths) + " |"
                      for t, row in r["table"].items()]
        if parts:
            lines += ["", f"{name}: " + ", ".join(parts)]
    return "\n".join(lines) + "\n"

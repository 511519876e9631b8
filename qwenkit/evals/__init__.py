"""Evaluations of a loaded model: the Qwen-7B release's suite (`run`: MMLU, C-Eval, CMMLU, GSM8K,
HumanEval, perplexity), perplexity alone and speed."""

from .perplexity import perplexity
from .runner import TASKS, run
from .speed import run_bench

__all__ = ["TASKS", "perplexity", "run", "run_bench"]

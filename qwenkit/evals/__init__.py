"""Evaluations of a loaded model: perplexity and speed (more to come: mmlu, ceval, gsm8k, humaneval, tool use)."""

from .perplexity import perplexity
from .speed import run_bench

__all__ = ["perplexity", "run_bench"]

"""Evaluations of a loaded model: perplexity (more to come: mmlu, ceval, gsm8k, humaneval, tool use)."""

from .perplexity import perplexity

__all__ = ["perplexity"]

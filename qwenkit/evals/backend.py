"""What the tasks ask of a model: next-token probabilities of a few choices, and greedy completions.

`LocalModel` runs a loaded qwenkit model. Multiple-choice prompts of one subject share their few-shot
prefix, so each is computed in one cache row that keeps what the previous prompt left there: only
the tokens after the common prefix are prefilled. Completions go through qwenkit's decode loop with
continuous batching (`batch_size` sequences at a time), each recorded as soon as it finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..generate import generate_batch
from ..model import Model
from ..prompts import history_prompt
from ..tokenizer import Tokenizer

GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0}  # the release's evaluation scripts decode greedily


class LocalModel:
    def __init__(self, model: Model, tokenizer: Tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.context_length = model.config.context_length
        self._cache = None
        self._held: list[int] = []  # the tokens whose keys and values the cache row holds

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def chat_ids(self, text: str) -> list[int]:
        """`text` as one user turn through the model's chat template (its default system prompt), as
        model.chat(tokenizer, text, history=None) builds it."""
        return history_prompt(self.tokenizer, text, (), generation_config=self.model.generation_config)

    @torch.inference_mode()
    def choice_probs(self, ids: list[int], choice_ids: Sequence[int]) -> list[float]:
        """The release's choice probabilities after `ids`: softmax over the vocabulary at the last position,
        the choices' probabilities, softmax again over those."""
        if self._cache is None or self._cache.max_len < len(ids):
            self._cache = self.model.new_cache(1, max(len(ids), min(self.context_length, 4096)))
            self._held = []
        reuse = 0
        for a, b in zip(self._held, ids[:-1]):  # at least the last token is computed anew
            if a != b:
                break
            reuse += 1
        tokens = torch.tensor([ids[reuse:]], device=self.model.device)
        logits = self.model(tokens, torch.arange(reuse, len(ids)), self._cache, last_only=True)[0, -1].float()
        self._held = list(ids)
        probs = torch.softmax(logits, dim=-1)[list(choice_ids)]
        return torch.softmax(probs, dim=-1).tolist()

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop: Sequence[str],
                 on_done: Callable[[int, str], None]) -> None:
        """Greedy completions of `prompts`, `on_done(index, text)` as each finishes. A prompt too long for the
        context keeps its newest tokens (the caller counts those)."""
        generate_batch(self.model, self.tokenizer, prompts, max_batch=self.batch_size, max_new_tokens=max_new_tokens,
                       stop=list(stop), truncate=True, on_done=lambda i, result: on_done(i, result.text), **GREEDY)

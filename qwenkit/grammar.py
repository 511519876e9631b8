"""Constrained decoding: a grammar each sampled token must keep to, on llguidance.

A `Grammar` is compiled once from a JSON schema (also "any JSON object"), a Lark or GBNF grammar or a
regular expression; each sequence that uses one gets its own `Matcher`, which the decode loop asks
for the tokens allowed next and tells each token sampled. The masks of a batch are computed together
(llguidance's threads, without the GIL) into one bitmask, and applied to the logits with a few tensor
ops: no Python loop over the vocabulary.

Why llguidance (over xgrammar and outlines-core): it installs as one 3 MB wheel with no dependencies
(xgrammar pulls triton and transformers; outlines-core builds an index per schema, seconds for large
ones), it takes any tokenizer as its tokens' bytes, so Qwen's byte-level BPE (tiktoken files, tokenizer.json
or a GGUF) works alike, a mask costs ~30 µs for the demo's 152K tokens, and it has lazy grammars that
start at a trigger (tool calls inside free text) and the JSON Schema keywords OpenAI's structured outputs use.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

import llguidance
import llguidance.torch
import numpy as np
import torch

from .tokenizer import Tokenizer

_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Whitespace between JSON tokens: none, a space, or a newline and up to 20 spaces or tabs (llama.cpp's rule).
# Unbounded whitespace lets a weak model indent forever; this still fits pretty-printed JSON.
JSON_OPTIONS = {"whitespace_pattern": r"(| |\n[ \t]{0,20})"}


def lark_json(schema: dict | bool) -> str:
    """`schema` embedded in a Lark grammar (%json), with the same whitespace rule."""
    if schema is True:
        schema = {}
    if isinstance(schema, dict):
        schema = {"x-guidance": JSON_OPTIONS, **schema}
    return "%json " + json.dumps(schema, ensure_ascii=False)


class GrammarError(ValueError):
    """A grammar or schema that cannot constrain decoding: the message says what is wrong."""


def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer` (its tokens' bytes; ~1 s to build, so built once per tokenizer).
    Every end-of-turn id ends a grammar's text."""
    if tokenizer not in _LL_TOKENIZERS:
        ends = [i for i in (tokenizer.im_end_id, tokenizer.endoftext_id, tokenizer.eos_token_id) if i is not None]
        _LL_TOKENIZERS[tokenizer] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Tokens(tokenizer)),
                                                           eos_token=sorted(set(ends)))
    return _LL_TOKENIZERS[tokenizer]


class _Tokens:
    """What llguidance.TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.im_end_id if tokenizer.im_end_id is not None else tokenizer.eos_token_id
        self.bos_token_id = None
        self.tokens = [token_bytes(tokenizer, i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_tokens.values())

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self.tokenizer.encode(text, allowed_special=set())


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """A token's bytes; b"" for an id with no token (a hole in the ids, or a padding row of a wider lm_head)."""
    try:
        return tokenizer.id_to_bytes(token_id)
    except ValueError:
        return b""


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar (llguidance's serialized form); `describe` says what it came from."""
    source: str
    describe: str

    @classmethod
    def json_schema(cls, schema: dict | str | bool, what: str = "JSON schema") -> Grammar:
        """JSON that validates against `schema` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"the {what} is not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"the {what} must be a JSON object, not {type(schema).__name__}")
        return cls._checked(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS), what)

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's response_format json_object)."""
        return cls.json_schema({"type": "object"}, "JSON object")

    @classmethod
    def lark(cls, text: str, what: str = "grammar") -> Grammar:
        """A Lark grammar (llguidance's dialect, with %json for embedded schemas), or a GBNF one (llama.cpp's)."""
        try:
            source = llguidance.grammar_from("grammar", text)
        except ValueError as e:
            raise GrammarError(f"the {what} is neither Lark nor GBNF: {e}") from None
        return cls._checked(source, what)

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        return cls._checked(llguidance.LLMatcher.grammar_from_regex(pattern), "regular expression")

    @classmethod
    def _checked(cls, source: str, what: str) -> Grammar:
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source)
        if failed:
            raise GrammarError(f"the {what} cannot constrain decoding: {messages[0]}")
        return cls(source, what)

    def matcher(self, tokenizer: Tokenizer) -> Matcher:
        ll = ll_tokenizer(tokenizer)
        return Matcher(llguidance.LLMatcher(ll, self.source, log_level=0), ll.vocab_size, self.describe)


class Matcher:
    """One sequence's place in a grammar."""

    def __init__(self, ll: llguidance.LLMatcher, vocab_size: int, describe: str):
        self.ll, self.vocab_size, self.describe = ll, vocab_size, describe
        if ll.is_error():
            raise GrammarError(f"the {describe} cannot constrain decoding: {ll.get_error()}")

    def consume(self, token: int) -> None:
        """Advance past a sampled token (one the mask allowed)."""
        if not self.ll.consume_token(token):
            raise RuntimeError(f"token {token} broke the {self.describe}: {self.ll.get_error()}")

    @property
    def finished(self) -> bool:
        """The text is complete: the grammar allows nothing more."""
        return self.ll.is_stopped()


def as_grammar(value: Grammar | dict | str | None) -> Grammar | None:
    """A Grammar from what callers pass: a Grammar, a JSON schema (dict), or Lark / GBNF text."""
    if value is None or isinstance(value, Grammar):
        return value
    if isinstance(value, dict):
        return Grammar.json_schema(value)
    if isinstance(value, str):
        return Grammar.lark(value)
    raise GrammarError(f"a grammar is a JSON schema (dict) or Lark / GBNF text, not {type(value).__name__}")


_EXECUTOR: llguidance.LLExecutor | None = None


def mask_logits(logits: torch.Tensor, matchers: list[tuple[int, Matcher]]) -> None:
    """Set to -inf, in place, the logits of tokens each (row, matcher) forbids next (the tokenizer's ids; any
    logits past them are the caller's to mask)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    vocab = matchers[0][1].vocab_size
    bitmask = llguidance.torch.allocate_token_bitmask(len(matchers), vocab)
    llguidance.torch.fill_next_token_bitmask_par(_EXECUTOR, [(m.ll, i) for i, (_, m) in enumerate(matchers)],
                                                 bitmask)
    # One bit per token, lowest first: numpy unpacks them 200x faster than torch's shifts here.
    allowed = torch.from_numpy(np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")
                               .view(np.bool_))[:, :vocab]
    rows = torch.tensor([row for row, _ in matchers])
    logits[rows, :vocab] = logits[rows, :vocab].masked_fill(~allowed.to(logits.device), float("-inf"))

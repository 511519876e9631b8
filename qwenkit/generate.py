"""The one decode loop: prefill, batched decode steps, stops, streaming deltas, logprobs.

`Decoder` runs many sequences through one model and one preallocated KV cache: each sequence is
prefilled into its own cache row, then every active row decodes together in one batched forward
per step. Finished rows leave between steps and their slot is reused. `generate`,
`stream_generate`, the chat API, the CLI, the server engine and the evaluations all drive it.

On a GPU each step is queued one step ahead: the forward that consumes a token is launched
before that token is read back to the host, so the host's work per step (reading tokens,
detokenizing, stop strings, the caller's own) runs while the GPU computes the next one. A row
that stops then has had one step computed for nothing.

A long prompt is prefilled in chunks (`prefill_chunk` tokens, 512 on a CPU, 4096 on a GPU), each writing
the cache and attending to what the earlier ones wrote, so the activations and attention scores in
flight grow with the chunk, not with the prompt. `add` runs them all; `begin` and `advance` one at a
time, so that a server decodes its other sequences between the chunks of a long prompt. The same
logits, within float rounding, except under dynamic NTK or dynamic RoPE scaling, whose base depends on
the longest position of a forward: those prefill in one forward, as their references do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields

import torch

from .errors import ContextLengthError, RequestError
from .grammar import Grammar, GrammarError, as_grammar, mask_logits
from .model import Model, ntk_alpha
from .runtime.decode import decode_step
from .sampling import SamplingParams, TokenHistory, logprobs_of, make_generator, process_logits, sample
from .speculative import Drafter, DraftStats, common_prefix, verify_draft_token
from .tokenizer import Tokenizer


@dataclass
class Delta:
    """What one sequence produced in one step."""
    text: str                       # new text, never a partial UTF-8 character
    token_id: int | None            # the token sampled this step (None on the final flush)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" when done; the engine adds "cancelled" | "error"


@dataclass
class Request:
    """One sequence to generate: prompt ids plus how to sample and when to stop."""
    prompt_ids: list[int]
    max_new_tokens: int = 256
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    stop: Sequence[str] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: Grammar | None = None  # what the output must keep to (constrained decoding)


@dataclass
class _Prefill:
    """A prompt being prefilled a chunk at a time, into the cache row after the active ones."""
    row: "_Row"
    prompt: list[int]
    at: int  # the next prompt position to write


class _Row:
    """Decoding state of one active sequence (its cache row is its index in Decoder.rows)."""

    def __init__(self, request: Request, tokenizer: Tokenizer, device):
        self.request = request
        self.generator = make_generator(request.params.seed, device)
        self.detok = tokenizer.stream_decoder(skip_special_tokens=True)
        self.pos = len(request.prompt_ids)  # one past the last sampled token's position
        self.cached_tokens = 0  # prompt tokens whose keys/values were already in the cache row
        self.output: list[int] = []
        self.pending = ""  # decoded text held back while it could still start a stop string
        self.hold = max((len(s) for s in request.stop), default=1) - 1
        self.matcher = request.grammar.matcher(tokenizer) if request.grammar is not None else None


    def written(self) -> list[int]:
        """The tokens whose keys/values sit in the cache row (all but the last sampled one)."""
        return (self.request.prompt_ids + self.output)[:self.pos - 1]


@dataclass
class _Sampled:
    """One step's draws, for the rows that were active when it was launched."""
    rows: list[_Row]
    tokens: torch.Tensor
    chosen: torch.Tensor | None = None  # the tokens' logprobs
    top_values: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None  # on a GPU: when the copies to the host are done

    def copy_to_host(self) -> None:
        """Queue the draws' copies to the host right behind the step that made them. A read of
        the GPU's tensors would be queued behind whatever step was launched since, and wait for it."""
        if not self.tokens.is_cuda:
            return
        for name in ("tokens", "chosen", "top_values", "top_ids"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to("cpu", non_blocking=True))  # into pinned memory
        self.copied = torch.cuda.Event()
        self.copied.record()

    def lists(self) -> tuple[list | None, ...]:
        """tokens, chosen, top_values, top_ids as lists (waiting for the copies)."""
        if self.copied is not None:
            self.copied.synchronize()
        return tuple(None if t is None else t.tolist() for t in (self.tokens, self.chosen, self.top_values, self.top_ids))


class Decoder:
    """Continuous batching over the rows of one KV cache.

    Active sequences occupy rows [0, len(rows)). A finished sequence's row keeps its keys and
    values, and `add` starts a new request in the free row that shares the longest prefix with
    its prompt, so a conversation's next turn prefills only what is new.

    `ahead` (default: on a GPU) queues each decode step before the previous one's tokens are read
    (see the module's docstring); on the CPU a forward runs as it is called, so nothing overlaps.
    `draft` (qwenkit.speculative: prompt lookup or a draft model) proposes tokens for a row decoding
    alone, checked in one forward (`_speculate`); `speculated` counts what the drafts did.
    """

    def __init__(self, model: Model, tokenizer: Tokenizer, max_batch: int = 1, max_len: int | None = None,
                 ahead: bool | None = None, prefill_chunk: int | None = None, draft: Drafter | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.tensor_parallel = getattr(model, "tensor_parallel", None)  # this rank's group, for a shard's model
        self.draft = draft
        self.speculated = DraftStats()
        if prefill_chunk is None:
            prefill_chunk = 4096 if model.device.type == "cuda" else 512
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be 0 (off) or a number of tokens, not {prefill_chunk}")
        dynamic = model.config.use_dynamic_ntk or model.model.rotary.dynamic
        self.prefill_chunk = 0 if dynamic else prefill_chunk
        self.ahead = model.device.type == "cuda" if ahead is None else ahead
        self.queued: _Sampled | None = None  # the step launched ahead, its tokens not yet read
        self.max_len = min(max_len or model.config.context_length, model.config.context_length)
        self.cache = model.new_cache(max_batch, self.max_len)
        self.decode_step = decode_step(model, self.cache)  # plain, or compiled / CUDA graphs (runtime/decode.py)
        self.rows: list[_Row] = []
        self.slot_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # what each free row holds
        self.history: TokenHistory | None = None  # made when a request uses penalties
        self.last_tokens = torch.zeros(max_batch, dtype=torch.long, device=model.device)
        self.pending: _Prefill | None = None  # its row is the slot after the active rows

    @property
    def free_slots(self) -> int:
        return self.cache.batch_size - len(self.rows) - (self.pending is not None)

    @torch.inference_mode()
    def add(self, request: Request) -> tuple[_Row, Delta]:
        """Prefill `request` (made by make_request for at most this decoder's max_len) into a free row
        and sample its first token."""
        self.begin(request)
        while (done := self.advance()) is None:
            pass
        return done

    @torch.inference_mode()
    def begin(self, request: Request) -> _Row:
        """Start prefilling `request` into a free row; each `advance` runs one chunk of it. Until the last,
        `step` decodes the active rows without it, and no other request can begin."""
        if self.pending is not None:
            raise RuntimeError("a prefill is in progress: advance it to its end first")
        if not self.free_slots:
            raise RuntimeError("no free cache row: wait for a sequence to finish")
        slot = len(self.rows)
        reuse = self._take_best_free_row(request.prompt_ids)
        row = _Row(request, self.tokenizer, self.model.device)
        row.cached_tokens = reuse
        self._reset_history(slot, request)
        self.pending = _Prefill(row, request.prompt_ids, reuse)
        return row

    @torch.inference_mode()
    def advance(self) -> tuple[_Row, Delta] | None:
        """Prefill the next chunk of the pending prompt. After its last, the row joins the active ones with
        its first token sampled: returns (row, delta); before, None."""
        p, slot = self.pending, len(self.rows)
        try:
            n = len(p.prompt)
            end = min(p.at + self.prefill_chunk, n) if self.prefill_chunk else n
            ids = torch.tensor([p.prompt[p.at:end]], device=self.model.device)
            logits = self.model(ids, torch.arange(p.at, end), self.cache.rows(slot, slot + 1), last_only=True)
            p.at = end
            self.slot_tokens[slot] = p.prompt[:end]  # what the row holds, should it move or be dropped
            if end < n:
                return None
            self.pending = None
            self.slot_tokens[slot] = []
            self.rows.append(p.row)
            return p.row, self._emit(self._sample(slot, slot + 1, logits[:, -1]))[0][1]
        except BaseException:
            # The other rows go on as before; this row's slot is free again, its cache half written.
            self.pending = None
            if p.row in self.rows:
                self._remove(self.rows.index(p.row))
            self.slot_tokens[len(self.rows)] = []
            raise

    def drop_pending(self) -> None:
        """Give up the pending prefill (its client went away); what it wrote stays for prefix reuse."""
        self.pending = None

    @torch.inference_mode()
    def step(self) -> list[tuple[_Row, Delta]]:
        """One batched decode step for every active row; finished rows are removed afterwards.

        Ahead, the deltas returned are those of the step queued by the previous call (rows added
        since then get theirs from the next call), and the next step is queued before they are read."""
        if not self.rows:
            return []
        drafting = self.draft is not None and len(self.rows) == 1 and self.pending is None
        if drafting and self.queued is None:
            events = self._speculate(self.rows[0])
            if events is not None:
                return events
        if not self.ahead:
            return self._emit(self._decode())
        active = {id(r) for r in self.rows}
        current = self.queued
        if current is None or not any(id(r) in active for r in current.rows):
            current = self._decode()
        # A grammar's next mask needs the token just sampled, and so does a draft: such steps are not queued ahead.
        ahead = self._continues(current) and not drafting and not any(r.matcher is not None for r in current.rows)
        self.queued = self._decode(unread=current) if ahead else None
        return self._emit(current)

    @torch.inference_mode()  # moving a row writes into tensors made under inference mode
    def cancel(self, row: _Row) -> None:
        """Drop a sequence (e.g. its client went away); its slot is free for the next add."""
        if row in self.rows:
            self._remove(self.rows.index(row))

    def clear(self) -> None:
        """Drop every sequence and forget what the free rows hold: after a failure has left them in doubt."""
        self.rows.clear()
        self.pending = None
        self.queued = None
        self.history = None
        self.slot_tokens = [[] for _ in range(self.cache.batch_size)]

    @torch.inference_mode()
    def embed(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Mean-pooled final hidden states, L2-normalized, one vector per input (the server's /v1/embeddings): a
        forward of the transformer alone, no cache, beside the rows being decoded."""
        out = []
        for ids in token_ids:
            hidden = self.model.model(torch.tensor([ids], device=self.model.device))[0].float()
            out.append(torch.nn.functional.normalize(hidden.mean(0), dim=0).tolist())
        return out

    # ------------------------------------------------------------------ internals
    def _decode(self, unread: _Sampled | None = None) -> _Sampled:
        """Launch one batched decode step for every active row and sample it on the device.

        A row's input is its newest token: at position pos - 1 once emitted, at pos while it is
        still `unread` (sampled by a step whose tokens the host has not read yet)."""
        ahead = {id(r) for r in unread.rows} if unread is not None else set()
        pos = torch.tensor([[r.pos if id(r) in ahead else r.pos - 1] for r in self.rows])  # on the host: see model.py
        n = len(self.rows)
        logits = self.decode_step(self.last_tokens[:n, None], pos, self.cache.rows(0, n))
        return self._sample(0, n, logits[:, -1])

    def _speculate(self, row: _Row) -> list[tuple[_Row, Delta]] | None:
        """Speculative decoding for a row decoding alone (qwenkit.speculative): the drafter's tokens are checked
        in one forward; those the model agrees with are kept, then one token of its own. Greedy rows give exactly
        the tokens plain steps give; sampled rows keep a draft token with its probability and otherwise draw from
        the rest (the standard acceptance rule for a deterministic draft: the same distribution). None when there
        is no draft, or the row needs what a step of one token gives (a grammar, logprobs, penalties, a ring cache)."""
        request = row.request
        if row.matcher is not None or request.logprobs or self.history is not None or self.cache.has_ring:
            return None
        room = min(self.max_len - row.pos, request.max_new_tokens - len(row.output) - 1)
        draft = self.draft.propose(request.prompt_ids + row.output, room, self.max_len) if room > 0 else []
        if not draft:
            return None
        tokens = torch.tensor([[int(self.last_tokens[0])] + draft], device=self.model.device)
        logits = self.model(tokens, torch.arange(row.pos - 1, row.pos + len(draft)), self.cache.rows(0, 1))[0]
        logits = process_logits(self._token_logits(logits), [request.params] * len(logits), None)
        events = []
        for j in range(len(draft) + 1):
            token = verify_draft_token(logits[j], draft[j] if j < len(draft) else None, request.params, row.generator)
            if self.tensor_parallel is not None:
                token = int(self._agreed(torch.tensor([token], device=self.model.device))[0])
            self.last_tokens[0] = token
            delta = self._delta(row, token)
            events.append((row, delta))
            if delta.finish_reason:
                self._remove(0)
                break
            if j == len(draft) or token != draft[j]:
                break
        stats = self.speculated
        stats.steps += 1
        stats.emitted += len(events)
        stats.proposed += len(draft)
        stats.accepted += sum(t == d.token_id for t, (_, d) in zip(draft, events))
        return events

    def _continues(self, current: _Sampled) -> bool:
        """Whether a step is worth queueing after `current`: not when every active row's token in
        it is that row's last by its length limits."""
        last = {id(r) for r in current.rows
                if len(r.output) + 1 >= r.request.max_new_tokens or r.pos + 1 >= self.max_len}
        return any(id(r) not in last for r in self.rows)

    def _take_best_free_row(self, prompt: list[int]) -> int:
        """Move the free row sharing the longest prefix with `prompt` to the next active slot;
        return how many prompt tokens it already holds (at least one token is always recomputed)."""
        slot = len(self.rows)
        best, best_len = slot, 0
        for i in range(slot, self.cache.batch_size):
            n = common_prefix(self.slot_tokens[i], prompt)
            if n > best_len:
                best, best_len = i, n
        if best != slot:
            self._swap(best, slot)
        reuse = min(best_len, len(prompt) - 1)
        if self.cache.has_ring:
            # A windowed layer's ring holds the newest positions the row wrote (a step queued ahead's too), which
            # may lie past the prefix and have overwritten the prefix's last ones.
            reuse = 0
        cfg = self.model.config
        if reuse and cfg.use_dynamic_ntk and cfg.seq_length and \
                float(self.cache.ntk_alpha[slot]) != ntk_alpha(len(prompt), cfg.seq_length):
            reuse = 0  # Qwen v1: cached keys were rotated with another NTK alpha
        self.slot_tokens[slot] = []
        return reuse

    def _swap(self, a: int, b: int) -> None:
        """Exchange two cache rows (keys, values, NTK alpha, and the record of what they hold).
        An active row's cache is written below its `pos`, by a step queued ahead too; the copies are
        queued after such a step, on the same stream, so they move what it writes."""
        n = max(len(self.slot_tokens[a]), len(self.slot_tokens[b]),
                *(r.pos for r in (self.rows[i] for i in (a, b) if i < len(self.rows))))
        for t in self.cache.tensors():
            t[[a, b], :, :n] = t[[b, a], :, :n]
        self.cache.ntk_alpha[[a, b]] = self.cache.ntk_alpha[[b, a]]
        self.slot_tokens[a], self.slot_tokens[b] = self.slot_tokens[b], self.slot_tokens[a]

    def _reset_history(self, slot: int, request: Request) -> None:
        p = request.params
        if self.history is None and (p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty):
            self.history = TokenHistory(self.cache.batch_size, self.model.config.vocab_size, self.model.device)
            for i, r in enumerate(self.rows):
                self.history.reset_row(i, r.request.prompt_ids + r.output)
        if self.history is not None:
            self.history.reset_row(slot, request.prompt_ids)

    def _sample(self, start: int, stop: int, logits: torch.Tensor) -> _Sampled:
        """Sample the next token of rows [start, stop) from their logits, on the device: nothing
        here waits for the forward to finish."""
        rows = self.rows[start:stop]
        params = [r.request.params for r in rows]
        history = None if self.history is None else self.history.rows(start, stop)
        logits = self._token_logits(logits)
        constrained = [(i, r.matcher) for i, r in enumerate(rows) if r.matcher is not None]
        if constrained:
            mask_logits(logits, constrained)
        logits = process_logits(logits, params, history)
        tokens = self._agreed(sample(logits, params, [r.generator for r in rows]))
        sampled = _Sampled(rows, tokens)
        if any(r.request.logprobs for r in rows):
            top_n = max(r.request.top_logprobs for r in rows)
            sampled.chosen, sampled.top_values, sampled.top_ids = logprobs_of(logits, tokens, top_n)
        if history is not None:
            history.add(tokens)
        self.last_tokens[start:stop] = tokens
        sampled.copy_to_host()
        return sampled

    def _token_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Float logits with the head's padding rows (not tokens) at -inf."""
        logits = logits.float()
        logits[:, self.tokenizer.vocab_size:] = float("-inf")
        return logits

    def _agreed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Under tensor parallelism (qwenkit.parallel), rank 0's draws on every rank, so that no rank can go its own
        way; else `tokens`."""
        return tokens if self.tensor_parallel is None else self.tensor_parallel.broadcast(tokens)

    def _emit(self, sampled: _Sampled) -> list[tuple[_Row, Delta]]:
        """Read a step's tokens on the host and emit each row's delta; finished rows leave.
        Rows cancelled since the step was launched are skipped."""
        tokens, chosen, top_values, top_ids = sampled.lists()
        active = {id(r) for r in self.rows}
        events, finished = [], []
        for i, row in enumerate(sampled.rows):
            if id(row) not in active:
                continue
            delta = self._delta(row, tokens[i])
            if row.request.logprobs:
                n = row.request.top_logprobs
                delta.logprob = chosen[i]
                if n:
                    delta.top_logprobs = list(zip(top_ids[i][:n], top_values[i][:n]))
            events.append((row, delta))
            if delta.finish_reason:
                finished.append(row)
        # Only once every row has advanced: a row's slot may then move, and a step queued ahead
        # writes below each row's `pos` (see _swap).
        for slot in sorted((self.rows.index(r) for r in finished), reverse=True):
            self._remove(slot)
        return events

    def _delta(self, row: _Row, token: int) -> Delta:
        req = row.request
        row.pos += 1
        if token in req.stop_token_ids:
            return Delta(self._release(row, final=True), token, finish_reason="stop")
        row.output.append(token)
        row.pending += row.detok.add(token)
        for s in req.stop:
            cut = row.pending.find(s)
            if cut >= 0:
                row.pending = row.pending[:cut]
                return Delta(self._release(row, final=True, flush=False), token, finish_reason="stop")
        if row.matcher is not None:
            row.matcher.consume(token)
            if row.matcher.finished:  # the grammar's text is complete: nothing but its end could follow
                return Delta(self._release(row, final=True), token, finish_reason="stop")
        if len(row.output) >= req.max_new_tokens or row.pos >= self.max_len:
            return Delta(self._release(row, final=True), token, finish_reason="length")
        return Delta(self._release(row, final=False), token)

    def _release(self, row: _Row, final: bool, flush: bool = True) -> str:
        """Text that can no longer be part of a stop string (all of it when the row is done)."""
        if final:
            text = row.pending + (row.detok.flush() if flush else "")
            row.pending = ""
            return text
        keep = min(row.hold, len(row.pending))
        text, row.pending = row.pending[:len(row.pending) - keep], row.pending[len(row.pending) - keep:]
        return text

    def _remove(self, slot: int) -> None:
        """Free a row. The last active row swaps into its place so active rows stay a prefix, and
        the finished row's cache stays behind in the freed slot for prefix reuse."""
        last = len(self.rows) - 1
        self.slot_tokens[slot] = self.rows[slot].written()
        if slot != last:
            self._swap(slot, last)
            self.last_tokens[slot] = self.last_tokens[last]
            if self.history is not None:
                self.history.copy_row(last, slot)
            self.rows[slot] = self.rows[last]
        self.rows.pop()
        if self.pending is not None:  # it stays in the slot after the active rows
            self._swap(last + 1, last)
            if self.history is not None:
                self.history.copy_row(last + 1, last)


# ---------------------------------------------------------------------- the public API
@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


def default_stop_ids(model: Model, tokenizer: Tokenizer) -> frozenset[int]:
    """The model's eos ids, plus every ChatML control token: a Qwen v1 chat model must stop at them."""
    eos = model.generation_config.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos])
    ids |= {tokenizer.eos_token_id, tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.endoftext_id}
    return frozenset(i for i in ids if i is not None)


SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))


def sampling_defaults(model: Model) -> dict:
    """Sampling settings from the checkpoint's generation_config (do_sample false means greedy)."""
    gc = model.generation_config
    out = {k: gc[k] for k in SAMPLING_FIELDS if gc.get(k) is not None}
    if gc.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def make_request(model: Model, tokenizer: Tokenizer, prompt: str | Sequence[int], *,
                 max_new_tokens: int | None = None, stop: str | Sequence[str] | None = None,
                 stop_token_ids: Sequence[int] | None = None, logprobs: bool = False, top_logprobs: int = 0,
                 truncate: bool = False, context_length: int | None = None, max_new_tokens_must_fit: bool = False,
                 grammar: Grammar | dict | str | None = None, **sampling) -> Request:
    """Build and check a Request: defaults from generation_config, then the caller's settings. The one
    place the rules live; the decode loop, the engine and the server take what it returns as it is.
    Every rule raises a RequestError (ContextLengthError for the context's) naming its field.

    The prompt must leave room for one new token in the context (`context_length`, default the
    model's); `truncate` keeps its newest tokens instead. `max_new_tokens` is cut to the room left,
    unless `max_new_tokens_must_fit` (the server's max_tokens, as OpenAI has it), which refuses it.
    `grammar` constrains the output (qwenkit.grammar): a Grammar, a JSON schema (dict), or Lark / GBNF text.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    vocab = model.config.vocab_size
    if not ids:
        raise RequestError("the prompt is empty: give at least one token", "prompt")
    check_token_ids(ids, vocab, "prompt")
    check_token_ids(stop_token_ids or (), vocab, "stop_token_ids")
    gc = model.generation_config
    max_new = max_new_tokens if max_new_tokens is not None else gc.get("max_new_tokens", 512)
    if max_new < 1:
        raise RequestError(f"max_new_tokens={max_new} must be at least 1", "max_new_tokens")
    limit = context_length or model.config.context_length
    if len(ids) + 1 > limit:
        if not truncate:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens but the context holds {limit} (the prompt plus at least "
                "one new token): shorten the prompt", "prompt")
        ids = ids[-max(1, limit - max_new):]
    room = limit - len(ids)
    if max_new > room and max_new_tokens_must_fit:
        raise ContextLengthError(
            f"{max_new} new tokens were asked for but the context holds {limit} tokens and the prompt uses "
            f"{len(ids)}, so at most {room} can be generated: ask for fewer or shorten the prompt", "max_new_tokens")
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown generation option(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(SAMPLING_FIELDS)}")
    params = SamplingParams(**{**sampling_defaults(model), **sampling}).validate(vocab)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    stop_ids = default_stop_ids(model, tokenizer) | frozenset(stop_token_ids or ())
    try:
        grammar = as_grammar(grammar)
    except GrammarError as e:
        raise RequestError(str(e), "grammar") from None
    return Request(ids, min(max_new, room), params, stop_ids, [s for s in stops if s], logprobs, top_logprobs,
                   grammar)


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is not in the vocabulary [0, {vocab_size})", param)


def stream_generate(model: Model, tokenizer: Tokenizer, prompt: str | Sequence[int], draft: Drafter | None = None,
                    **kwargs) -> Iterator[Delta]:
    """Yield text deltas (with token ids, logprobs and, last, the finish reason) as they are decoded;
    `draft` (qwenkit.speculative's PromptLookup or DraftModel) drafts tokens for speculative decoding."""
    request = make_request(model, tokenizer, prompt, **kwargs)
    decoder = Decoder(model, tokenizer, 1, len(request.prompt_ids) + request.max_new_tokens, draft=draft)
    _, delta = decoder.add(request)
    yield delta
    while decoder.rows:
        for _, delta in decoder.step():
            yield delta


def generate(model: Model, tokenizer: Tokenizer, prompt: str | Sequence[int], **kwargs) -> GenerationResult:
    """Generate a completion of `prompt` (text or token ids); see `make_request` for the options."""
    return generate_batch(model, tokenizer, [prompt], **kwargs)[0]


def generate_batch(model: Model, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]],
                   max_batch: int = 8, on_done: Callable[[int, GenerationResult], None] | None = None,
                   draft: Drafter | None = None, done_when: Callable[[int, str], bool] | None = None,
                   **kwargs) -> list[GenerationResult]:
    """Generate for many prompts of different lengths, decoding up to `max_batch` of them together;
    `on_done(index, result)` is called as each one finishes (e.g. to save it at once). A prompt's
    generation also stops (finish_reason "stop") once `done_when(index, its text so far)` holds."""
    requests = [make_request(model, tokenizer, p, **kwargs) for p in prompts]
    results: list[GenerationResult | None] = [None] * len(requests)
    parts: dict[int, list[Delta]] = {}
    texts: dict[int, str] = {}
    max_len = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
    decoder = Decoder(model, tokenizer, min(max_batch, len(requests)), max_len, draft=draft)
    index_of: dict[int, int] = {}
    waiting = list(enumerate(requests))

    def record(row, delta):
        i = index_of[id(row)]
        parts.setdefault(i, []).append(delta)
        if done_when is not None and not delta.finish_reason:
            texts[i] = texts.get(i, "") + delta.text
            if done_when(i, texts[i]):
                decoder.cancel(row)
                delta.finish_reason = "stop"
        if delta.finish_reason:
            texts.pop(i, None)
            results[i] = _collect(requests[i], parts.pop(i))
            if on_done is not None:
                on_done(i, results[i])

    while waiting or decoder.rows:
        while waiting and decoder.free_slots:
            i, request = waiting.pop(0)
            row, delta = decoder.add(request)
            index_of[id(row)] = i
            record(row, delta)
        for row, delta in decoder.step():
            record(row, delta)
    return results


def _collect(request: Request, deltas: list[Delta]) -> GenerationResult:
    tokens = [d.token_id for d in deltas if d.token_id is not None and d.token_id not in request.stop_token_ids]
    return GenerationResult(
        text="".join(d.text for d in deltas), token_ids=tokens, finish_reason=deltas[-1].finish_reason,
        prompt_tokens=len(request.prompt_ids),
        logprobs=[d.logprob for d in deltas] if request.logprobs else None,
        top_logprobs=[d.top_logprobs for d in deltas] if request.top_logprobs else None)

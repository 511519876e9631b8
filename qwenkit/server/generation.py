"""Between the OpenAI protocol and the engine: requests in, choices and chunks out.

A request becomes n engine `Request`s (one per choice, per prompt). Each runs as a `Choice`:
its engine stream, the tool-call parser its text goes through, and what it has produced so far.
The rest of this module formats choices as OpenAI responses, SSE chunks, logprobs and usage.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence

from starlette.requests import Request as HTTPRequest

from ..engine import Engine, EngineFailedError, QueueFullError, Stream
from ..errors import ContextLengthError, RequestError
from ..generate import Delta, Request, make_request
from ..generate import check_token_ids as check_in_vocabulary
from ..grammar import Grammar, token_bytes
from ..tokenizer import Tokenizer
from ..tools import ContentDelta, Event, ToolCallArgs, ToolCallStart, ToolParser
from .protocol import APIError, GenerationRequest

# ----------------------------------------------------------------------------- requests in

def api_error(e: RequestError, prompt_param: str = "prompt") -> APIError:
    """A broken request rule as the client gets it, its field named as the body names it."""
    param = {"prompt": prompt_param, "max_new_tokens": "max_tokens"}.get(e.param, e.param)
    return APIError(400, str(e), param=param,
                    code="context_length_exceeded" if isinstance(e, ContextLengthError) else None)


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    try:
        check_in_vocabulary(ids, vocab_size, param)
    except RequestError as e:
        raise api_error(e) from None


def engine_requests(engine: Engine, body: GenerationRequest, prompt_ids: list[int], max_tokens: int | None,
                    default_max_tokens: int | None, *, prompt_param: str, stop: list[str],
                    logprobs: bool = False, top_logprobs: int = 0, grammar: Grammar | None = None) -> list[Request]:
    """The body's n engine requests for one prompt, each built and checked by make_request.

    max_tokens None means `default_max_tokens` (None: the rest of the context), cut to what fits;
    a max_tokens the client chose must fit whole, as OpenAI has it.
    """
    if max_tokens is None:
        max_tokens, must_fit = default_max_tokens or engine.context_length, False
    else:
        must_fit = True
    sampling = body.sampling()
    requests = []
    for i in range(body.n):
        if body.seed is not None:  # each choice its own reproducible draw
            sampling["seed"] = body.seed + i
        try:
            requests.append(make_request(
                engine.model, engine.tokenizer, prompt_ids, max_new_tokens=max_tokens,
                max_new_tokens_must_fit=must_fit, stop=stop, stop_token_ids=body.stop_token_ids, logprobs=logprobs,
                top_logprobs=top_logprobs, context_length=engine.context_length, grammar=grammar, **sampling))
        except RequestError as e:
            raise api_error(e, prompt_param) from None
    return requests


def submit(engine: Engine, requests: list[Request]) -> list[Stream]:
    """Queue every request, or none: a refusal cancels the ones already queued."""
    if len(requests) > engine.max_queue:  # could never be queued at once: not worth a retry
        raise APIError(400, f"this request asks for {len(requests)} generations (prompts x n) but the server "
                            f"queues at most {engine.max_queue}: ask for fewer", param="n")
    streams: list[Stream] = []
    try:
        for request in requests:
            streams.append(engine.submit(request))
    except QueueFullError as e:
        for stream in streams:
            stream.cancel()
        raise APIError(503, f"the server is busy: {e}", code="queue_full",
                       headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))}) from None
    except EngineFailedError as e:
        for stream in streams:
            stream.cancel()
        raise APIError(503, str(e), code="engine_failed") from None
    return streams


# ----------------------------------------------------------------------------- choices

class Choice:
    """One choice while it is generated: text through the tool-call parser, logprobs, tokens."""

    def __init__(self, index: int, stream: Stream, parser: ToolParser, prefix: str | None = None,
                 single_call: bool = False):
        self.index, self.stream, self.parser = index, stream, parser
        self.single_call = single_call  # parallel_tool_calls false (or legacy function_call): one call at most
        # A forced prefix is part of the reply the parser must see, though it is in the prompt.
        self.pending: list[Event] = parser.feed(prefix) if prefix else []
        self.content: list[str] = []
        self.tool_calls = []
        self.logprobs: list[Delta] = []  # the deltas whose tokens are reported
        self.tokens = 0
        self.finish_reason: str | None = None

    def add(self, delta: Delta) -> list[Event]:
        """Take the next delta; return the events to send (content, tool-call pieces)."""
        if delta.finish_reason == "error":
            raise APIError(500, f"generation failed: {self.stream.error}")
        events, self.pending = self.pending + self.parser.feed(delta.text), []
        if delta.token_id is not None:
            self.tokens += 1
        if self.scored(delta):
            self.logprobs.append(delta)
        if delta.finish_reason:
            more, self.tool_calls = self.parser.finish()
            events += more
            if self.single_call:
                self.tool_calls = self.tool_calls[:1]
            called = self.tool_calls and delta.finish_reason == "stop"
            self.finish_reason = "tool_calls" if called else delta.finish_reason
        if self.single_call:
            events = [e for e in events if isinstance(e, ContentDelta) or e.index == 0]
        self.content += [e.text for e in events if isinstance(e, ContentDelta)]
        return events

    def scored(self, delta: Delta) -> bool:
        """Whether the delta's token gets a logprobs entry: the stop token that ended the reply does not."""
        return delta.logprob is not None and delta.token_id not in self.stream.request.stop_token_ids

    @property
    def text(self) -> str:
        return "".join(self.content)


async def deltas(request: HTTPRequest, choices: list[Choice]) -> AsyncIterator[tuple[Choice, Delta]]:
    """Every choice's deltas as they come, until all have finished or the client has gone.

    However the iteration ends (finished, client gone, the consumer stopped), the engine is told
    to drop the sequences still running, so their batch slots free within one step. Use it under
    `contextlib.aclosing` so that happens at once.
    """
    queue: asyncio.Queue[tuple[Choice, Delta] | None] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        async for delta in choice.stream:
            queue.put_nowait((choice, delta))

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(c)) for c in choices] + [asyncio.create_task(watch())]
    running = len(choices)
    try:
        while running:
            item = await queue.get()
            if item is None:
                return
            yield item
            running -= bool(item[1].finish_reason)
    finally:
        for task in tasks:
            task.cancel()
        for choice in choices:
            choice.stream.cancel()


# ----------------------------------------------------------------------------- responses out

def usage(choices: list[Choice], n: int) -> dict:
    """Token counts: each prompt once (its first choice's stream), every choice's completion."""
    firsts = choices[::n]
    prompt = sum(c.stream.prompt_tokens for c in firsts)
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.stream.cached_tokens for c in firsts)}}


def _reported(logprob: float) -> float:
    """A logprob as JSON can carry it: OpenAI's -9999.0 for a token with no chance (-inf), or NaN."""
    return logprob if math.isfinite(logprob) else -9999.0


def chat_logprob(tok: Tokenizer, delta: Delta) -> dict:
    """One token in OpenAI's chat shape: token, logprob, bytes and its top alternatives."""
    def entry(token_id: int, logprob: float) -> dict:
        raw = token_bytes(tok, token_id)
        return {"token": raw.decode("utf-8", "replace"), "logprob": _reported(logprob), "bytes": list(raw)}
    return {**entry(delta.token_id, delta.logprob),
            "top_logprobs": [entry(i, lp) for i, lp in delta.top_logprobs or []]}


def completion_logprobs(tok: Tokenizer, scored: list[Delta], offset: int = 0) -> tuple[dict, int]:
    """Tokens in the text-completion shape; `offset` is where the first one starts in the text.
    Returns the logprobs object and the offset after the last token."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for delta in scored:
        text = token_bytes(tok, delta.token_id).decode("utf-8", "replace")
        out["tokens"].append(text)
        out["token_logprobs"].append(_reported(delta.logprob))
        out["top_logprobs"].append({token_bytes(tok, i).decode("utf-8", "replace"): _reported(lp)
                                    for i, lp in delta.top_logprobs or []})
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset


def finish_reason(choice: Choice, legacy: bool) -> str:
    return "function_call" if legacy and choice.finish_reason == "tool_calls" else choice.finish_reason


def chat_message(choice: Choice, legacy: bool) -> dict:
    """The assistant message of a finished choice: content, and its tool calls if any."""
    message = {"role": "assistant", "content": choice.text or (None if choice.tool_calls else "")}
    calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in choice.tool_calls]
    if calls and legacy:
        message["function_call"] = calls[0]["function"]
    elif calls:
        message["tool_calls"] = calls
    return message


def chat_event_delta(event: Event, legacy: bool) -> dict:
    """One parser event as a chat chunk's `delta`: a tool call opens with its id and name (arguments
    empty), then its arguments follow in pieces, as OpenAI streams them."""
    if isinstance(event, ContentDelta):
        return {"content": event.text}
    if isinstance(event, ToolCallStart):
        function = {"name": event.name, "arguments": ""}
        call = {"index": event.index, "id": event.id, "type": "function", "function": function}
    else:
        assert isinstance(event, ToolCallArgs)
        function = {"arguments": event.text}
        call = {"index": event.index, "function": function}
    return {"function_call": function} if legacy else {"tool_calls": [call]}

"""The OpenAI-compatible HTTP server: FastAPI routes in front of the engine.

Each route validates its request (protocol.py), turns it into engine requests and turns the
engine's deltas back into OpenAI responses or SSE chunks (generation.py). Batching, prefix reuse
and cancellation are the engine's business.

The server listens at once and loads the model in a background thread: /health answers 503 until
the engine runs, and the API answers 503 with Retry-After meanwhile. /health answers 503 again if the
engine stops for good (engine.py), and `serve` then exits non-zero.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from jinja2.exceptions import TemplateError
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from .. import __version__, tools
from ..engine import Engine, EngineFailedError
from ..errors import QwenkitError
from ..grammar import Grammar, GrammarError
from ..tokenizer import Tokenizer
from .gate import PROTECTED, Gate, error_response, http_protocol
from .generation import (
    Choice,
    chat_event_delta,
    chat_logprob,
    chat_message,
    check_token_ids,
    completion_logprobs,
    deltas,
    engine_requests,
    finish_reason,
    submit,
    usage,
)
from .protocol import (
    BODIES,
    MAX_JSON_DEPTH,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    error_body,
    parse,
)

if TYPE_CHECKING:  # the server holds a model only through the engine
    from ..model import Model
    from ..speculative import Drafter

log = logging.getLogger("uvicorn.error")  # uvicorn configures this one, so our lines show beside its own

DEFAULT_CONTEXT = 8192  # served when --ctx is not given and the model allows more: the KV cache stays modest
WEB_DIR = Path(__file__).parent / "web"
NO_WEB_PAGE = """<!doctype html><meta charset="utf-8"><title>qwenkit</title>
<p>qwenkit serves the OpenAI API under <code>/v1</code>.
The web chat page is not installed with this copy of qwenkit.</p>"""


@dataclass
class Settings:
    served_model_name: str = "qwenkit"
    model_aliases: tuple[str, ...] = ()  # other names a request's `model` may use (the -m argument)
    api_key: str | None = None  # Bearer token required on the API
    api_auth: str | None = None  # "user:pass" for HTTP Basic, as the Qwen-7B scripts' --api-auth
    max_batch: int = 8
    max_queue: int = 64
    context_length: int | None = None  # None: min(the model's context, DEFAULT_CONTEXT)
    prefill_chunk: int | None = None  # None: the decoder's default (generate.Decoder); 0: one forward a prompt
    # Speculative decoding for a sequence decoding alone: makes the drafter (qwenkit.speculative) for the model's
    # tokenizer once the model is loaded, e.g. lambda tokenizer: PromptLookup(8).
    draft: Callable[[Tokenizer], Drafter | None] | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 8 << 20
    max_header_bytes: int = 16 << 10
    request_timeout: float = 30.0  # seconds a client has to send a request's head, and then its body


def served_name(model_argument: str | None) -> str:
    """The default served model name: the -m argument's last path part, without .gguf."""
    if not model_argument:
        return "qwenkit"
    name = model_argument.rstrip("/").replace(":", "/").rsplit("/", 1)[-1]
    return name.removesuffix(".gguf") or "qwenkit"


class Service:
    """The server's state: settings, the engine once the model is loaded, and response counts."""

    def __init__(self, settings: Settings, load: Callable[[], tuple[Model, Tokenizer]],
                 on_failure: Callable[[str], None] | None = None):
        self.settings, self._load, self._on_failure = settings, load, on_failure
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.started = int(time.time())
        self.responses: Counter[int] = Counter()  # HTTP status -> count, for /metrics
        self._closed = False

    def start_loading(self) -> None:
        threading.Thread(target=self._load_engine, name="qwenkit-load", daemon=True).start()

    def _load_engine(self) -> None:
        try:
            model, tokenizer = self._load()
            limit = model.config.context_length
            context = self.settings.context_length or min(limit, DEFAULT_CONTEXT)
            if context > limit:
                raise ValueError(f"--ctx {context} is more than the model's context of {limit} tokens")
            engine = Engine(model, tokenizer, self.settings.max_batch, self.settings.max_queue, context,
                            on_failure=self._engine_failed, prefill_chunk=self.settings.prefill_chunk,
                            draft=self.settings.draft(tokenizer) if self.settings.draft else None)
            if getattr(model, "tensor_parallel", None) is not None:  # serve --tp: the other ranks make its calls too
                from ..parallel import LeadingDecoder
                engine.decoder = LeadingDecoder(engine.decoder, model.tensor_parallel)
            engine.start()
        except Exception as e:  # reported by /health, and `qwenkit serve` exits with it
            self.load_error = f"{type(e).__name__}: {e}"
            # A traceback only for the unexpected: a wrong path or flag is the user's to fix.
            log.error("loading the model failed: %s", self.load_error,
                      exc_info=not isinstance(e, (QwenkitError, ValueError)))
            if self._on_failure:
                self._on_failure(f"the model failed to load: {self.load_error}")
            return
        self.engine = engine
        if self._closed:  # the server stopped while the model loaded
            engine.shutdown()
        log.info("model ready: serving %r with a context of %d tokens, up to %d sequences per batch",
                 self.settings.served_model_name, engine.context_length, engine.max_batch)

    def _engine_failed(self, reason: str) -> None:
        if self._on_failure:  # `qwenkit serve` exits, so that whatever runs it can start it again
            self._on_failure(f"the engine stopped: {reason}")

    def close(self) -> None:
        self._closed = True
        if self.engine is not None:
            self.engine.shutdown()

    def ready_engine(self) -> Engine:
        if self.engine is not None:
            if self.engine.failure:
                raise APIError(503, f"the engine has stopped ({self.engine.failure}); the server must be restarted",
                               code="engine_failed")
            return self.engine
        if self.load_error:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        raise APIError(503, "the model is still loading; retry shortly", code="model_loading",
                       headers={"Retry-After": "5"})

    def check_model(self, name: str | None) -> None:
        known = (self.settings.served_model_name, *self.settings.model_aliases)
        if name and name not in known:
            raise APIError(404, f"the model {name!r} does not exist: this server serves "
                                f"{self.settings.served_model_name!r}", param="model", code="model_not_found")


# ----------------------------------------------------------------------------- the app

def create_app(load: Callable[[], tuple[Model, Tokenizer]], settings: Settings | None = None,
               on_failure: Callable[[str], None] | None = None) -> FastAPI:
    """The server app; `load()` returns (model, tokenizer) and runs in a background thread.
    `on_failure(message)` is called if the model fails to load or the engine stops for good."""
    service = Service(settings or Settings(), load, on_failure)

    @asynccontextmanager
    async def lifespan(app):
        service.start_loading()
        yield
        service.close()

    # No /docs: its page loads scripts from a CDN. /openapi.json is made from protocol.py's models.
    app = FastAPI(title="qwenkit", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.openapi = lambda: _openapi(app)
    app.add_exception_handler(APIError, lambda request, e: error_response(e))
    app.add_exception_handler(EngineFailedError, lambda request, e: error_response(
        APIError(503, str(e), code="engine_failed")))
    app.add_exception_handler(HTTPException, lambda request, e: JSONResponse(
        error_body(e.status_code, str(e.detail)), e.status_code, headers=e.headers))
    app.add_middleware(Gate, service=service)  # it also answers what no route caught with a 500
    if settings and settings.cors_origins:  # added last, so outermost: preflights never meet the Gate
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)

    for method, path, endpoint in ROUTES:
        app.add_api_route(path, endpoint, methods=[method], summary=endpoint.__doc__)
        answered = {method}
        if method == "GET":  # HEAD answers as GET does, without the body (uvicorn drops it)
            app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)
            answered.add("HEAD")
        # Without this, the web page mounted at "/" would answer a wrong method on an API path with 404.
        others = sorted({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"} - answered)
        app.add_api_route(path, _wrong_method(method), methods=others, include_in_schema=False)
    if (WEB_DIR / "index.html").is_file():  # mounted last: the API routes above take precedence
        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    else:
        app.add_api_route("/", lambda: HTMLResponse(NO_WEB_PAGE), methods=["GET"], include_in_schema=False)
    return app


def _openapi(app: FastAPI) -> dict:
    """The OpenAPI schema, request bodies included: the routes read their bodies themselves, so
    FastAPI cannot see them; they are protocol.py's models, the ones that validate."""
    if app.openapi_schema is None:
        schema = get_openapi(title="qwenkit", version=__version__, routes=app.routes,
                             description="The OpenAI-compatible API of `qwenkit serve`.")
        _, defs = models_json_schema([(m, "validation") for m in BODIES.values()],
                                     ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(defs["$defs"])
        components["schemas"]["Error"] = ERROR_SCHEMA
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                if path in BODIES and method == "post":
                    operation["requestBody"] = {"required": True, "content": {"application/json": {
                        "schema": {"$ref": f"#/components/schemas/{BODIES[path].__name__}"}}}}
                if path.startswith(PROTECTED):
                    operation["security"] = [{"bearer": []}]
                operation["responses"]["default"] = {"description": "an error", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        app.openapi_schema = schema
    return app.openapi_schema


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _wrong_method(allowed: str):
    async def refuse(request: HTTPRequest):
        raise APIError(405, f"{request.method} is not allowed on {request.url.path}: use {allowed}",
                       code="method_not_allowed", headers={"Allow": allowed})
    return refuse


def _service(request: HTTPRequest) -> Service:
    return request.app.state.service


async def _read(request: HTTPRequest, model):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except RecursionError:  # deeper than Python's parser goes, so far deeper than allowed
        raise APIError(400, f"the request nests deeper than {MAX_JSON_DEPTH} levels: flatten it, e.g. a tool's "
                            "parameters schema") from None
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    return parse(model, data)


async def _open(request: HTTPRequest, model) -> tuple[Service, Engine, object]:
    """The checks every model route starts with: loaded, valid body, the served model named."""
    service = _service(request)
    engine = service.ready_engine()
    body = await _read(request, model)
    service.check_model(body.model)
    return service, engine, body


def _sse(payloads: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: one `data:` line per payload, then `data: [DONE]`. An error after the
    stream started can no longer change the status, so it is sent as an event of its own."""
    async def encode():
        try:
            async for payload in payloads:
                yield f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(encode(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _collect(request: HTTPRequest, choices: list[Choice]) -> bool:
    """Run every choice to its end; False if the client left first."""
    async with aclosing(deltas(request, choices)) as items:
        async for choice, delta in items:
            choice.add(delta)
    return all(c.finish_reason for c in choices)


def _client_gone() -> Response:
    return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"


# ----------------------------------------------------------------------------- routes

async def health(request: HTTPRequest):
    """Whether the server can generate: 200 when the engine runs, 503 while loading or once stopped."""
    service = _service(request)
    engine = service.engine
    if engine is not None:
        if engine.alive:
            return {"status": "ok"}
        reason = engine.failure or "its thread is not running"
        return JSONResponse({"status": "error", "message": f"the engine has stopped: {reason}"}, 503)
    if service.load_error:
        return JSONResponse({"status": "error", "message": service.load_error}, 503)
    return JSONResponse({"status": "loading"}, 503)


async def metrics(request: HTTPRequest):
    """Prometheus metrics of the engine and of HTTP responses."""
    service = _service(request)
    lines = ["# HELP qwenkit_http_responses_total HTTP responses by status code.",
             "# TYPE qwenkit_http_responses_total counter"]
    lines += [f'qwenkit_http_responses_total{{code="{code}"}} {n}' for code, n in sorted(service.responses.items())]
    engine_text = service.engine.metrics.render() if service.engine else ""
    return PlainTextResponse(engine_text + "\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def _model_card(service: Service) -> dict:
    return {"id": service.settings.served_model_name, "object": "model", "created": service.started,
            "owned_by": "qwenkit"}


async def list_models(request: HTTPRequest):
    """The served model."""
    return {"object": "list", "data": [_model_card(_service(request))]}


async def get_model(request: HTTPRequest):
    """One model by name."""
    service = _service(request)
    service.check_model(request.path_params["model"])
    return _model_card(service)


def _chat_prompt(tok: Tokenizer, messages: list, tool_dicts: list[dict] | None,
                 tool_choice) -> tuple[list[int], str | None]:
    """Prompt ids for a chat (the tool prompt included), ending with the forced prefix if any."""
    try:
        ids = tools.build_prompt(tok, [m.to_dict() for m in messages], tool_dicts, tool_choice)
    except (ValueError, TemplateError) as e:
        raise APIError(400, f"cannot build the prompt from these messages: {e}", param="messages") from None
    prefix = tools.forced_prefix(tok, tool_choice)
    return ids + (tok.encode(prefix) if prefix else []), prefix


def _reply_grammar(tok: Tokenizer, body: GenerationRequest, tool_dicts: list[dict] | None = None,
                   tool_choice=None) -> Grammar | None:
    """The grammar of the reply (response_format, tool calls), its errors a 400 naming the field."""
    answer = body.response_format.answer_schema if body.response_format else None
    try:
        if answer is not None:
            Grammar.json_schema(answer, "response_format schema")
    except GrammarError as e:
        raise APIError(400, str(e), param="response_format") from None
    try:
        return tools.reply_grammar(tok, tool_dicts, tool_choice, answer)
    except GrammarError as e:
        raise APIError(400, str(e), param="tools") from None


async def chat_completions(request: HTTPRequest):
    """OpenAI chat completions: tools, response_format, streaming, logprobs, n."""
    service, engine, body = await _open(request, ChatCompletionRequest)
    tok = engine.tokenizer
    prompt, prefix = await run_in_threadpool(_chat_prompt, tok, body.messages, body.tool_dicts, body.choice)
    grammar = await run_in_threadpool(_reply_grammar, tok, body, body.tool_dicts, body.choice)
    parsers = [tools.new_parser(tok, body.tool_dicts, body.choice) for _ in range(body.n)]
    requests = engine_requests(engine, body, prompt, body.completion_limit, None, prompt_param="messages",
                               stop=body.stops + parsers[0].stop, logprobs=body.logprobs,
                               top_logprobs=body.top_logprobs or 0, grammar=grammar)
    legacy = body.legacy_functions
    single_call = legacy or body.parallel_tool_calls is False
    choices = [Choice(i, stream, parsers[i], prefix, single_call)
               for i, stream in enumerate(submit(engine, requests))]
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": service.settings.served_model_name}

    if body.stream:
        return _sse(_chat_chunks(request, body, choices, head, tok))
    if not await _collect(request, choices):
        return _client_gone()
    return {**head, "object": "chat.completion", "choices": [
        {"index": c.index, "message": chat_message(c, legacy),
         "logprobs": {"content": [chat_logprob(tok, d) for d in c.logprobs]} if body.logprobs else None,
         "finish_reason": finish_reason(c, legacy)} for c in choices], "usage": usage(choices, body.n)}


async def _chat_chunks(request: HTTPRequest, body: ChatCompletionRequest, choices: list[Choice], head: dict,
                       tok: Tokenizer) -> AsyncIterator[dict]:
    legacy = body.legacy_functions

    def chunk(index: int, delta: dict, logprob: dict | None = None, reason: str | None = None) -> dict:
        return {**head, "object": "chat.completion.chunk", "choices": [
            {"index": index, "delta": delta, "logprobs": logprob and {"content": [logprob]},
             "finish_reason": reason}]}

    for c in choices:
        yield chunk(c.index, {"role": "assistant", "content": ""})
    async with aclosing(deltas(request, choices)) as items:
        async for c, delta in items:
            events = c.add(delta)
            logprob = chat_logprob(tok, delta) if body.logprobs and c.scored(delta) else None
            pieces = [chat_event_delta(e, legacy) for e in events] or ([{"content": ""}] if logprob else [])
            for n, piece in enumerate(pieces):
                yield chunk(c.index, piece, logprob if n == 0 else None)
            if c.finish_reason:
                yield chunk(c.index, {}, reason=finish_reason(c, legacy))
    if body.stream_options and body.stream_options.include_usage and all(c.finish_reason for c in choices):
        yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(choices, body.n)}


async def completions(request: HTTPRequest):
    """OpenAI text completions."""
    service, engine, body = await _open(request, CompletionRequest)
    tok = engine.tokenizer
    grammar = await run_in_threadpool(_reply_grammar, tok, body)
    requests = []
    for prompt in body.prompts:
        ids = await run_in_threadpool(tok.encode, prompt) if isinstance(prompt, str) else prompt
        requests += engine_requests(engine, body, ids, body.max_tokens, CompletionRequest.DEFAULT_MAX_TOKENS,
                                    prompt_param="prompt", stop=body.stops, logprobs=body.logprobs is not None,
                                    top_logprobs=body.logprobs or 0, grammar=grammar)
    choices = [Choice(i, stream, tools.PlainParser()) for i, stream in enumerate(submit(engine, requests))]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": service.settings.served_model_name}

    if body.stream:
        return _sse(_completion_chunks(request, body, choices, head, tok))
    if not await _collect(request, choices):
        return _client_gone()
    return {**head, "object": "text_completion", "choices": [
        {"index": c.index, "text": c.text,
         "logprobs": completion_logprobs(tok, c.logprobs)[0] if body.logprobs is not None else None,
         "finish_reason": c.finish_reason} for c in choices], "usage": usage(choices, body.n)}


async def _completion_chunks(request: HTTPRequest, body: CompletionRequest, choices: list[Choice], head: dict,
                             tok: Tokenizer) -> AsyncIterator[dict]:
    offsets = [0] * len(choices)  # where each choice's next token starts in its text, for text_offset
    async with aclosing(deltas(request, choices)) as items:
        async for c, delta in items:
            text = "".join(e.text for e in c.add(delta))
            logprobs = None
            if body.logprobs is not None:
                logprobs, offsets[c.index] = completion_logprobs(tok, [delta] if c.scored(delta) else [],
                                                                 offsets[c.index])
            if text or logprobs or c.finish_reason:
                yield {**head, "object": "text_completion", "choices": [
                    {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}]}
    if body.stream_options and body.stream_options.include_usage and all(c.finish_reason for c in choices):
        yield {**head, "object": "text_completion", "choices": [], "usage": usage(choices, body.n)}


async def embeddings(request: HTTPRequest):
    """Mean-pooled, normalized hidden states."""
    service, engine, body = await _open(request, EmbeddingRequest)
    tok = engine.tokenizer
    hidden = engine.model.config.hidden_size
    if body.dimensions is not None and body.dimensions != hidden:
        raise APIError(400, f"dimensions={body.dimensions} is not supported: this model's embeddings have "
                            f"{hidden} dimensions", param="dimensions")
    ids = [await run_in_threadpool(tok.encode, x) if isinstance(x, str) else x for x in body.inputs]
    for i, x in enumerate(ids):
        check_token_ids(x, engine.model.config.vocab_size, f"input[{i}]")
        if len(x) > engine.context_length:
            raise APIError(400, f"input {i} has {len(x)} tokens but the context holds {engine.context_length}",
                           param="input", code="context_length_exceeded")
    vectors = await run_in_threadpool(engine.embed, ids)

    def encode(vector: list[float]):
        if body.encoding_format == "base64":  # little-endian float32, as OpenAI sends it
            return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        return vector
    tokens = sum(len(x) for x in ids)
    # A JSONResponse skips FastAPI's per-value encoder: thousands of floats per vector.
    return JSONResponse({"object": "list", "model": service.settings.served_model_name,
                         "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                                  for i, v in enumerate(vectors)],
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def tokenize(request: HTTPRequest):
    """Token ids of a text, or of a chat as /v1/chat/completions renders it."""
    _, engine, body = await _open(request, TokenizeRequest)
    tok = engine.tokenizer
    if body.prompt is not None:
        ids = await run_in_threadpool(tok.encode, body.prompt)
    else:
        ids, _ = await run_in_threadpool(_chat_prompt, tok, body.messages, body.tool_dicts, body.choice)
    return {"tokens": ids, "count": len(ids), "max_model_len": engine.context_length}


async def detokenize(request: HTTPRequest):
    """The text of token ids."""
    _, engine, body = await _open(request, DetokenizeRequest)
    tok = engine.tokenizer
    try:
        return {"prompt": tok.decode(body.tokens)}
    except ValueError as e:  # an id with no token
        raise APIError(400, str(e), param="tokens") from None


ROUTES = [
    ("GET", "/health", health),
    ("GET", "/metrics", metrics),
    ("GET", "/v1/models", list_models),
    ("GET", "/v1/models/{model:path}", get_model),
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/embeddings", embeddings),
    ("POST", "/tokenize", tokenize),
    ("POST", "/detokenize", detokenize),
]


def server_config(app, settings: Settings, host: str = "127.0.0.1", port: int = 8000, **kwargs):
    """uvicorn's configuration for `app`, with the Gate's transport limits."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=http_protocol(app.state.service),
                          h11_max_incomplete_event_size=settings.max_header_bytes + 4, **kwargs)


def serve(load: Callable[[], tuple[Model, Tokenizer]], settings: Settings, host: str = "127.0.0.1",
          port: int = 8000) -> int:
    """Run the server until interrupted; raise QwenkitError if the model fails to load or the engine
    stops for good (the process then exits non-zero, for a process supervisor to restart it)."""
    import uvicorn

    failure: list[str] = []

    def stop_on_failure(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    app = create_app(load, settings, on_failure=stop_on_failure)
    server = uvicorn.Server(server_config(app, settings, host, port, timeout_graceful_shutdown=5))
    log.info("serving %r at http://%s:%d (model loading in the background; GET /health says when ready)",
             settings.served_model_name, host, port)
    server.run()
    if failure:
        raise QwenkitError(failure[0])
    return 0

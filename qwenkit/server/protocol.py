"""The OpenAI wire format: request models (pydantic), their bounds, and the error shape.

This module is where a request is validated, and the OpenAPI schema the server publishes is made
from these same models, so it states the same bounds. Requests are validated strictly: a field of
the wrong type, out of range, or unknown is a 400 that names it; every number is bounded and a
body may nest at most MAX_JSON_DEPTH levels; an option this server cannot honour (echo, ...) is
refused rather than ignored. OpenAI fields that can be honoured are (`n`, `stream_options`,
`parallel_tool_calls`, `response_format` and strict tool schemas (constrained decoding), `user`
(recorded nowhere, as it changes nothing)), and so are the usual extensions of local servers: top_k,
min_p, repetition_penalty, stop_token_ids; response_format is taken by text completions too.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator

from ..generate import SAMPLING_FIELDS
from ..prompts import MAX_JSON_DEPTH
from ..sampling import MAX_TOP_K, MIN_REPETITION_PENALTY
from ..tools import deeper_than

MAX_INT = 2**31 - 1  # bound of counts with no smaller natural one (max_tokens, dimensions, token ids)
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 256
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request

TokenId = Annotated[int, Field(ge=0, le=MAX_INT)]
_TOKEN_ID_KEY = r"^[0-9]{1,10}$"  # ASCII digits only: str.isdigit() also takes '²' and '١'
LogitBias = Annotated[
    dict[Annotated[str, Field(pattern=_TOKEN_ID_KEY)], Annotated[float, Field(ge=-100, le=100)]],
    Field(max_length=MAX_LOGIT_BIAS),
    WithJsonSchema({"type": "object", "maxProperties": MAX_LOGIT_BIAS, "propertyNames": {"pattern": _TOKEN_ID_KEY},
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}),
]


class APIError(Exception):
    """An error the client gets as OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = ("authentication_error" if status == 401 else "server_error" if status >= 500
            else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse(model: type[BaseModel], data) -> BaseModel:
    """Validate a decoded JSON body; pydantic's errors become one 400 naming the fields."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    check_depth(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = {}
        for err in e.errors():
            if err["type"] == "extra_forbidden":  # the last part is the unknown key itself, whatever it looks like
                key, param = err["loc"][-1], _param(err["loc"][:-1])
                param = f"{param}.{key}" if param else str(key)
                problems.setdefault(param, []).append(_unknown_field(str(key)))
            else:
                problems.setdefault(_param(err["loc"]), []).append(err["msg"].removeprefix("Value error, "))
        message = "; ".join(f"{param or 'body'}: {' or '.join(dict.fromkeys(msgs))}"
                            for param, msgs in problems.items())
        raise APIError(400, f"invalid request: {message}", param=next(iter(problems))) from None


def check_depth(data, limit: int = MAX_JSON_DEPTH) -> None:
    """A 400 for a body nested more than `limit` levels."""
    path = deeper_than(data, limit)
    if path is not None:
        raise APIError(400, f"the request nests deeper than {limit} levels (at {path}): flatten it, e.g. a "
                            "tool's parameters schema", param=re.split(r"[.\[]", path)[0])


def _unknown_field(key: str) -> str:
    close = difflib.get_close_matches(key, _FIELD_NAMES, n=1)
    return f"unknown field {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


_TYPE_NAME = re.compile(r"^(str|int|float|bool|dict|list|none|literal|function-\w+)\b|[\[A-Z]")


def _param(loc: tuple) -> str | None:
    """('messages', 0, 'content', 'str') -> 'messages[0].content': union member names are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_NAME.search(part):
            out += f".{part}" if out else part
    return out or None


def refuse(param: str, message: str):
    """From a model validator: an APIError passes through pydantic untouched, so it can name `param`
    (a ValueError raised there would be reported against the whole body)."""
    raise APIError(400, message, param=param)


class Strict(BaseModel):
    # strict: "3" is not an int and true is not a number; NaN and infinities are refused.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------- messages and tools

class TextPart(Strict):
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, data):
        # Checked first, so an image part is refused for being an image, not for its fields.
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(f"content parts of type {data.get('type')!r} are not supported: this server "
                             "takes text only ({'type': 'text', 'text': ...})")
        return data


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCallIn(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None  # legacy assistant call

    @model_validator(mode="after")
    def _fields_fit_role(self):
        if self.role == "assistant":
            if self.content is None and not self.tool_calls and not self.function_call:
                raise ValueError("an assistant message needs content or tool_calls")
        elif self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        elif self.tool_calls or self.function_call:
            raise ValueError("only assistant messages carry tool_calls / function_call")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.role == "function" and not self.name:
            raise ValueError("a function message needs the name of the function")
        return self

    def to_dict(self) -> dict:
        """The plain dict the prompt builders take; `developer` is OpenAI's newer name for system."""
        out = self.model_dump(exclude_none=True)
        if out["role"] == "developer":
            out["role"] = "system"
        return out


class FunctionDef(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None
    # Qwen's own function fields (the Qwen-7B scripts' openai_api.py accepts them; the ReAct prompt uses them).
    name_for_model: str | None = None
    name_for_human: str | None = None
    description_for_model: str | None = None



class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchemaFormat(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    """The reply's shape: free text, any JSON object, or JSON valid against a schema (always enforced by
    constrained decoding, strict or not)."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema goes with type 'json_schema', and that type needs it")
        return self

    @property
    def answer_schema(self) -> dict | None:
        """The JSON schema replies must be valid against, or None for free text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            return self.json_schema.schema_ if self.json_schema.schema_ is not None else {}
        return None


# ----------------------------------------------------------------------------- requests

class GenerationRequest(Strict):
    """What chat and text completions share: the model, sampling, stops, n and streaming."""
    model: str | None = None  # absent or "" means the served model
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=10)
    logit_bias: LogitBias | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _few_stops(cls, value):  # before the type's own bound, for a clearer message
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(value)}")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_keys_are_token_ids(cls, value):  # the type checks the same; this says it in words
        if not isinstance(value, dict):
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
        for key, bias in value.items():
            if not (isinstance(key, str) and re.fullmatch(_TOKEN_ID_KEY, key)):
                raise ValueError(f"keys must be token ids written in ASCII digits, got {key!r}")
            if isinstance(bias, (int, float)) and not isinstance(bias, bool) and not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key} is {bias}; biases must be in [-100, 100]")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            refuse("stream_options", "stream_options is only allowed with stream: true")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self) -> dict:
        """The sampling options the client set, as make_request keywords (unset ones keep the
        checkpoint's generation_config defaults)."""
        out = {k: getattr(self, k) for k in SAMPLING_FIELDS if k != "logit_bias" and getattr(self, k) is not None}
        if self.logit_bias:
            out["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
        return out


class ToolsInput(Strict):
    """Tools offered to the model: OpenAI's tools and tool_choice, or the legacy functions and
    function_call (converted to tools, and answered with `function_call` as the old API was)."""
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: list[FunctionDef] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None

    @model_validator(mode="after")
    def _tools_consistent(self):
        if self.tools is not None and self.functions is not None:
            refuse("functions", "give tools or the legacy functions, not both")
        if self.function_call is not None and self.functions is None:
            refuse("function_call", "function_call needs functions")
        if self.tool_choice is not None and not self.tools:
            refuse("tool_choice", "tool_choice needs tools")
        names = {f.name for f in self.function_defs}
        choice = self.choice
        if isinstance(choice, dict) and choice["function"]["name"] not in names:
            refuse("function_call" if self.legacy_functions else "tool_choice",
                   f"the tool choice names {choice['function']['name']!r}, which is not among the "
                   f"tools ({', '.join(sorted(names))})")
        return self

    @property
    def legacy_functions(self) -> bool:
        return self.functions is not None

    @property
    def function_defs(self) -> list[FunctionDef]:
        return self.functions if self.functions is not None else [t.function for t in self.tools or []]

    @property
    def tool_dicts(self) -> list[dict] | None:
        """The tools in OpenAI's shape (legacy functions converted), as the prompt builders take them."""
        return [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in self.function_defs] or None

    @property
    def choice(self) -> str | dict | None:
        """tool_choice, or the legacy function_call converted to it."""
        choice = self.tool_choice if self.functions is None else self.function_call
        if isinstance(choice, NamedToolChoice):
            return choice.model_dump()
        if isinstance(choice, NamedFunction):
            return {"type": "function", "function": {"name": choice.name}}
        return choice


class ChatCompletionRequest(GenerationRequest, ToolsInput):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # OpenAI keeps a completion with store: true, tagged with metadata. Nothing is kept here: false (what
    # SDKs such as openai-agents send when asked) is what happens; true is refused below.
    store: bool | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.store:
            refuse("store", "this server keeps no completions: send store false or leave it out")
        if self.top_logprobs and not self.logprobs:
            refuse("top_logprobs", "top_logprobs needs logprobs: true")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            refuse("max_completion_tokens", "max_tokens and max_completion_tokens disagree; give one of them")
        return self

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    DEFAULT_MAX_TOKENS: ClassVar[int] = 16  # OpenAI's, when max_tokens is absent
    prompt: str | list[TokenId] | list[str | list[TokenId]]  # one text, one token list, or a list of either
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=8)

    @model_validator(mode="after")
    def _supported(self):
        if self.echo:
            refuse("echo", "echo is not supported: the reply holds only the completion")
        if self.suffix:
            refuse("suffix", "suffix (fill-in-the-middle) is not supported")
        if self.best_of is not None and self.best_of != self.n:
            refuse("best_of", "best_of is not supported (other than best_of == n)")
        if self.prompt in ("", []) or (isinstance(self.prompt, list) and any(p in ("", []) for p in self.prompt)):
            refuse("prompt", "the prompt is empty")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class EmbeddingRequest(Strict):
    input: str | list[TokenId] | list[str | list[TokenId]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=MAX_INT)
    user: str | None = None

    @model_validator(mode="after")
    def _not_empty(self):
        p = self.input
        if p in ("", []) or (isinstance(p, list) and any(x in ("", []) for x in p)):
            refuse("input", "the input is empty")
        if len(self.inputs) > MAX_EMBEDDING_INPUTS:
            refuse("input", f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(self.inputs)}")
        return self

    @property
    def inputs(self) -> list[str | list[int]]:
        p = self.input
        if isinstance(p, str) or isinstance(p[0], int):
            return [p]
        return list(p)


class TokenizeRequest(ToolsInput):
    """Text as the completions endpoint encodes it, or a chat (with tools) as the chat endpoint does."""
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            refuse("prompt", "give either prompt (text) or messages (a chat)")
        if self.prompt is not None and self.tool_dicts:
            refuse("tools", "tools go with messages, not with prompt")
        return self


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[TokenId]


BODIES = {  # path -> the model its JSON body must fit; the OpenAPI schema is made from these
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
_FIELD_NAMES = sorted({name for model in (*BODIES.values(), Message, TextPart, FunctionDef, Tool, ToolCallIn,
                                          FunctionCall, NamedToolChoice, StreamOptions, ResponseFormat)
                       for name in model.model_fields})

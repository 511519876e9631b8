"""The OpenAI-compatible server.

Fast tier: a tiny random model behind the real app, served by uvicorn in a thread; a "puppet"
switch makes the model write a given text, so tool calls and stops are checked exactly. Real tier:
`qwenkit serve -m demo` in a subprocess, driven by the openai client.
"""

import base64
import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from qwenkit.cli import build_parser
from qwenkit.server import Settings, create_app, served_name

from .conftest import CHAT, CONTEXT, KEY, WEATHER, Puppet, chat, demo_serve, events, free_port, live, metric


@pytest.fixture(scope="module")
def puppet(tok):
    return Puppet(tok.vocab_size)


@pytest.fixture(scope="module")
def url(puppet, tok):
    settings = Settings(served_model_name="tiny", api_key=KEY, api_auth="user:pass", max_batch=2, max_queue=4,
                        cors_origins=("http://example.com",))
    with live(create_app(lambda: (puppet, tok), settings)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@contextlib.contextmanager
def scripted(puppet, tok, client, text, **prompt):
    """Make the puppet answer `text` to the chat `prompt` (messages, tools, tool_choice)."""
    puppet.prompt_len = client.post("/tokenize", json=prompt).json()["count"]
    puppet.script = tok.encode(text) + [tok.im_end_id]
    try:
        yield
    finally:
        puppet.script = None


def assert_good_request_works(client):
    r = client.post(CHAT, json=chat())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


# ----------------------------------------------------------------------------- bad input

USER = {"role": "user", "content": "hi"}
CALL = {"role": "assistant", "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}

BAD = [  # (path, body (bytes: sent as is), status, param, words in the message)
    (CHAT, b'{"messages": [', 400, None, "not valid JSON"),
    (CHAT, b"[1, 2]", 400, None, "JSON object"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature", "finite"),
    (CHAT, {}, 400, "messages", "required"),
    (CHAT, {"messages": []}, 400, "messages", "at least 1"),
    (CHAT, chat(temperature="hot"), 400, "temperature", "number"),
    (CHAT, chat(n=True), 400, "n", "integer"),
    (CHAT, chat(foo=1), 400, "foo", "unknown field 'foo'"),
    (CHAT, chat(maxTokens=5), 400, "maxTokens", "did you mean 'max_tokens'"),
    (CHAT, {"messages": [{**USER, "Name": "x"}]}, 400, "messages[0].Name", "unknown field 'Name'"),
    (CHAT, chat(top_k=10**30), 400, "top_k", "less than or equal to 2147483647"),
    (CHAT, chat(max_tokens=10**30), 400, "max_tokens", "less than or equal to"),
    (CHAT, chat(seed=2**63), 400, "seed", "less than"),
    (CHAT, chat(logit_bias={"²": 1}), 400, "logit_bias", "ASCII digits"),
    (CHAT, chat(logit_bias={"①": 1}), 400, "logit_bias", "ASCII digits"),
    (CHAT, chat(logit_bias={"١": 1}), 400, "logit_bias", "ASCII digits"),
    (CHAT, chat(logit_bias={str(i): 1 for i in range(301)}), 400, "logit_bias", "at most 300"),
    (CHAT, chat(stop_token_ids=[-1]), 400, "stop_token_ids[0]", "greater than or equal to 0"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "'user'"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0]", "needs content"),
    (CHAT, {"messages": [USER, CALL, {"role": "tool", "content": "sunny"}]}, 400, "messages[2]", "tool_call_id"),
    (CHAT, {"messages": [USER, CALL, {"role": "tool", "content": "x", "tool_call_id": None}]}, 400, "messages[2]",
     "tool_call_id"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content", "not supported"),
    (CHAT, {"messages": [{"role": "user", "content": "x " * 600}]}, 400, "messages", "context holds 512"),
    (CHAT, chat(max_tokens=1000), 400, "max_tokens", "1000"),
    (CHAT, chat(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    (CHAT, chat(max_tokens=5, max_completion_tokens=6), 400, "max_completion_tokens", "disagree"),
    (CHAT, chat(temperature=-1), 400, "temperature", "greater than or equal to 0"),
    (CHAT, chat(top_p=0), 400, "top_p", "greater than 0"),
    (CHAT, chat(top_k=-1), 400, "top_k", "greater than or equal to 0"),
    (CHAT, chat(presence_penalty=5), 400, "presence_penalty", "less than or equal to 2"),
    (CHAT, chat(repetition_penalty=0), 400, "repetition_penalty", "greater than or equal to 0.01"),
    (CHAT, chat(seed=-1), 400, "seed", "greater than or equal to 0"),
    (CHAT, chat(n=9), 400, "n", "less than or equal to 8"),
    (CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs", "20"),
    (CHAT, chat(top_logprobs=2), 400, "top_logprobs", "needs logprobs"),
    (CHAT, chat(store=True), 400, "store", "keeps no completions"),
    (CHAT, chat(store=False, metadata={"k": 1}), 400, "metadata.k", "string"),
    (CHAT, chat(metadata={str(i): "v" for i in range(17)}), 400, "metadata", "at most 16"),
    (CHAT, chat(logit_bias={"abc": 1}), 400, "logit_bias", "token ids"),
    (CHAT, chat(logit_bias={"99999999": 1}), 400, "logit_bias", "99999999"),
    (CHAT, chat(logit_bias={"5": 500}), 400, "logit_bias", "[-100, 100]"),
    (CHAT, chat(stop=["x"] * 17), 400, "stop", "at most 16"),
    (CHAT, chat(stop_token_ids=[10**9]), 400, "stop_token_ids", str(10**9)),
    (CHAT, chat(response_format={"type": "xml"}), 400, "response_format.type", "'json_schema'"),
    (CHAT, chat(response_format={"type": "json_schema"}), 400, "response_format", "needs it"),
    (CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}),
     400, "response_format", "Invalid type: objekt"),
    (CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}), 400, "response_format", "uniqueItems"),
    (CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}), 400,
     "response_format.json_schema.name", "pattern"),
    (CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options", "stream: true"),
    (CHAT, chat(tool_choice="auto"), 400, "tool_choice", "needs tools"),
    (CHAT, chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), 400,
     "tool_choice", "'nope'"),
    (CHAT, chat(tools=[WEATHER], tool_choice="sometimes"), 400, "tool_choice", "'required'"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "get weather"}}]), 400, "tools[0].function.name",
     "pattern"),
    (CHAT, chat(tools=[{"type": "function", "function": {**WEATHER["function"], "strict": True, "parameters": {
        "type": "object", "properties": {"when": {"type": "string", "format": "date", "uniqueItems": 3}}}}}],
        tool_choice="required"), 400, "tools", "uniqueItems"),
    (CHAT, chat(tools=[WEATHER], functions=[WEATHER["function"]]), 400, "functions", "not both"),
    (CHAT, chat(model="gpt-4"), 404, "model", "does not exist"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", "not supported"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt", str(10**9)),
    ("/v1/completions", {"prompt": "x " * 600}, 400, "prompt", "context holds 512"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, 400, "n", "queues at most 4"),
    ("/v1/embeddings", {"input": "x", "dimensions": 3}, 400, "dimensions", "32 dimensions"),
    ("/v1/embeddings", {"input": []}, 400, "input", "empty"),
    ("/v1/embeddings", {"input": "x", "model": "other"}, 404, "model", "does not exist"),
    ("/tokenize", {"prompt": "x", "messages": [USER]}, 400, "prompt", "either"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens", "vocabulary"),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD,
                         ids=[f"{i}-{b[4] if isinstance(b[4], str) else ''}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_clear_error_and_harmless(client, path, body, status, param, words):
    r = client.post(path, content=body) if isinstance(body, bytes) else client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert_good_request_works(client)


def test_store_false_and_metadata_are_taken(client):
    """What SDKs send (openai-agents: store and metadata when the user sets them): nothing is stored here,
    so store false is what happens and metadata only tags the request."""
    r = client.post(CHAT, json=chat(store=False, metadata={"run": "a1", "team": "eval"}, user="u1"))
    assert r.status_code == 200, r.text


def test_transport_errors(client):
    r = client.post(CHAT, content=b"x" * (9 << 20))  # over the 8 MiB limit, refused before parsing
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    r = client.post(CHAT, content=iter([b"x" * (1 << 20)] * 9))  # the same, chunked without a length
    assert r.status_code == 413
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = client.get(CHAT)
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "use POST" in r.json()["error"]["message"]
    assert_good_request_works(client)


def test_auth(url, client):
    assert httpx.get(f"{url}/health").status_code == 200  # open, as is the web page
    assert httpx.get(f"{url}/").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{url}{CHAT}", json=chat(), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(f"{url}/metrics").status_code == 401
    basic = base64.b64encode(b"user:pass").decode()
    assert httpx.post(f"{url}{CHAT}", json=chat(), headers={"Authorization": f"Basic {basic}"}).status_code == 200
    assert httpx.post(f"{url}{CHAT}", json=chat(), headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_cors(url):
    r = httpx.options(f"{url}{CHAT}", headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST",
                                               "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://example.com"
    r = httpx.post(f"{url}{CHAT}", json=chat(), headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


# ----------------------------------------------------------------------------- good requests

def test_models(client):
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]
    assert client.get("/v1/models/tiny").json()["object"] == "model"
    assert client.get("/v1/models/other").status_code == 404
    assert client.post(CHAT, json=chat(model="")).status_code == 200  # empty or absent: the served model


def test_chat_usage_and_logprobs(client):
    messages = [{"role": "system", "content": "Be brief."}, USER]
    prompt = client.post("/tokenize", json={"messages": messages}).json()
    r = client.post(CHAT, json={"messages": messages, "model": "tiny", "max_tokens": 6, "temperature": 0,
                                "logprobs": True, "top_logprobs": 3}).json()
    assert r["id"].startswith("chatcmpl-") and r["object"] == "chat.completion" and r["model"] == "tiny"
    choice = r["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    usage = r["usage"]
    assert usage["prompt_tokens"] == prompt["count"]
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]  # the last one is new
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    content = choice["logprobs"]["content"]
    # The stop token that ends a reply is counted but not scored.
    assert len(content) == usage["completion_tokens"] - (choice["finish_reason"] == "stop")
    for entry in content:
        assert len(entry["top_logprobs"]) == 3 and entry["logprob"] <= 0
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy: the best one
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]


def test_the_same_conversation_again_reuses_the_cache(client):
    body = {"messages": [{"role": "user", "content": "a question long enough to be worth caching " * 3}],
            "max_tokens": 2, "temperature": 0}
    client.post(CHAT, json=body)
    usage = client.post(CHAT, json=body).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 1


def test_streaming_chunk_order_usage_and_n(client):
    body = chat(max_tokens=5, n=2, seed=5, temperature=1.0)
    with client.stream("POST", CHAT, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = events(r)
    assert chunks[-1] == "[DONE]"
    usage_chunk, chunks = chunks[-2], chunks[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    texts = {}
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] in ("stop", "length")
        assert all(c["finish_reason"] is None and set(c["delta"]) == {"content"} for c in mine[1:-1])
        texts[index] = "".join(c["delta"]["content"] for c in mine[1:-1])
    # Streamed or not, the same seed gives the same text; choice i draws with seed + i.
    whole = client.post(CHAT, json=body).json()
    assert [c["message"]["content"] for c in whole["choices"]] == [texts[0], texts[1]]
    assert whole["usage"]["completion_tokens"] == usage_chunk["usage"]["completion_tokens"]
    second = client.post(CHAT, json={**body, "n": 1, "seed": 6}).json()
    assert second["choices"][0]["message"]["content"] == texts[1]


def test_stop_strings(puppet, tok, client):
    with scripted(puppet, tok, client, "Hello there. STOP and more", messages=[USER]):
        r = client.post(CHAT, json=chat(max_tokens=30, temperature=0, stop="STOP")).json()
        assert r["choices"][0]["message"]["content"] == "Hello there. "
        assert r["choices"][0]["finish_reason"] == "stop"
        with client.stream("POST", CHAT, json=chat(max_tokens=30, temperature=0, stop=["xyz", "STOP"],
                                                   stream=True)) as s:
            pieces = [c["choices"][0]["delta"].get("content", "") for c in events(s)[1:-1]]
        assert "".join(pieces) == "Hello there. "


@pytest.fixture(scope="module")
def tiny_oai(url):
    """The openai client, pointed at the tiny server."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_streamed_non_ascii_reply_arrives_whole(puppet, tok, client, tiny_oai):
    """Characters split over several tokens (🫠 is three) reach the client whole, in the raw SSE and
    through the openai client, and the streamed pieces add up to the reply."""
    text = "表情🫠🦜 and 龘鱻, naïve café ✓"
    assert any("\ufffd" in tok.decode([i]) for i in tok.encode(text))  # some tokens hold part of a character
    with scripted(puppet, tok, client, text, messages=[USER]):
        with client.stream("POST", CHAT, json=chat(max_tokens=60, temperature=0, stream=True)) as s:
            pieces = [c["choices"][0]["delta"].get("content", "") for c in events(s)[:-1]]
        stream = tiny_oai.chat.completions.create(model="tiny", messages=[USER], max_tokens=60, temperature=0,
                                                  stream=True)
        oai_pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    for streamed in (pieces, oai_pieces):
        assert "".join(streamed) == text and len([p for p in streamed if p]) > 1, streamed
        assert not any("\ufffd" in p for p in streamed), streamed


def test_errors_reach_the_openai_client_as_its_exceptions(client, tiny_oai):
    """A refused request raises the openai client's exception for its status, carrying the server's
    error (message, param, type) as the server sends it; streamed or not."""
    import openai

    cases = [({"max_tokens": 1000}, {}, openai.BadRequestError),  # past the 512-token context
             ({}, {"foo": 1}, openai.BadRequestError),  # a field the API does not have
             ({"model": "gpt-4"}, {}, openai.NotFoundError)]
    for options, extra, error in cases:
        body = {"model": "tiny", "messages": [USER], **options}
        expected = client.post(CHAT, json={**body, **extra}).json()["error"]
        for stream in (False, True):
            with pytest.raises(error) as raised:
                tiny_oai.chat.completions.create(**body, stream=stream, extra_body=extra)
            assert raised.value.body == expected and raised.value.param == expected["param"], raised.value.body
            assert raised.value.type == "invalid_request_error" and expected["message"] in raised.value.message


REACT_CALL = 'Thought: I should look it up.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: none'


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call(puppet, tok, client, stream):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with scripted(puppet, tok, client, REACT_CALL, messages=messages, tools=[WEATHER]):
        body = {"messages": messages, "tools": [WEATHER], "temperature": 0, "max_tokens": 60}
        if not stream:
            r = client.post(CHAT, json=body).json()
            choice = r["choices"][0]
            assert choice["finish_reason"] == "tool_calls"
            message = choice["message"]
            assert message["content"] == "I should look it up."
            [call] = message["tool_calls"]
            assert call["id"].startswith("call_") and call["type"] == "function"
        else:
            with client.stream("POST", CHAT, json={**body, "stream": True}) as s:
                chunks = [c["choices"][0] for c in events(s)[:-1]]
            assert chunks[-1]["finish_reason"] == "tool_calls"
            deltas = [c["delta"] for c in chunks[1:-1]]
            assert "".join(d.get("content", "") for d in deltas) == "I should look it up."
            pieces = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
            first, rest = pieces[0], pieces[1:]
            assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
            assert first["function"] == {"name": "get_weather", "arguments": ""}
            assert all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in rest)
            call = {"function": {"name": "get_weather", "arguments": "".join(p["function"]["arguments"] for p in rest)}}
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_tool_result_turn_and_named_choice(puppet, tok, client):
    messages = [{"role": "user", "content": "Weather in Paris?"}, CALL,
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    # The same turn in the legacy shape: a function_call, then a function message with the result.
    legacy_messages = [messages[0], {"role": "assistant", "function_call": CALL["tool_calls"][0]["function"]},
                       {"role": "function", "name": "get_weather", "content": "sunny, 21 C"}]
    with scripted(puppet, tok, client, " I now know the final answer\nFinal Answer: Sunny and 21 C.",
                  messages=messages, tools=[WEATHER]):
        r = client.post(CHAT, json={"messages": messages, "tools": [WEATHER], "temperature": 0}).json()
        legacy = client.post(CHAT, json={"messages": legacy_messages, "functions": [WEATHER["function"]],
                                         "temperature": 0}).json()
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "Sunny and 21 C."}
    assert r["choices"][0]["finish_reason"] == "stop"
    assert legacy["choices"][0] == r["choices"][0]

    # A named tool choice: the reply starts inside the call (the forced prefix), as does the legacy API.
    messages = messages[:1]
    named = {"type": "function", "function": {"name": "get_weather"}}
    with scripted(puppet, tok, client, ' {"city": "Rome"}\nObservation:', messages=messages, tools=[WEATHER],
                  tool_choice=named):
        r = client.post(CHAT, json={"messages": messages, "tools": [WEATHER], "tool_choice": named,
                                    "temperature": 0}).json()
        legacy = client.post(CHAT, json={"messages": messages, "functions": [WEATHER["function"]],
                                         "function_call": {"name": "get_weather"}, "temperature": 0}).json()
    message = r["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Rome"}
    assert legacy["choices"][0]["finish_reason"] == "function_call"
    assert legacy["choices"][0]["message"]["function_call"] == message["tool_calls"][0]["function"]


def test_completions(client):
    r = client.post("/v1/completions", json={"prompt": ["Once upon", [40, 1079, 264]], "n": 2, "max_tokens": 4,
                                             "logprobs": 2, "seed": 1})
    assert r.status_code == 200, r.text
    r = r.json()
    assert r["id"].startswith("cmpl-") and r["object"] == "text_completion"
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    for c in r["choices"]:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
        assert all(len(top) <= 2 for top in lp["top_logprobs"])
        assert lp["text_offset"] == sorted(lp["text_offset"])
    assert r["usage"]["prompt_tokens"] == 2 + 3  # "Once upon" is 2 tokens; each prompt counted once
    default = client.post("/v1/completions", json={"prompt": "x", "logit_bias": {"151643": -100}}).json()
    assert default["usage"]["completion_tokens"] == 16 and default["choices"][0]["finish_reason"] == "length"

    with client.stream("POST", "/v1/completions", json={"prompt": "Once upon", "max_tokens": 4, "stream": True,
                                                        "seed": 1, "stream_options": {"include_usage": True}}) as s:
        chunks = events(s)
    assert chunks[-1] == "[DONE]" and chunks[-2]["usage"]["prompt_tokens"] == 2
    assert "".join(c["choices"][0]["text"] for c in chunks[:-2]) == r["choices"][0]["text"]
    assert chunks[-3]["choices"][0]["finish_reason"] is not None


def test_embeddings(client):
    r = client.post("/v1/embeddings", json={"input": ["hello", [40, 1079]]}).json()
    vectors = [d["embedding"] for d in r["data"]]
    assert [d["index"] for d in r["data"]] == [0, 1] and len(vectors[0]) == 32
    assert math.isclose(np.linalg.norm(vectors[0]), 1, rel_tol=1e-4)
    assert r["usage"]["prompt_tokens"] == 1 + 2
    packed = client.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"}).json()
    unpacked = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(unpacked, vectors[0], rtol=1e-5)


def test_tokenize_and_detokenize(client, tok):
    r = client.post("/tokenize", json={"prompt": "你好, world"}).json()
    assert r["tokens"] == tok.encode("你好, world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == CONTEXT
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "你好, world"}


def test_metrics_count_each_request_exactly(puppet, tok, client):
    """One chat with a known reply moves every counter by exactly that request's share."""
    messages = [{"role": "user", "content": "count me"}]
    before = client.get("/metrics")
    assert before.headers["content-type"].startswith("text/plain")
    with scripted(puppet, tok, client, "one two three", messages=messages):  # (scripted asks /tokenize)
        usage = client.post(CHAT, json={"messages": messages, "max_tokens": 30, "temperature": 0}).json()["usage"]
    after = client.get("/metrics").text

    def grew(name):
        return metric(after, name) - metric(before.text, name)

    assert grew("qwenkit_requests_total") == grew("qwenkit_time_to_first_token_seconds_count") == 1
    assert grew("qwenkit_prompt_tokens_total") == usage["prompt_tokens"]
    assert grew("qwenkit_cached_prompt_tokens_total") == usage["prompt_tokens_details"]["cached_tokens"]
    assert grew("qwenkit_generation_tokens_total") == usage["completion_tokens"] == len(tok.encode("one two three")) + 1
    # The prefill gives the first token; each later one is a decode step of this request alone.
    steps = usage["completion_tokens"] - 1
    assert grew("qwenkit_decode_steps_total") == grew('qwenkit_decode_batch_size_bucket{le="1"}') == steps
    assert grew("qwenkit_requests_cancelled_total") == grew("qwenkit_requests_failed_total") == 0
    assert metric(after, "qwenkit_queue_depth") == metric(after, "qwenkit_running") == 0
    assert metric(after, "qwenkit_kv_cache_bytes") > 0
    # Counted as they start: the first /metrics, /tokenize and the chat (not the /metrics being rendered).
    assert grew('qwenkit_http_responses_total{code="200"}') == 3


def test_web_page(client, monkeypatch, tmp_path):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert client.get("/app.js").status_code == 200
    monkeypatch.setattr("qwenkit.server.app.WEB_DIR", tmp_path)  # a copy of qwenkit without the page
    r = TestClient(create_app(lambda: None)).get("/")
    assert r.status_code == 200 and "not installed" in r.text


def test_queue_full_then_disconnects_free_the_slots(puppet, client):
    cancelled = metric(client.get("/metrics").text, "qwenkit_requests_cancelled_total")
    puppet.delay = 0.05  # 20 steps a second: the requests below stay running or queued
    streams = []
    try:
        # The queue holds 4; whether 0, 1 or 2 have left it for the batch depends on the timing.
        while (r := client.send(client.build_request("POST", CHAT, json=chat(max_tokens=200, stream=True)),
                                stream=True)).status_code == 200:
            streams.append(r)
            assert len(streams) <= 6
        assert len(streams) >= 4 and r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        r.read()
        assert r.json()["error"]["code"] == "queue_full"
    finally:
        for s in streams:  # the clients go away mid-stream
            s.close()
        puppet.delay = 0.0
    deadline = time.monotonic() + 30  # a bound on the wait, not a speed claim
    # The engine publishes the queue's depth as it takes a request, just before it counts that
    # request cancelled: wait for the count too. Every stream was cancelled, none finished (200 tokens
    # take 10 s at this delay).
    while True:
        text = client.get("/metrics").text
        if metric(text, "qwenkit_running") == 0 and metric(text, "qwenkit_queue_depth") == 0 and \
                metric(text, "qwenkit_requests_cancelled_total") == cancelled + len(streams):
            break
        assert time.monotonic() < deadline, f"cancelled requests still hold their slots or went uncounted:\n{text}"
        time.sleep(0.02)
    assert_good_request_works(client)  # served at once: nothing runs or waits (no time limit: CPUs differ)


def test_non_streaming_client_that_leaves_frees_its_slot(puppet, url, client):
    puppet.delay = 0.05
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}{CHAT}", json=chat(max_tokens=200), headers={"Authorization": f"Bearer {KEY}"},
                       timeout=0.5)
        deadline = time.monotonic() + 3
        while metric(client.get("/metrics").text, "qwenkit_running") != 0:
            assert time.monotonic() < deadline, "the abandoned request kept running"
            time.sleep(0.02)
    finally:
        puppet.delay = 0.0


def test_health_while_loading_and_after_a_failed_load(tok):
    loaded = threading.Event()

    def slow_load():
        loaded.wait(10)
        return Puppet(tok.vocab_size), tok

    with live(create_app(slow_load), wait_ready=False) as url:
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = httpx.post(f"{url}{CHAT}", json=chat())
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "qwenkit"
        loaded.set()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert httpx.post(f"{url}{CHAT}", json=chat()).status_code == 200

    failures = []

    def broken_load():
        raise FileNotFoundError("no such checkpoint")

    with live(create_app(broken_load, on_failure=failures.append), wait_ready=False) as url:
        deadline = time.monotonic() + 10
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and "no such checkpoint" in r.json()["message"]
        assert "no such checkpoint" in httpx.post(f"{url}{CHAT}", json=chat()).json()["error"]["message"]


def test_serve_exits_when_the_model_cannot_load(tmp_path):
    env = {**os.environ, "QWENKIT_PORT": str(free_port())}
    out = subprocess.run([sys.executable, "-m", "qwenkit", "serve", "-m", str(tmp_path / "missing")],
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert "qwenkit: error: the model failed to load" in out.stderr and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_flags_and_environment(monkeypatch, capsys):
    monkeypatch.setenv("QWENKIT_PORT", "9123")
    monkeypatch.setenv("QWENKIT_API_KEY", "from-env")
    monkeypatch.setenv("QWENKIT_MODEL", "some/dir/model.gguf")
    args = build_parser().parse_args(["serve", "--api-key", "from-flag", "--cors-origins", "a,b"])
    assert (args.port, args.api_key, args.model, args.host, args.max_batch) == (9123, "from-flag",
                                                                               "some/dir/model.gguf", "127.0.0.1", 8)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for name in ("QWENKIT_HOST", "QWENKIT_PORT", "QWENKIT_API_KEY", "QWENKIT_API_AUTH", "QWENKIT_MAX_BATCH",
                 "QWENKIT_MAX_QUEUE", "QWENKIT_CTX", "QWENKIT_CORS_ORIGINS", "QWENKIT_SERVED_MODEL_NAME",
                 "QWENKIT_MODEL", "QWENKIT_DEVICE", "QWENKIT_DTYPE", "QWENKIT_REQUEST_TIMEOUT", "QWENKIT_MAX_BODY_BYTES",
                 "QWENKIT_MAX_HEADER_BYTES"):
        assert name in text.replace("\n", " ").replace("  ", "")
    # A flag's variable reads as on/off, not as a non-empty (always true) string.
    for value, expected in (("1", True), ("true", True), ("0", False), ("off", False)):
        monkeypatch.setenv("QWENKIT_NO_CUDA_GRAPHS", value)
        assert build_parser().parse_args(["serve"]).no_cuda_graphs is expected
    monkeypatch.setenv("QWENKIT_COMPILE", "maybe")
    with pytest.raises(SystemExit):
        build_parser()
    assert "QWENKIT_COMPILE='maybe'" in capsys.readouterr().err
    assert [served_name(m) for m in (None, "demo", "Qwen/Qwen2.5-7B-Instruct", "x/model.gguf", "ckpt/")] == [
        "qwenkit", "demo", "Qwen2.5-7B-Instruct", "model", "ckpt"]


# ----------------------------------------------------------------------------- real tier

REAL_KEY = "sk-real"


@pytest.fixture(scope="module")
def demo_server(demo_path, tmp_path_factory):
    """`qwenkit serve -m demo` on a free port (port and key from the environment), until the module ends."""
    port = free_port()
    env = {"QWENKIT_PORT": str(port), "QWENKIT_API_KEY": REAL_KEY}
    with demo_serve(tmp_path_factory.mktemp("serve") / "log.txt", port, "--ctx", "4096", env=env) as served:
        yield served


@pytest.fixture(scope="module")
def oai(demo_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{demo_server[0]}/v1", api_key=REAL_KEY, max_retries=0, timeout=120)


def demo_metrics(url) -> str:
    return httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {REAL_KEY}"}).text


ASK = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.mark.real
def test_real_models_and_chat(demo_server, oai):
    assert "loading" in demo_server[1]  # it listened before the model was ready
    assert [m.id for m in oai.models.list()] == ["demo"]
    r = oai.chat.completions.create(model="demo", messages=ASK, temperature=0, max_tokens=10, logprobs=True,
                                    top_logprobs=2)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 0
    assert 0 <= r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens
    assert len(r.choices[0].logprobs.content) >= 1 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    stream = oai.chat.completions.create(model="demo", messages=ASK, temperature=0, max_tokens=10, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.real
def test_real_stop_and_seed(oai):
    count = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    r = oai.chat.completions.create(model="demo", messages=count, temperature=0, max_tokens=40, stop=["5"])
    assert "4" in r.choices[0].message.content and "5" not in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    story = [{"role": "user", "content": "Write one sentence about a cat."}]
    a, b = (oai.chat.completions.create(model="demo", messages=story, temperature=1.0, seed=42, max_tokens=24)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


TOOLS = [WEATHER]
WEATHER_ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
# The call asked for by name (auto, where the demo writes a fenced JSON block, is tested below).
GET_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.real
def test_real_tool_calls(oai):
    r = oai.chat.completions.create(model="demo", messages=WEATHER_ASK, tools=TOOLS, tool_choice=GET_WEATHER,
                                    temperature=0, max_tokens=40)
    assert r.choices[0].finish_reason == "tool_calls"
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and "paris" in json.loads(call.function.arguments)["city"].lower()

    stream = oai.chat.completions.create(model="demo", messages=WEATHER_ASK, tools=TOOLS, tool_choice=GET_WEATHER,
                                         temperature=0, max_tokens=40, stream=True)
    name, arguments, reasons = None, "", []
    for chunk in stream:
        for piece in chunk.choices[0].delta.tool_calls or []:
            name = piece.function.name or name
            arguments += piece.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert name == "get_weather" and json.loads(arguments) == json.loads(call.function.arguments)
    assert reasons[-1] == "tool_calls"

    required = oai.chat.completions.create(model="demo", messages=WEATHER_ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=40)
    assert required.choices[0].finish_reason == "tool_calls"
    assert required.choices[0].message.tool_calls[0].function.name == "get_weather"

    # The client sends the assistant message back as it got it, then the tool's result.
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "sunny"}'}
    follow = WEATHER_ASK + [r.choices[0].message, result]
    final = oai.chat.completions.create(model="demo", messages=follow, tools=TOOLS, temperature=0, max_tokens=40)
    # The 0.5B demo echoes the call (now read as one, on a line alone) and then the result it was given.
    message = final.choices[0].message
    assert "21" in (message.content or "") and final.choices[0].finish_reason in ("stop", "tool_calls")


EMAIL_TOOL = {"type": "function", "function": {
    "name": "send_email", "description": "Send an email to a given recipient with a subject and message.",
    "parameters": {"type": "object", "properties": {"to": {"type": "string"}, "subject": {"type": "string"},
                                                    "body": {"type": "string"}},
                   "required": ["to", "subject", "body"], "additionalProperties": False}, "strict": True}}


@pytest.mark.real
def test_real_auto_tool_calls_in_the_shape_the_demo_writes(oai):
    """Under tool_choice auto the demo writes a fenced JSON call: the client still gets tool_calls, plain and
    streamed; a request for code gets code, not a call."""
    ask = [{"role": "user", "content": "Email bob@example.com with the subject 'Lunch' and say I'm late."}]
    for messages, name in ((WEATHER_ASK, "get_weather"), (ask, "send_email")):
        r = oai.chat.completions.create(model="demo", messages=messages, tools=[WEATHER, EMAIL_TOOL], temperature=0,
                                        max_tokens=80)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls[0].function.name == name
        stream = oai.chat.completions.create(model="demo", messages=messages, tools=[WEATHER, EMAIL_TOOL],
                                             temperature=0, max_tokens=80, stream=True)
        streamed = [c for c in stream if c.choices]
        pieces = [p for c in streamed for p in c.choices[0].delta.tool_calls or []]
        assert pieces and pieces[0].function.name == name and streamed[-1].choices[0].finish_reason == "tool_calls"
    jsonschema = pytest.importorskip("jsonschema")
    required = oai.chat.completions.create(model="demo", messages=ask, tools=[WEATHER, EMAIL_TOOL],
                                           tool_choice="required", temperature=0, max_tokens=80)
    [call] = required.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), EMAIL_TOOL["function"]["parameters"])
    code = [{"role": "user", "content": "Write a Python function that reverses a string, in a code block."}]
    r = oai.chat.completions.create(model="demo", messages=code, tools=[WEATHER], temperature=0, max_tokens=120)
    assert not r.choices[0].message.tool_calls and "```" in r.choices[0].message.content


@pytest.mark.real
def test_real_response_format(oai):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                               "population_millions": {"type": "number", "minimum": 0}},
              "required": ["city", "country", "population_millions"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "Tell me about Paris as JSON."}]
    r = oai.chat.completions.create(model="demo", messages=messages, response_format=fmt, temperature=0, max_tokens=120)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model="demo", messages=messages, response_format=fmt, temperature=0, max_tokens=120, stream=True) if c.choices)
    # Valid too; not always the same digits: the second request reuses the first's cached prompt, whose bf16
    # rounding differs a little from a full prefill, and a number's digits are near-ties for the demo.
    jsonschema.validate(json.loads(streamed), schema)
    loose = oai.chat.completions.create(model="demo", messages=messages, response_format={"type": "json_object"},
                                        temperature=0, max_tokens=1000)
    assert loose.choices[0].finish_reason == "stop" and isinstance(json.loads(loose.choices[0].message.content), dict)


@pytest.mark.real
def test_real_completions_and_embeddings(oai):
    r = oai.completions.create(model="demo", prompt="def fibonacci(n):", max_tokens=12, temperature=0, logprobs=1)
    assert r.choices[0].text and len(r.choices[0].logprobs.tokens) == 12
    e = oai.embeddings.create(model="demo", input=["The cat sat on the mat.", "A cat is sitting on a rug.",
                                                   "Quarterly revenue rose by four percent."])
    v = np.array([d.embedding for d in e.data])
    assert v.shape == (3, 896) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-3)
    assert v[0] @ v[1] > v[0] @ v[2]  # the two cat sentences are closer


@pytest.mark.real
def test_real_concurrent_streams_batch_and_disconnect_frees_slot(demo_server, oai):
    url = demo_server[0]
    before = demo_metrics(url)
    prompts = [f"Write a short poem about the number {i}." for i in range(8)]

    def run(prompt):
        stream = oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": prompt}],
                                             temperature=0, max_tokens=24, stream=True)
        chunks = list(stream)
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, prompts))
    assert all(text and reason in ("stop", "length") for text, reason in results)
    after = demo_metrics(url)
    steps = metric(after, "qwenkit_decode_steps_total") - metric(before, "qwenkit_decode_steps_total")
    alone = (metric(after, 'qwenkit_decode_batch_size_bucket{le="1"}')
             - metric(before, 'qwenkit_decode_batch_size_bucket{le="1"}'))
    assert steps - alone >= 10, "decode steps should have run with several sequences at once"

    cancelled = metric(after, "qwenkit_requests_cancelled_total")
    with httpx.stream("POST", f"{url}{CHAT}", headers={"Authorization": f"Bearer {REAL_KEY}"}, timeout=60,
                      json={"messages": [{"role": "user", "content": "Tell me a very long story."}],
                            "max_tokens": 2000, "stream": True}) as s:
        for n, _ in enumerate(s.iter_lines()):
            if n > 6:
                break  # the client goes away mid-stream
    deadline = time.monotonic() + 5
    while metric(demo_metrics(url), "qwenkit_running") != 0:
        assert time.monotonic() < deadline, "the abandoned stream kept its slot"
        time.sleep(0.05)
    assert metric(demo_metrics(url), "qwenkit_requests_cancelled_total") == cancelled + 1


def test_a_stream_keeps_its_tokens_coming_while_a_long_prompt_prefills(tiny, tok, monkeypatch):
    """Over HTTP: a client streaming a reply keeps receiving tokens while another request's long prompt is
    prefilled in chunks (each chunk slowed, so the prefill spans many of the stream's steps)."""
    seen = []
    forward = tiny.forward

    def recorded(tokens, *args, **kwargs):
        seen.append("chunk" if tokens.shape[1] > 1 else "step")
        if tokens.shape[1] > 1:
            time.sleep(0.02)
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(tiny, "forward", recorded)
    settings = Settings(served_model_name="tiny", max_batch=2, prefill_chunk=8)
    body = {"model": "tiny", "max_tokens": 80, "temperature": 0, "stream": True, "prompt": "short"}
    with live(create_app(lambda: (tiny, tok), settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as short:
            lines = short.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # the short stream runs
            done = threading.Event()

            def long_request():
                long_prompt = " ".join(f"word{i}" for i in range(80))
                client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2, "prompt": long_prompt})
                done.set()

            threading.Thread(target=long_request).start()
            for line in lines:
                if line.startswith("data: {"):
                    seen.append("token")
                if done.is_set():
                    break
            done.wait(30)
    chunks = [i for i, e in enumerate(seen) if e == "chunk"][1:]  # the long prompt's (the first: "short")
    between = seen[chunks[0]:chunks[-1]]  # decode steps ran between the chunks, and their tokens arrived
    assert len(chunks) >= 8 and between.count("step") >= len(chunks) - 1 and between.count("token") >= len(chunks) // 2

"""The server must not die: engine-killing requests, clients that leave at any point, odd input,
slow or oversized requests, a /health that tells the truth, and generated requests (Schemathesis
from the published OpenAPI schema, and Hypothesis chats that are valid but strange).

Every test ends by checking that an ordinary request still answers.
"""

import base64
import contextlib
import copy
import json
import random
import socket
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from qwenkit.sampling import MAX_TOP_K, MIN_REPETITION_PENALTY
from qwenkit.server import Settings, create_app

from .conftest import CHAT, KEY, WEATHER, Puppet, chat, events, live, metric

# A Qwen2.5-style template with a tools section, so chats take the Hermes path and render_template.
HERMES = """{%- if tools %}<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}

# Tools

<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% elif messages[0].role != 'system' %}<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}{% if not tools %}<|im_start|>system
{{ message.content }}<|im_end|>
{% endif %}
{%- elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content or '' }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = 1.0  # the test server's request timeout, seconds


@pytest.fixture(scope="module", params=["qwen-v1", "hermes-template"])
def server(request, tok):
    """A tiny puppet model served with short timeouts and small limits, under both prompt formats."""
    tokenizer = copy.copy(tok)
    if request.param == "hermes-template":
        tokenizer.chat_template = HERMES
    model = Puppet(tokenizer.vocab_size)
    settings = Settings(served_model_name="tiny", api_key=KEY, api_auth="user:pass", max_batch=8, max_queue=64,
                        request_timeout=TIMEOUT, max_header_bytes=4096)
    app = create_app(lambda: (model, tokenizer), settings)
    with live(app) as url:
        yield url, model, app.state.service


@pytest.fixture
def client(server):
    url, model, _ = server
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        yield c
    model.delay = 0.0


def assert_healthy(client):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.post(CHAT, json=chat(max_tokens=3))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def wait_until_idle(client, cancelled: int | None = None):
    """Until no sequence runs or waits (and `cancelled` requests have been counted as such)."""
    deadline = time.monotonic() + 10
    while True:
        text = client.get("/metrics").text
        if metric(text, "qwenkit_running") == 0 and metric(text, "qwenkit_queue_depth") == 0 and (
                cancelled is None or metric(text, "qwenkit_requests_cancelled_total") >= cancelled):
            return text
        assert time.monotonic() < deadline, f"sequences still hold slots or went uncounted:\n{text}"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- clients that leave

def test_disconnects_while_others_decode_with_penalties(server, client):
    """The first engine killer found: clients leaving while other penalized sequences decode. The
    leavers hold the first cache rows, so dropping them moves the others' rows."""
    url, model, _ = server
    model.delay = 0.01
    cancelled = metric(client.get("/metrics").text, "qwenkit_requests_cancelled_total")
    long = dict(max_tokens=80, temperature=0, repetition_penalty=1.3, presence_penalty=0.5)
    leavers = [client.send(client.build_request("POST", path, json=body), stream=True) for path, body in (
        (CHAT, chat(stream=True, **long)), ("/v1/completions", {"prompt": "leave", "stream": True, **long}))]
    results = {}

    def stay(i):
        with client.stream("POST", CHAT, json=chat(stream=True, **long)) as r:
            results[i] = events(r)

    stayers = [threading.Thread(target=stay, args=(i,)) for i in range(3)]
    for t in stayers:
        t.start()
    deadline = time.monotonic() + 10
    while metric(client.get("/metrics").text, "qwenkit_running") < 5:  # all five decode together
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for r in leavers:
        assert r.status_code == 200
        next(r.iter_lines())  # the first chunk, then the client goes away
        r.close()
    for t in stayers:
        t.join(30)
    assert len(results) == 3
    for chunks in results.values():
        assert chunks[-1] == "[DONE]" and chunks[-2]["choices"][0]["finish_reason"] == "length"
    wait_until_idle(client, cancelled + 2)
    assert metric(client.get("/metrics").text, "qwenkit_requests_cancelled_total") == cancelled + 2
    assert_healthy(client)


def test_random_disconnects_leave_the_others_whole(server, client):
    """Clients leave at random points (before the first byte, after k chunks, mid non-streamed reply)
    while others stream with different samplers; every stayer finishes and every slot frees."""
    url, model, _ = server
    model.delay = 0.005
    rng = random.Random(7)
    plans = [(chat(max_tokens=rng.choice([4, 40]), stream=True, temperature=rng.choice([0, 0.8]), seed=i,
                   n=rng.choice([1, 2]), top_k=rng.choice([0, 5]), repetition_penalty=rng.choice([1.0, 1.2]),
                   logit_bias={"15": rng.choice([-5, 5])}, logprobs=rng.choice([False, True])),
              rng.choice([None, None, 0, 1, 3]), rng.random() < 0.5) for i in range(24)]
    outcomes, errors = [], []

    def run(body, leave, unstreamed):
        try:
            if leave == 0 and unstreamed:  # non-streamed, abandoned
                with contextlib.suppress(httpx.ReadTimeout):  # (unless the reply ended at once)
                    client.post(CHAT, json={**body, "stream": False, "max_tokens": 200}, timeout=0.1)
                return
            with client.stream("POST", CHAT, json={**body, "max_tokens": 200} if leave is not None else body) as r:
                assert r.status_code == 200, r.read()
                lines = r.iter_lines()
                if leave is not None:
                    for _ in zip(range(leave), lines):  # (a reply may also end before the client leaves)
                        pass
                    return
                chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
                reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
                outcomes.append(reasons.count("length") + reasons.count("stop") == body["n"] or (body, chunks[-3:]))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=plan) for plan in plans]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join(60)
    assert not errors and outcomes and all(x is True for x in outcomes), (errors, outcomes)
    wait_until_idle(client)
    assert_healthy(client)


# ----------------------------------------------------------------------------- requests that broke things

@pytest.mark.parametrize("path", [CHAT, "/tokenize"])
@pytest.mark.parametrize("levels", [30, 300, 5000])  # 2 levels of JSON each
def test_deeply_nested_tool_schema_is_a_400(client, path, levels):
    # Written out by hand: json.dumps would itself run out of stack on the deepest.
    parameters = '{"type": "object", "properties": {"x": ' * levels + "{}" + "}}" * levels
    body = ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
            '"tools": [{"type": "function", "function": {"name": "deep", "parameters": %s}}]}' % parameters)
    r = client.post(path, content=body.encode())
    assert r.status_code == 400 and "deeper than 64 levels" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == ("tools" if levels < 500 else None)  # None: past the parser's own limit
    assert_healthy(client)


def test_a_tool_schema_within_the_depth_limit_is_served(client):
    parameters = {"type": "object", "properties": {}}
    for _ in range(25):  # 56 levels of JSON in all
        parameters = {"type": "object", "properties": {"x": parameters}}
    tool = {"type": "function", "function": {"name": "deep", "parameters": parameters}}
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "tools": [tool], "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("text", ["<|im_start|>x\ue0007\ue001", "\ue0000\ue001", "\ue000", "a\ue001<|im_end|>\ue0000",
                                  '<tool_call>\n{"name": "x"}'])
def test_text_that_imitates_placeholders_or_control_tokens_stays_text(server, client, text):
    tokenizer = server[2].engine.tokenizer

    def request(content):
        tool = {"type": "function", "function": {"name": "f", "description": content, "parameters": {
            "type": "object", "properties": {content: {"type": "string", "description": content}}}}}
        return {"messages": [{"role": "user", "content": content}], "tools": [tool]}

    for body in (request(text), {**request(text), "tools": None}):
        r = client.post("/tokenize", json=body)
        assert r.status_code == 200, r.text
        ids = r.json()["tokens"]
        assert text in tokenizer.decode(ids)
        plain = client.post("/tokenize", json=json.loads(json.dumps(body).replace(json.dumps(text)[1:-1], "plain")))
        controls = set(tokenizer.control_tokens.values())
        assert [i for i in ids if i in controls] == [i for i in plain.json()["tokens"] if i in controls]
        r = client.post(CHAT, json={**body, "max_tokens": 2})
        assert r.status_code == 200, r.text
    assert_healthy(client)


def test_tool_call_arguments_nested_deep_stay_a_string(client):
    deep = "[" * 5000 + "]" * 5000
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": deep}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    r = client.post("/tokenize", json={"messages": messages, "tools": [WEATHER]})
    assert r.status_code == 200 and r.json()["count"] > 5000, r.text
    r = client.post(CHAT, json={"messages": messages, "tools": [WEATHER], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"  # (the context is 512)
    assert_healthy(client)


def test_a_failing_route_is_a_500_that_names_the_cause_and_keeps_the_connection(server, monkeypatch):
    url, _, _ = server

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("qwenkit.server.app._chat_prompt", broken)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        status, headers, body = exchange(sock, post(CHAT, chat()))
        assert status == 500 and "ZeroDivisionError: a bug" in json.loads(body)["error"]["message"]
        assert headers.get("connection") != "close"
        monkeypatch.undo()
        status, _, body = exchange(sock, post(CHAT, chat(max_tokens=2)))  # the same connection
        assert status == 200, body


# ----------------------------------------------------------------------------- the transport

def post(path: str, body: dict, headers: dict | None = None) -> bytes:
    data = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Authorization: Bearer {KEY}", "Content-Type: application/json",
             f"Content-Length: {len(data)}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def read_response(sock) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


def exchange(sock, request: bytes) -> tuple[int, dict, bytes]:
    sock.sendall(request)
    return read_response(sock)


def connect(url):
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_body_shorter_than_its_length_times_out(server, client):
    with connect(server[0]) as sock:
        start = time.monotonic()
        request = post(CHAT, chat())
        status, headers, body = exchange(sock, request[:-5])  # the body's last bytes never come
        assert status == 408 and "did not arrive within 1 s" in json.loads(body)["error"]["message"]
        assert TIMEOUT <= time.monotonic() - start < TIMEOUT + 5
        assert headers["connection"] == "close" and closed(sock)
    assert_healthy(client)


def test_a_slow_or_silent_head_times_out(server, client):
    with connect(server[0]) as sock:
        status, _, body = exchange(sock, b"POST /v1/chat/completions HTTP/1.1\r\nHost: te")
        assert status == 408 and "head did not arrive" in json.loads(body)["error"]["message"]
        assert closed(sock)
    with connect(server[0]) as sock:
        start = time.monotonic()
        assert closed(sock) and time.monotonic() - start < TIMEOUT + 5  # nothing sent: closed without a word
    with connect(server[0]) as sock:  # an idle keep-alive connection between requests is closed too
        assert exchange(sock, post(CHAT, chat(max_tokens=2)))[0] == 200
        assert closed(sock)
    assert_healthy(client)


def test_an_oversized_head_is_a_431(server, client):
    with connect(server[0]) as sock:
        status, _, body = exchange(sock, post(CHAT, chat(), {"X-Filler": "x" * 5000}))
        assert status == 431 and "longer than 4096 bytes" in json.loads(body)["error"]["message"]
        assert closed(sock)
    with connect(server[0]) as sock:  # a body as large as the head limit and more is fine
        assert exchange(sock, post(CHAT, chat(max_tokens=2, stop=["y" * 3000, "z" * 3000])))[0] == 200
    assert_healthy(client)


def test_head_is_answered_where_get_is(server, client):
    url = server[0]
    r = httpx.head(f"{url}/health")
    assert r.status_code == 200 and r.content == b""
    assert client.head("/v1/models").status_code == 200 and client.head("/metrics").status_code == 200
    assert httpx.head(f"{url}/metrics").status_code == 401
    assert client.head("/v1/models/tiny").status_code == 200 and client.head("/v1/models/x").status_code == 404
    r = client.head(CHAT)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_the_authorization_scheme_is_checked(server):
    url = server[0]
    basic = base64.b64encode(b"user:pass").decode()
    good = [f"Bearer {KEY}", f"bearer {KEY}", f"Basic {basic}", f"Bearer {basic}"]
    bad = [f"Basic {KEY}", KEY, f"Token {KEY}", f"Bearer{KEY}", "Bearer", "Basic user:pass", f"Bearer {KEY}x"]
    for value in good:
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": value}).status_code == 200, value
    for value in bad:
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": value})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", value


# ----------------------------------------------------------------------------- the supervisor

def test_engine_failures_are_survived_then_reported(tok):
    """A scheduler that dies is run again (its running requests fail, queued ones go on); one that
    keeps dying stops for good: /health says why, everything waiting fails, serve's callback fires."""
    model = Puppet(tok.vocab_size)
    failures = []
    app = create_app(lambda: (model, tok), Settings(api_key=None, max_batch=1, max_queue=8), on_failure=failures.append)
    with live(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        engine = app.state.service.engine
        model.delay = 0.02
        real = engine._drop_cancelled
        broken = {"times": 0}

        def dying():
            if broken["times"]:
                broken["times"] -= 1
                raise RuntimeError("a scheduler bug")
            real()

        engine._drop_cancelled = dying
        first = {}
        runner = threading.Thread(target=lambda: first.update(r=client.post(CHAT, json=chat(max_tokens=100))))
        runner.start()
        time.sleep(0.2)
        waiting = client.build_request("POST", CHAT, json=chat(max_tokens=2))
        waiter = {}
        queued = threading.Thread(target=lambda: waiter.update(r=client.send(waiting)))
        queued.start()
        time.sleep(0.1)
        broken["times"] = 1
        runner.join(30)
        queued.join(30)
        assert first["r"].status_code == 500 and "a scheduler bug" in first["r"].json()["error"]["message"]
        assert waiter["r"].status_code == 200  # it was queued: the engine ran again and served it
        text = client.get("/metrics").text
        assert metric(text, "qwenkit_engine_failures_total") == 1 and metric(text, "qwenkit_requests_failed_total") == 1
        assert_healthy(client)

        model.delay = 0.2
        broken["times"] = 10**6
        responses = []
        threads = [threading.Thread(target=lambda: responses.append(client.post(CHAT, json=chat(max_tokens=50))))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(r.status_code for r in responses)[0] >= 500
        assert all("scheduler bug" in r.json()["error"]["message"] or "engine" in r.json()["error"]["message"]
                   for r in responses)
        r = client.get("/health")
        assert r.status_code == 503 and "a scheduler bug" in r.json()["message"]
        r = client.post(CHAT, json=chat())
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"
        assert failures and failures[0].startswith("the engine stopped: 3 failures")
        assert metric(client.get("/metrics").text, "qwenkit_engine_failures_total") == 3


# ----------------------------------------------------------------------------- generated requests

def test_openapi_schema_states_the_bounds(server):
    schema = httpx.get(f"{server[0]}/openapi.json").json()
    chat_schema = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    top_k = next(s for s in chat_schema["top_k"]["anyOf"] if s.get("type") == "integer")
    assert top_k["maximum"] == MAX_TOP_K
    bias = next(s for s in chat_schema["logit_bias"]["anyOf"] if s.get("type") == "object")
    assert bias["propertyNames"]["pattern"] == "^[0-9]{1,10}$" and bias["maxProperties"] == 300
    body = schema["paths"][CHAT]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert schema["paths"][CHAT]["post"]["security"] == [{"bearer": []}]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_generated_requests_never_get_a_5xx_or_hang(server, mode):
    """Schemathesis: requests made from the published schema, fitting it or breaking it, to every route."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis.errors import Unsatisfiable

    url = server[0]
    operations = [result.ok() for result in schemathesis.openapi.from_url(f"{url}/openapi.json").get_all_operations()]
    assert len(operations) >= 9
    statuses = {}
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        for operation in operations:
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                      phases=[Phase.generate])
            @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
            def check(case):
                response = case.call(base_url=url, headers=AUTH, timeout=30)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500, (case.method, case.path, case.body, response.text)
                assert client.post(CHAT, json=chat(max_tokens=1)).status_code == 200

            try:
                check()
            except Unsatisfiable:  # nothing of it can be broken (a route without parameters)
                assert mode == "negative"
    assert statuses.get(200) and statuses.get(400), statuses


text = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(
    ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "\ue000", "\ue001", "\ue0007\ue001", "<tool_call>", "</tool_call>",
     "Action:", "Observation:", "Final Answer:", "\x00", "🙂", "\r\n", "{", "\"", "\\"])), max_size=5).map("".join)
tool = st.builds(lambda name, description, props: {"type": "function", "function": {
    "name": name, "description": description,
    "parameters": {"type": "object", "properties": {p: {"type": "string", "description": d} for p, d in props}}}},
    st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True), text, st.lists(st.tuples(text, text), max_size=3))
floats = {"temperature": st.floats(0, 2), "top_p": st.floats(0, 1, exclude_min=True), "min_p": st.floats(0, 1),
          "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
          "repetition_penalty": st.floats(MIN_REPETITION_PENALTY, 10)}
options = st.fixed_dictionaries({}, optional={
    **floats, "top_k": st.integers(0, MAX_TOP_K), "seed": st.integers(0, 2**63 - 1), "n": st.integers(1, 3),
    "logit_bias": st.dictionaries(st.integers(0, 151642).map(str), st.floats(-100, 100), max_size=4),
    "stop": st.one_of(text, st.lists(text, max_size=3)), "stream": st.booleans(),
    "stop_token_ids": st.lists(st.integers(0, 151642), max_size=3)})


@st.composite
def chats(draw):
    tools = draw(st.lists(tool, max_size=3, unique_by=lambda t: t["function"]["name"]))
    messages = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
    messages += [{"role": "user", "content": draw(text)}]
    if tools and draw(st.booleans()):  # a finished tool call and its result
        call = {"id": "call_1", "type": "function", "function": {"name": tools[0]["function"]["name"],
                                                                 "arguments": draw(text)}}
        messages += [{"role": "assistant", "content": draw(st.none() | text), "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": draw(text)}]
    body = {"messages": messages, "max_tokens": draw(st.integers(1, 6)), **draw(options)}
    if tools:
        body["tools"] = tools
        body["tool_choice"] = draw(st.sampled_from(["auto", "none", "required", {
            "type": "function", "function": {"name": tools[-1]["function"]["name"]}}]))
    if draw(st.booleans()):
        body["logprobs"], body["top_logprobs"] = True, draw(st.integers(0, 20))
    return body


@given(body=chats())
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          phases=[Phase.generate])  # shrinking a failure through HTTP takes minutes: report it as found
def test_valid_but_strange_chats_are_answered(server, body):
    """Hypothesis: well-formed chats with odd text, tools and every sampling option at its bounds."""
    with httpx.Client(base_url=server[0], headers=AUTH, timeout=30) as client:
        with client.stream("POST", CHAT, json=body) as r:
            r.read()
        if r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded":
            return  # the tiny model's context is 512 tokens, and ReAct prompts with three tools are long
        assert r.status_code == 200, r.text
        if body.get("stream"):
            chunks = events(r)
            assert chunks[-1] == "[DONE]" and not any("error" in c for c in chunks[:-1]), chunks
            reasons = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"]]
            assert len([x for x in reasons if x]) == body.get("n", 1)
        else:
            assert len(r.json()["choices"]) == body.get("n", 1)

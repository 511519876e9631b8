"""Constrained decoding: every reply of a random model keeps to its grammar, per row of a batch, through
qwenkit.generate, the decode loop and the server's response_format and tool calls."""

from __future__ import annotations

import copy
import json

import pytest

from qwenkit.errors import RequestError
from qwenkit.generate import Decoder, generate, make_request
from qwenkit.grammar import Grammar, GrammarError
from qwenkit.tools import reply_grammar

from .conftest import WEATHER

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 130}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                               "maxItems": 3}}, "required": ["color", "tags"],
     "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -1, "maximum": 1}, "y": {"type": "number"}},
        "required": ["x", "y"], "additionalProperties": False}, "ok": {"type": "boolean"}},
     "required": ["point", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"anyOf": [{"type": "string", "enum": ["yes", "no"]}, {"type": "null"}]},
    {"$defs": {"leaf": {"type": "object", "properties": {"v": {"const": 1}}, "required": ["v"],
                        "additionalProperties": False}},
     "type": "object", "properties": {"a": {"$ref": "#/$defs/leaf"}, "b": {"$ref": "#/$defs/leaf"}},
     "required": ["a", "b"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_a_random_model_writes_valid_json_every_time(tiny, tok, schema):
    """A random model wants anything: the grammar alone makes its replies valid, greedy and sampled. (A
    random model may write a long string or number; a reply cut by max_new_tokens is not judged.)"""
    finished = 0
    for seed in range(2):
        result = generate(tiny, tok, "data:", grammar=schema, max_new_tokens=300, temperature=float(seed), seed=seed)
        if result.finish_reason == "stop":  # the grammar's text ended
            jsonschema.validate(json.loads(result.text), schema)
            finished += 1
    assert finished


def test_each_row_of_a_batch_keeps_its_own_grammar(tiny, tok):
    prompts = ["a", "bb", "ccc"]
    grammars = [SCHEMAS[0], None, SCHEMAS[3]]
    alone = generate(tiny, tok, prompts[1], max_new_tokens=12, temperature=0.0).text
    decoder = Decoder(tiny, tok, 3, 256)
    texts = {}
    for i, (prompt, grammar) in enumerate(zip(prompts, grammars)):
        row, delta = decoder.add(make_request(tiny, tok, prompt, grammar=grammar, max_new_tokens=200 if grammar
                                              else 12, temperature=0.0))
        texts[id(row)] = [i, delta.text]
    while decoder.rows:
        for row, delta in decoder.step():
            texts[id(row)][1] += delta.text
    by_index = dict(texts.values())
    assert by_index[1] == alone  # the unconstrained row is untouched by its neighbours' masks
    for i in (0, 2):
        jsonschema.validate(json.loads(by_index[i]), grammars[i])


def test_lark_gbnf_and_regex_grammars(tiny, tok):
    assert generate(tiny, tok, "x", grammar='start: "yes" | "no"\n', temperature=1.0, seed=1).text in ("yes", "no")
    assert generate(tiny, tok, "x", grammar='root ::= [0-9]{3} "-" [a-c]{2}', temperature=1.0, seed=2).text[3] == "-"
    text = generate(tiny, tok, "x", grammar=Grammar.regex(r"[A-Z][a-z]{2,4}\."), temperature=1.0, seed=3).text
    assert text[0].isupper() and text.endswith(".") and 4 <= len(text) <= 6


@pytest.mark.parametrize("grammar, words", [
    ({"type": "objekt"}, "Invalid type: objekt"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ("start: missing_rule\n", "missing_rule"),
    (42, "not int"),
])
def test_bad_grammars_are_named(tiny, tok, grammar, words):
    with pytest.raises(RequestError, match=words) as error:
        make_request(tiny, tok, "x", grammar=grammar)
    assert error.value.param == "grammar"
    with pytest.raises(GrammarError, match="not valid JSON"):
        Grammar.json_schema("{")


def _accepts(grammar: Grammar, tokenizer, text: str) -> bool:
    matcher = grammar.matcher(tokenizer)
    return all(matcher.ll.consume_token(t) for t in tokenizer.encode(text, allowed_special=set()))


EMAIL = {"type": "function", "function": {"name": "send_email", "parameters": {
    "type": "object", "properties": {"to": {"type": "string", "maxLength": 20}, "urgent": {"type": "boolean"}},
    "required": ["to"], "additionalProperties": False}}}


def test_tool_grammars_hold_calls_to_their_schemas(tok):
    hermes = copy.copy(tok)  # a template that lists tools: Hermes calls (with <tool_call> as text here)
    hermes.chat_template = "{%- if tools %}{%- endif %}" + (tok.chat_template or "")
    tools = [WEATHER, EMAIL]
    paris = '{"name": "get_weather", "arguments": {"city": "Paris"}}'

    auto = reply_grammar(hermes, tools, "auto")
    assert _accepts(auto, hermes, f"Let me look.\n<tool_call>\n{paris}\n</tool_call>\nDone.")
    assert _accepts(auto, hermes, "```python\nprint('no call here')\n```")  # text is free until a call opens
    assert not _accepts(auto, hermes, '<tool_call>\n{"name": "get_time"')  # an undeclared function
    assert not _accepts(auto, hermes, '<tool_call>\n{"name": "send_email", "arguments": {"to": 5')  # a wrong type
    assert not _accepts(auto, hermes, '<tool_call>\n{"name": "send_email", "arguments": {"cc": ')  # no such field
    assert _accepts(auto, hermes, f"```json\n{paris}\n```")  # a call without the tag, as small models write it
    assert not _accepts(auto, hermes, '{"name": "get_time"')

    required = reply_grammar(hermes, tools, "required")  # after the forced prefix '<tool_call>\n{"name": "'
    assert _accepts(required, hermes, 'send_email", "arguments": {"to": "a@b.c", "urgent": true}}\n</tool_call>')
    assert not _accepts(required, hermes, 'get_time", ')
    named = reply_grammar(hermes, tools, {"type": "function", "function": {"name": "get_weather"}})
    assert _accepts(named, hermes, '{"city": "Oslo"}}')
    assert not _accepts(named, hermes, '{"to": "x"}')

    answer = {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}
    either = reply_grammar(hermes, tools, "auto", answer)
    assert _accepts(either, hermes, '{"summary": "sunny"}')
    assert _accepts(either, hermes, f"<tool_call>\n{paris}\n</tool_call>")
    assert not _accepts(either, hermes, "Sunny.")

    react = reply_grammar(tok, tools, "auto")  # Qwen v1: ReAct, a call opens at "\nAction:"
    assert _accepts(react, tok, 'Thought: look it up\nAction: get_weather\nAction Input: {"city": "Rome"}\n'
                                'Observation:')
    assert not _accepts(react, tok, "Thought: x\nAction: get_time")
    with pytest.raises(GrammarError, match="ReAct"):
        reply_grammar(tok, tools, "auto", answer)
    assert reply_grammar(tok, tools, "none") is None and reply_grammar(tok, None) is None


def test_server_response_format_and_strict_tools_through_the_openai_client(tok):
    openai = pytest.importorskip("openai")
    from qwenkit.server.app import Settings, create_app

    from .conftest import V1_TINY, live, tiny_model

    model = tiny_model(seed=3, scale=0.5, **{**V1_TINY, "max_position_embeddings": 1024})  # room for ReAct's prompt
    model.generation_config = {}
    with live(create_app(lambda: (model, tok), Settings(served_model_name="tiny", max_batch=2))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        for i, schema in enumerate(SCHEMAS[:3]):
            fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
            kwargs = dict(model="tiny", messages=[{"role": "user", "content": "data?"}], response_format=fmt,
                          max_tokens=230, temperature=1.0, seed=i)
            reply = client.chat.completions.create(**kwargs).choices[0]
            assert reply.finish_reason == "stop", reply
            jsonschema.validate(json.loads(reply.message.content), schema)
            streamed = "".join(c.choices[0].delta.content or "" for c in
                               client.chat.completions.create(**kwargs, stream=True) if c.choices)
            assert streamed == reply.message.content  # the same seed, the same text
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[3]}}
        choice = client.completions.create(model="tiny", prompt="x", max_tokens=200, temperature=1.0, seed=5,
                                           extra_body={"response_format": fmt}).choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), SCHEMAS[3])
        strict = {"type": "function", "function": {**EMAIL["function"], "strict": True}}
        for choice in ("required", {"type": "function", "function": {"name": "send_email"}}):
            calls = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "mail"}], tools=[WEATHER, strict],
                tool_choice=choice, max_tokens=200, temperature=1.0, seed=3).choices[0].message.tool_calls
            assert calls and calls[0].function.name in ("get_weather", "send_email")
            if calls[0].function.name == "send_email":
                jsonschema.validate(json.loads(calls[0].function.arguments), EMAIL["function"]["parameters"])

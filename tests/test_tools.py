"""Tool calling: ReAct (Qwen v1) and Hermes <tool_call> (Qwen2.5+) prompts and streaming parsers."""

import copy
import json

import pytest

from qwenkit.prompts import apply_chat_template, render_qwen_v1
from qwenkit.tools import (ContentDelta, HermesParser, PlainParser, ReActParser, ToolCallArgs, ToolCallStart,
                           build_prompt, forced_prefix, new_parser)

from .conftest import WEATHER

PARIS_CALL = {"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ROUND_TRIP = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "tool_calls": [PARIS_CALL]},
              {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'}]


def run(parser, chunks):
    """Feed chunks, finish, check the events agree with the calls; -> (content, [(name, args)], shape)."""
    events = [e for chunk in chunks for e in parser.feed(chunk)]
    tail, calls = parser.finish()
    events += tail
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [(s.index, s.id, s.name) for s in starts] == [(i, c.id, c.name) for i, c in enumerate(calls)]
    for i, call in enumerate(calls):
        assert call.id.startswith("call_") and len(call.id) == 29
        assert "".join(e.text for e in events if isinstance(e, ToolCallArgs) and e.index == i) == call.arguments
        json.loads(call.arguments)
    # The order of content and calls, with consecutive content pieces merged.
    shape = []
    for e in events:
        kind = type(e).__name__
        if not (shape and shape[-1] == kind == "ContentDelta"):
            shape.append(kind)
    return content, [(c.name, c.arguments) for c in calls], shape


def same_streamed(parser_class, text):
    """The result of one feed, checked to equal the result of feeding one character at a time."""
    whole = run(parser_class(), [text])
    assert run(parser_class(), list(text)) == whole
    return whole


# ----------------------------------------------------------------------------- Hermes parser

def test_hermes_one_call():
    content, calls, shape = same_streamed(
        HermesParser, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>')
    assert content == "" and shape == ["ToolCallStart", "ToolCallArgs"]
    assert calls == [("get_weather", json.dumps({"city": "北京"}, ensure_ascii=False))]


def test_hermes_two_calls_after_content():
    text = ('Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n')
    content, calls, shape = same_streamed(HermesParser, text)
    assert content == "Let me check both."  # the newlines around the calls are layout
    assert calls == [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
    assert shape == ["ContentDelta", "ToolCallStart", "ToolCallArgs", "ToolCallStart", "ToolCallArgs"]


def test_hermes_content_streams_before_the_call_completes():
    parser = HermesParser()
    assert parser.feed("Checking") == [ContentDelta("Checking")]
    assert parser.feed(" now <tool") == [ContentDelta(" now")]  # " <tool" could still become the tag
    assert parser.feed('_call>\n{"name": "f", "arguments": {"x": 1}}') == []
    events = parser.feed("\n</tool_call>")
    assert [type(e) for e in events] == [ToolCallStart, ToolCallArgs] and events[1].text == '{"x": 1}'


@pytest.mark.parametrize("body", ['{"name": "f", "arguments": {"x": 1}',  # cut short
                                  '{"arguments": {"x": 1}}',  # no name
                                  '{"name": "f", "arguments": "x=1"}'])  # arguments not an object
def test_hermes_broken_call_is_content(body):
    text = f"Hi\n<tool_call>\n{body}\n</tool_call>"
    assert same_streamed(HermesParser, text) == (text, [], ["ContentDelta"])


def test_hermes_broken_call_then_valid_call():
    text = '<tool_call>\nnot json\n</tool_call>\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    content, calls, shape = same_streamed(HermesParser, text)
    assert content == "<tool_call>\nnot json\n</tool_call>" and calls == [("f", "{}")]


def test_hermes_partial_tag_at_the_end_is_content():
    assert same_streamed(HermesParser, "The tag looks like <tool") == ("The tag looks like <tool", [],
                                                                       ["ContentDelta"])
    assert same_streamed(HermesParser, "Plain text.\n\n") == ("Plain text.\n\n", [], ["ContentDelta"])


def test_hermes_unterminated_call():
    # Cut off after complete JSON (the model stopped before </tool_call>): still a call.
    assert same_streamed(HermesParser, '<tool_call>\n{"name": "f", "arguments": {"a": [1, 2]}}')[1] == [
        ("f", '{"a": [1, 2]}')]
    # Cut off inside the JSON (max_tokens): the text comes back.
    assert same_streamed(HermesParser, '<tool_call>\n{"name": "f", "argu') == (
        '<tool_call>\n{"name": "f", "argu', [], ["ContentDelta"])


# ----------------------------------------------------------------------------- the shapes small models write

def declared(*names):
    return lambda: HermesParser(set(names))


def test_fenced_json_naming_a_declared_function_is_a_call():
    # What the demo (Qwen2.5-Coder-0.5B) writes under tool_choice auto.
    text = '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```'
    assert same_streamed(declared("get_weather"), text) == ("", [("get_weather", '{"city": "Paris"}')],
                                                            ["ToolCallStart", "ToolCallArgs"])
    text = 'Sure.\n\n```\n{"name": "get_weather", "parameters": {"city": "Oslo"}}\n```\nDone.'
    assert same_streamed(declared("get_weather"), text) == (
        "Sure.Done.", [("get_weather", '{"city": "Oslo"}')], ["ContentDelta", "ToolCallStart", "ToolCallArgs",
                                                              "ContentDelta"])


def test_bare_objects_lists_and_several_calls():
    parser = declared("get_weather", "get_time")
    one = '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}'  # arguments as JSON text
    assert same_streamed(parser, one)[1] == [("get_weather", '{"city": "Rome"}')]
    both = ('{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
            '{"name": "get_time", "arguments": {"zone": "CET"}}')
    assert same_streamed(parser, both)[1] == [("get_weather", '{"city": "Rome"}'), ("get_time", '{"zone": "CET"}')]
    listed = '```json\n[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_weather", ' \
             '"arguments": {"city": "B"}}]\n```'
    assert same_streamed(parser, listed)[1] == [("get_weather", '{"city": "A"}'), ("get_weather", '{"city": "B"}')]
    two_fences = listed.replace("[", "").replace("]", "").replace("}}, {", "}}\n```\n```json\n{")
    assert same_streamed(parser, two_fences)[1] == same_streamed(parser, listed)[1]


@pytest.mark.parametrize("text", [
    # ordinary code, even with a call-shaped line inside it
    'Here:\n```python\ndef f():\n    return 1\n{"name": "get_weather", "arguments": {}}\n```\nThat is all.',
    # JSON that names no declared function, or is no call at all
    '```json\n{"name": "get_stock", "arguments": {"ticker": "X"}}\n```',
    'Config:\n```json\n{"city": "Paris", "units": "metric"}\n```\n',
    '{"name": "get_weather"} is how a call starts, {"x": 1} too.',
    '```\nls -la {dir}\n```',
    # an unclosed fence or object: content as it was
    '```json\n{"name": "get_weather", "argu',
    'Use {braces',
])
def test_ordinary_text_and_code_are_never_calls(text):
    assert same_streamed(declared("get_weather"), text) == (text, [], ["ContentDelta"])


def test_code_streams_as_it_comes_and_a_call_waits_for_its_end():
    parser = HermesParser({"get_weather"})

    def content(chunk):
        return "".join(e.text for e in parser.feed(chunk))

    assert content("```py") == ""  # the fence's language is not known yet
    assert content("thon\nx = {") == "```python\nx = {"
    assert content("}\n") == "}"  # a newline could begin the closing fence
    assert content("```\n{") == "\n```"
    assert content('"name": "get_weather", "arguments": {}}') == ""  # alone on its line? not known yet
    events = parser.feed("\n")
    assert [type(e) for e in events] == [ToolCallStart, ToolCallArgs]
    assert parser.finish() == ([], parser._calls) and len(parser._calls) == 1


def test_tag_calls_still_take_any_name_and_new_parser_declares_the_tools(tok):
    text = '<tool_call>\n{"name": "anything", "arguments": {}}\n</tool_call>'
    assert same_streamed(declared("get_weather"), text)[1] == [("anything", "{}")]
    template = "{%- if tools %}{%- endif %}" + (tok.chat_template or "")
    hermes = copy.copy(tok)
    hermes.chat_template = template
    parser = new_parser(hermes, [WEATHER])
    assert isinstance(parser, HermesParser)
    assert run(parser, ['```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```'])[1] == [
        ("get_weather", '{"city": "Oslo"}')]


# ----------------------------------------------------------------------------- ReAct parser

def test_react_action():
    # Generation stopped at (and consumed) "Observation:".
    text = 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city":"巴黎"}\n'
    content, calls, shape = same_streamed(ReActParser, text)
    assert content == "I need the weather."
    assert calls == [("get_weather", '{"city": "巴黎"}')]
    assert shape == ["ContentDelta", "ToolCallStart", "ToolCallArgs"]
    assert ReActParser().stop == ["Observation:"]


def test_react_action_with_the_stop_word_left_in():
    text = 'Thought: x\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: sunny'
    assert same_streamed(ReActParser, text)[:2] == ("x", [("get_weather", '{"city": "Paris"}')])


def test_react_final_answer_streams():
    parser = ReActParser()
    assert parser.feed("Thought: I now know the final answer.\nFinal Ans") == []
    assert parser.feed("wer: It is") == [ContentDelta("It is")]
    assert parser.feed(" 3°C.") == [ContentDelta(" 3°C.")]
    assert parser.finish() == ([], [])
    assert same_streamed(ReActParser, "Thought: done\nFinal Answer: It is 3°C.") == ("It is 3°C.", [],
                                                                                      ["ContentDelta"])


def test_react_plain_text_and_broken_arguments_are_content():
    assert same_streamed(ReActParser, "Hello there!") == ("Hello there!", [], ["ContentDelta"])
    text = "Thought: hm\nAction: get_weather\nAction Input: city=Paris\n"
    assert same_streamed(ReActParser, text) == (text, [], ["ContentDelta"])


def test_new_parser_choice(tok):
    assert isinstance(new_parser(tok, [WEATHER]), ReActParser)
    assert isinstance(new_parser(tok, [WEATHER], "none"), PlainParser)
    assert isinstance(new_parser(tok, None), PlainParser)
    plain = new_parser(tok, [WEATHER], "none")
    assert plain.stop == [] and run(plain, ["<tool_call>", "x"]) == ("<tool_call>x", [], ["ContentDelta"])


# ----------------------------------------------------------------------------- ReAct prompt (Qwen v1)

# shared/reference/qwen-v1-spec.md §5.5, for WEATHER alone.
SPEC_INSTRUCTION = (
    "Answer the following questions as best you can. You have access to the following APIs:\n\n"
    "get_weather: Call this tool to interact with the get_weather API. What is the get_weather API useful "
    "for? Current weather in a city Parameters: "
    '{"type": "object", "properties": {"city": {"type": "string", "description": "城市"}}, "required": ["city"]}'
    "\n\nUse the following format:\n\n"
    "Question: the input question you must answer\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of [get_weather]\n"
    "Action Input: the input to the action\n"
    "Observation: the result of the action\n"
    "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
    "Thought: I now know the final answer\n"
    "Final Answer: the final answer to the original input question\n\n"
    "Begin!")


def chatml(system, *turns, open_turn=None):
    text = f"<|im_start|>system\n{system}<|im_end|>"
    for user, assistant in turns:
        text += f"\n<|im_start|>user\n{user}<|im_end|>"
        if assistant is not None:
            text += f"\n<|im_start|>assistant\n{assistant}<|im_end|>"
    return text + "\n<|im_start|>assistant\n" + (open_turn or "")


def test_react_prompt_matches_spec(tok):
    ids = build_prompt(tok, [{"role": "user", "content": "Weather in Paris?"}], [WEATHER])
    question = f"{SPEC_INSTRUCTION}\n\nQuestion: Weather in Paris?"
    assert tok.decode(ids) == chatml("You are a helpful assistant.", (question, None))
    assert ids == render_qwen_v1(tok, question)


def test_react_observation_continues_the_turn(tok):
    ids = build_prompt(tok, ROUND_TRIP, [WEATHER])
    open_turn = 'Thought: \nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: {"temp": 3}\nThought:'
    question = f"{SPEC_INSTRUCTION}\n\nQuestion: Weather in Paris?"
    assert tok.decode(ids) == chatml("You are a helpful assistant.", (question, None), open_turn=open_turn)
    assert ids[-1] != tok.im_end_id
    assert ids == render_qwen_v1(tok, question) + tok.encode(open_turn, allowed_special=set())
    # A system message after the tool result still leaves the turn open.
    late_system = build_prompt(tok, [*ROUND_TRIP, {"role": "system", "content": "Be brief."}], [WEATHER])
    assert tok.decode(late_system) == chatml("Be brief.", (question, None), open_turn=open_turn)


def test_react_history_and_systems_anywhere(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "system", "content": "Use metric units."},
                {"role": "user", "content": "Weather in Paris?"}]
    ids = build_prompt(tok, messages, [WEATHER])
    want = chatml("Be brief.\nUse metric units.",
                  ("Hi", "Thought: I now know the final answer.\nFinal Answer: Hello!"),
                  (f"{SPEC_INSTRUCTION}\n\nQuestion: Weather in Paris?", None))
    assert tok.decode(ids) == want
    # tool_choice "none": no instruction, and plain answers stay plain.
    assert tok.decode(build_prompt(tok, messages, [WEATHER], "none")) == chatml(
        "Be brief.\nUse metric units.", ("Hi", "Hello!"), ("Weather in Paris?", None))


def test_react_forced_call(tok):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    ids = build_prompt(tok, ROUND_TRIP[:1], [WEATHER], choice)
    assert tok.decode(ids).endswith("<|im_start|>assistant\nThought:")
    assert tok.decode(build_prompt(tok, ROUND_TRIP, [WEATHER], "required")).endswith('{"temp": 3}\nThought:')
    prefix = forced_prefix(tok, choice)
    assert prefix == "\nAction: get_weather\nAction Input:"
    assert forced_prefix(tok, "required") == "\nAction:" and forced_prefix(tok, "auto") is None
    assert run(new_parser(tok, [WEATHER], choice), [prefix, ' {"city": "Paris"}\n']) == (
        "", [("get_weather", '{"city": "Paris"}')], ["ToolCallStart", "ToolCallArgs"])


@pytest.mark.parametrize("messages,tools,choice,error", [
    ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], None, None, "start with a user"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}], [WEATHER], None, "must follow"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], None, None, "alternate"),
    ([{"role": "system", "content": "x"}], None, None, "at least one user"),
    ([{"role": "user", "content": "x"}], [WEATHER], {"type": "function", "function": {"name": "nope"}}, "nope"),
    ([{"role": "user", "content": "x"}], None, "required", "needs tools"),
    ([{"role": "user", "content": "x"}], [{"name": "f"}], None, "tools\\[0\\]"),
])
def test_bad_requests_name_the_problem(tok, messages, tools, choice, error):
    with pytest.raises(ValueError, match=error):
        build_prompt(tok, messages, tools, choice)


# ----------------------------------------------------------------------------- Qwen2.5 template (demo model)

@pytest.mark.real
def test_template_round_trip_equals_transformers(demo_tok, demo_hf_tok):
    ours, theirs = demo_tok, demo_hf_tok
    # What a transformers user writes: arguments as an object, content text.
    hf_messages = [{"role": "system", "content": "Be brief."}, ROUND_TRIP[0],
                   {"role": "assistant", "content": "", "tool_calls": [
                       {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                   {"role": "tool", "content": '{"temp": 3}'}]
    want = list(theirs.apply_chat_template(hf_messages, tools=[WEATHER], add_generation_prompt=True,
                                           tokenize=True, return_dict=False))
    assert build_prompt(ours, [hf_messages[0], *ROUND_TRIP], [WEATHER], "auto") == want
    # The legacy shape: function_call on the assistant and a function result.
    legacy = [hf_messages[0], ROUND_TRIP[0],
              {"role": "assistant", "content": None, "function_call": PARIS_CALL["function"]},
              {"role": "function", "name": "get_weather", "content": '{"temp": 3}'}]
    assert build_prompt(ours, legacy, [WEATHER]) == want
    # tool_choice "none" drops the tools section.
    plain = list(theirs.apply_chat_template(hf_messages[:2], add_generation_prompt=True, tokenize=True,
                                            return_dict=False))
    assert build_prompt(ours, hf_messages[:2], [WEATHER], "none") == plain


@pytest.mark.real
def test_template_forced_prefix_parses(demo_tok):
    ours = demo_tok
    assert isinstance(new_parser(ours, [WEATHER]), HermesParser)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    prefix = forced_prefix(ours, choice)
    assert prefix == '<tool_call>\n{"name": "get_weather", "arguments": '
    required = forced_prefix(ours, "required")
    assert required == '<tool_call>\n{"name": "'
    assert run(new_parser(ours, [WEATHER], "required"),
               [required, 'get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'])[1] == [
        ("get_weather", '{"city": "Paris"}')]
    assert run(new_parser(ours, [WEATHER], choice), [prefix, '{"city": "Paris"}}\n</tool_call>']) == (
        "", [("get_weather", '{"city": "Paris"}')], ["ToolCallStart", "ToolCallArgs"])


def test_tools_nested_too_deep_are_a_clear_error(tok):
    parameters = {"type": "object", "properties": {}}
    for _ in range(40):  # 80 levels
        parameters = {"type": "object", "properties": {"x": parameters}}
    tools = [{"type": "function", "function": {"name": "deep", "parameters": parameters}}]
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="nest deeper than 64 levels"):
        build_prompt(tok, messages, tools)
    templated = copy.copy(tok)
    templated.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}{{ tools }}"
    with pytest.raises(ValueError, match="nest deeper than 64 levels"):
        apply_chat_template(templated, messages, tools=tools)


def test_model_output_nested_too_deep_is_content_not_a_call():
    deep = "[" * 3000 + "]" * 3000
    content, calls, _ = run(HermesParser(), [f'<tool_call>\n{{"name": "f", "arguments": {{"x": {deep}}}}}\n</tool_call>'])
    assert calls == [] and content.count("[") == 3000

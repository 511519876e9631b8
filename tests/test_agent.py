"""qwenkit.agent and `qwenkit agent`: tool schemas from signatures, the built-in tools, the loop (driven by the
puppet model locally and behind the server, then by the real demo model), and the CLI's bad inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal, Optional

import pytest

from qwenkit.agent import (ANSWER, Agent, AgentError, Failure, LocalChat, ServerChat, builtin_tools, calculator,
                           load_tool, read_text_file, run_python, tool_schema)
from qwenkit.evals.sandbox import Limits
from qwenkit.tools import build_prompt

from .conftest import KEY, Puppet, live

jsonschema = pytest.importorskip("jsonschema")


# ----------------------------------------------------------------------------- schemas from signatures

def book(city: str, nights: int, budget: float = 100.0, breakfast: bool = False, tags: list[str] | None = None,
         room: Literal["single", "double"] = "double", extras: dict = None, note: Optional[str] = None) -> str:
    """Book a hotel room.

    Longer text that the model does not need.

    Args:
        city: where to stay
        nights (int): how many nights,
            at least one
        budget: most euros per night
    """
    return f"booked {city}"


def weather(city: str, unit: str = "celsius") -> str:
    """The weather in a city.

    :param city: the city's name
    :param str unit: celsius or fahrenheit
    """
    return f"sunny in {city}"


def test_schema_from_a_google_style_signature():
    assert tool_schema(book) == {"type": "function", "function": {
        "name": "book", "description": "Book a hotel room.", "parameters": {
            "type": "object", "required": ["city", "nights"], "properties": {
                "city": {"type": "string", "description": "where to stay"},
                "nights": {"type": "integer", "description": "how many nights, at least one"},
                "budget": {"type": "number", "description": "most euros per night"},
                "breakfast": {"type": "boolean"},
                "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
                "room": {"type": "string", "enum": ["single", "double"]},
                "extras": {"type": "object"},
                "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}}}
    parameters = tool_schema(book)["function"]["parameters"]
    jsonschema.Draft202012Validator.check_schema(parameters)
    jsonschema.validate({"city": "Oslo", "nights": 2, "tags": ["quiet"], "room": "single", "note": None}, parameters)
    for bad in ({"city": "Oslo"}, {"city": "Oslo", "nights": "2"}, {"city": "Oslo", "nights": 2, "room": "suite"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, parameters)


def test_schema_from_a_sphinx_style_docstring():
    function = tool_schema(weather)["function"]
    assert function["description"] == "The weather in a city."
    assert function["parameters"] == {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "the city's name"},
        "unit": {"type": "string", "description": "celsius or fahrenheit"}}}


def test_schemas_that_cannot_be_described_name_the_parameter():
    def untyped(x):
        return x

    def odd(when: complex):
        return when

    def varargs(*values: int):
        return values

    with pytest.raises(AgentError, match="parameter 'x' of untyped has no annotation"):
        tool_schema(untyped)
    with pytest.raises(AgentError, match="parameter 'when' of odd: unsupported annotation"):
        tool_schema(odd)
    with pytest.raises(AgentError, match="parameter 'values'.*args"):
        tool_schema(varargs)


# ----------------------------------------------------------------------------- --tool

def test_load_tool_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "mytools.py").write_text("def shout(text: str) -> str:\n    '''Upper-case text.'''\n"
                                         "    return text.upper()\n\ndef bad(x):\n    return x\n")
    assert load_tool(f"{tmp_path}/mytools.py:shout")("hi") == "HI"
    monkeypatch.syspath_prepend(str(tmp_path))
    assert tool_schema(load_tool("mytools:shout"))["function"]["description"] == "Upper-case text."
    for spec, words in [("nosuchmodule_xyz:f", "no module named 'nosuchmodule_xyz'"),
                        (f"{tmp_path}/missing.py:f", "no file"),
                        ("mytools:whisper", "has no function 'whisper' (it defines: bad, shout)"),
                        ("mytools:bad", "parameter 'x' of bad has no annotation"),
                        ("mytools", "module:function")]:
        with pytest.raises(AgentError, match=words.replace("(", r"\(").replace(")", r"\)")):
            load_tool(spec)


# ----------------------------------------------------------------------------- built-in tools

@pytest.mark.parametrize("expression, value", [
    ("832040 * 7", "5824280"), ("(2 + 3) * -4", "-20"), ("7 // 2 + 7 % 2", "4"), ("2 ** 10", "1024"),
    ("1 / 4", "0.25"), ("sqrt(16) + log(e)", "5.0"), ("round(sin(pi / 2), 6)", "1.0"), ("factorial(10)", "3628800"),
    ("max(1, 5, 3)", "5"), ("-2 ** 2", "-4")])
def test_calculator(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression, words", [
    ("__import__('os').system('ls')", "not an allowed function"), ("os.system('ls')", "not an allowed function"),
    ("x + 1", "unknown name 'x'"), ("(1).__class__", "not allowed"), ("open('f')", "not an allowed function"),
    ("sqrt.__globals__", "not allowed"), ("9 ** 9 ** 9", "too large"), ("2 ** 1000000", "too large"),
    ("factorial(100000)", "too large"), ("'a' * 3", "not allowed"), ("[1, 2]", "not allowed"),
    ("lambda: 1", "not allowed"), ("2 ^ 3", "write \\*\\*"), ("1 +", "not an arithmetic expression"),
    ("1" * 2000, "at most 1000")])
def test_calculator_refuses(expression, words):
    with pytest.raises(ValueError, match=words):
        calculator(expression)


def test_read_file_stays_inside_its_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "notes.txt").write_text("hello")
    (tmp_path / "secret.txt").write_text("secret")
    (root / "link").symlink_to(tmp_path / "secret.txt")
    (root / "big.txt").write_text("x" * (2 << 20))
    (root / "blob.bin").write_bytes(b"\xff\xfe\x00\x81")
    assert read_text_file("sub/notes.txt", root) == "hello"
    assert read_text_file("./sub/../sub/notes.txt", root) == "hello"
    for path, error, words in [("../secret.txt", PermissionError, "outside"),
                               (str(tmp_path / "secret.txt"), PermissionError, "outside"),
                               ("link", PermissionError, "outside"), ("sub", IsADirectoryError, "notes.txt"),
                               ("nothing.txt", FileNotFoundError, "no file"), ("big.txt", ValueError, "bytes"),
                               ("blob.bin", ValueError, "not a UTF-8 text file")]:
        with pytest.raises(error, match=words):
            read_text_file(path, root)
    with pytest.raises(AgentError, match="not a directory"):
        builtin_tools(tmp_path / "missing")


def test_python_runs_in_the_sandbox():
    assert run_python("x = 6\nx * 7") == "42"  # a last expression is echoed, as in a REPL
    assert run_python("print('a')\nNone") == "a"
    out = run_python("import os\nprint(os.getcwd())\nopen('f.txt', 'w').write('x')")
    assert "qwenkit-sandbox-" in out and out.endswith("1")
    assert "ZeroDivisionError" in run_python("1 / 0") and "_REPL" not in run_python("1 / 0")
    assert isinstance(run_python("1 / 0"), Failure) and not isinstance(run_python("1"), Failure)
    assert "SyntaxError" in run_python("x = 1}")
    assert "truncated" in run_python("print('y' * 10000)")
    assert run_python("pass").startswith("[no output")
    assert "timed out" in run_python("while True: pass", Limits(timeout_s=1))


# ----------------------------------------------------------------------------- the loop, scripted

def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first
        b: the second
    """
    return a * b


def broken(text: str) -> str:
    """Always fails."""
    raise RuntimeError(f"cannot handle {text!r}")


class Script:
    """Sets the puppet's reply to each prompt the agent sends (the prompt built as LocalChat and the server do)."""

    def __init__(self, puppet, tok, replies):
        self.puppet, self.tok, self.replies = puppet, tok, list(replies)

    def __call__(self, messages, tools):
        self.puppet.prompt_len = len(build_prompt(self.tok, messages, tools))
        self.puppet.script = self.tok.encode(self.replies.pop(0)) + [self.tok.im_end_id]


def react_call(name, arguments):
    return f"Thought: use {name}\nAction: {name}\nAction Input: {json.dumps(arguments)}\nObservation:"


# Calls to undeclared tools or without required arguments cannot be written here: the grammar holds the puppet's
# calls to the tools' schemas, locally and on the server (see test_bad_calls_become_tool_results).
REPLIES = [react_call("multiply", {"a": 832040, "b": 7}), react_call("broken", {"text": "x"}),
           "Thought: I now know the final answer.\nFinal Answer: 5824280"]


def run_scripted(chat, script, seen):
    original = chat.reply

    def reply(messages, tools, on_text):
        script(messages, tools)
        return original(messages, tools, on_text)

    chat.reply = reply
    agent = Agent(chat, [multiply, broken], system=None, on_text=seen.append,
                  on_result=lambda name, result: seen.append((name, result)))
    return agent, agent.ask("what is 832040 times 7?")


def check_scripted(agent, answer, seen):
    assert answer == "5824280" and "5824280" in seen
    results = [item for item in seen if isinstance(item, tuple)]
    assert results[0] == ("multiply", "5824280")
    assert results[1] == ("broken", "error: RuntimeError: cannot handle 'x'")
    tool_messages = [m for m in agent.messages if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages] == [r for _, r in results]
    calls = [m["tool_calls"][0] for m in agent.messages if m.get("tool_calls")]
    assert [m["tool_call_id"] for m in tool_messages] == [c["id"] for c in calls]


@pytest.fixture(scope="module")
def puppet(tok):
    return Puppet(tok.vocab_size)


def test_loop_runs_tools_and_returns_errors_to_the_model(puppet, tok):
    seen = []
    agent, answer = run_scripted(LocalChat(puppet, tok, temperature=0), Script(puppet, tok, REPLIES), seen)
    check_scripted(agent, answer, seen)


def test_bad_calls_become_tool_results():
    agent = Agent(None, [multiply, broken])
    assert agent.run_tool("nosuch", "{}") == "error: there is no tool 'nosuch'; the tools are: multiply, broken"
    assert "missing a required argument: 'b'" in agent.run_tool("multiply", '{"a": 1}')
    assert "not JSON" in agent.run_tool("multiply", '{"a": ')
    assert agent.run_tool("multiply", '{"a": 2, "b": 3}') == "6"


def test_loop_stops_at_max_steps(puppet, tok):
    chat = LocalChat(puppet, tok, temperature=0)
    script = Script(puppet, tok, [react_call("multiply", {"a": 2, "b": b}) for b in (3, 4)])  # new calls each time
    original = chat.reply
    chat.reply = lambda messages, tools, on_text: (script(messages, tools), original(messages, tools, on_text))[1]
    with pytest.raises(AgentError, match="no answer after 2 steps.*--max-steps"):
        Agent(chat, [multiply], system=None, max_steps=2).ask("2 times 3?")


def scripted_agent(puppet, tok, tools, replies):
    """An agent over the puppet replying `replies` in turn; also the results it ran and the messages each answer
    turn (Agent.answer) was given."""
    chat = LocalChat(puppet, tok, temperature=0)
    script = Script(puppet, tok, replies)
    reply, answer, asked, ran = chat.reply, chat.answer, [], []
    chat.reply = lambda messages, tools, on_text: (script(messages, tools), reply(messages, tools, on_text))[1]
    chat.answer = lambda messages, on_text: (script(messages, None), asked.append(messages),
                                             answer(messages, on_text))[2]
    return Agent(chat, tools, system=None, on_result=lambda name, result: ran.append(result)), ran, asked


def test_a_repeated_call_is_answered_from_the_results(puppet, tok):
    """A reply that only repeats a call already made is not run again: the model answers from the results it
    has, told so, with no tools offered and calls ruled out."""
    agent, ran, asked = scripted_agent(puppet, tok, [multiply],
                                       [react_call("multiply", {"a": 832040, "b": 7})] * 2 + ["5824280"])
    assert agent.ask("what is 832040 times 7?") == "5824280" and ran == ["5824280"]
    assert asked[0][0] == {"role": "system", "content": ANSWER} and asked[0][-1]["content"] == "5824280"
    assert agent.messages[-1] == {"role": "assistant", "content": "5824280"}


def evaluate(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: the expression
    """
    return str(calculator(expression))


def test_a_broken_copy_of_a_call_that_worked_is_taken_back(puppet, tok):
    """A reply whose calls fail as edited copies of a call that worked (the demo breaks the program it just ran)
    is taken back: the model answers from the result that worked, the broken call out of its view. A failed call
    that copies no success stays, for the model to mend."""
    agent, ran, asked = scripted_agent(puppet, tok, [evaluate], [
        react_call("evaluate", {"expression": "(832040 * 7"}),  # fails, stays
        react_call("evaluate", {"expression": "832040 * 7"}),   # works
        react_call("evaluate", {"expression": "832040 * 7)"}),  # a broken copy
        "5824280"])
    assert agent.ask("what is 832040 times 7?") == "5824280"
    assert len(ran) == 3 and isinstance(ran[0], Failure) and ran[1] == "5824280" and isinstance(ran[2], Failure)
    seen = [m["content"] for m in asked[0] if m["role"] == "tool"]
    assert seen == [ran[0], "5824280"]  # the first failure kept, the broken copy taken back
    assert [m["content"] for m in agent.messages if m["role"] == "tool"] == seen


def test_loop_through_the_server_and_the_openai_client(puppet, tok):
    pytest.importorskip("openai")
    from qwenkit.server import Settings, create_app

    settings = Settings(served_model_name="tiny", api_key=KEY)
    with live(create_app(lambda: (puppet, tok), settings)) as url:
        seen = []
        chat = ServerChat(url, api_key=KEY, temperature=0)
        assert chat.model_name == "tiny"
        agent, answer = run_scripted(chat, Script(puppet, tok, REPLIES), seen)
    check_scripted(agent, answer, seen)


def test_the_openai_agents_sdk_runs_a_tool_through_the_server(puppet, tok):
    """examples/agent_openai_agents.py's setup: the SDK's Chat Completions model pointed at the server. A
    required tool choice makes the server constrain the call, so even the random puppet calls the tool."""
    sdk = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    from qwenkit.server import Settings, create_app

    calls = []

    @sdk.function_tool
    def paint(color: Literal["red", "blue"]) -> str:
        """Paint the wall.

        Args:
            color: the paint's color
        """
        calls.append(color)
        return f"painted {color}"

    sdk.set_tracing_disabled(True)
    puppet.script = None  # unscripted: the grammar alone makes its reply a call
    with live(create_app(lambda: (puppet, tok), Settings(served_model_name="tiny"))) as url:
        model = sdk.OpenAIChatCompletionsModel("tiny", AsyncOpenAI(base_url=f"{url}/v1", api_key="none"))
        # The SDK sends tool_choice "required" on the first turn only (reset_tool_choice), so the second ends.
        # max_tokens leaves room for the whitespace the grammar lets a random model write inside the call.
        settings = sdk.ModelSettings(tool_choice="required", temperature=0, max_tokens=64)
        agent = sdk.Agent(name="painter", instructions="Paint the wall.", tools=[paint], model=model,
                          model_settings=settings)
        result = sdk.Runner.run_sync(agent, "paint it", max_turns=2)
    assert len(calls) == 1 and calls[0] in ("red", "blue")
    outputs = [item.output for item in result.new_items if item.type == "tool_call_output_item"]
    assert outputs == [f"painted {calls[0]}"]
    assert isinstance(result.final_output, str)


# ----------------------------------------------------------------------------- the CLI

def qwenkit(*argv, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.run([sys.executable, "-m", "qwenkit", "agent", *argv], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_cli_bad_inputs_fail_before_loading(tmp_path):
    (tmp_path / "t.py").write_text("def f(x):\n    return x\n")
    for argv, words in [(["--root", str(tmp_path / "missing"), "hi"], "is not a directory"),
                        (["--tool", "nosuchmodule_xyz:f", "hi"], "no module named 'nosuchmodule_xyz'"),
                        (["--tool", "t.py:g", "hi"], "has no function 'g'"),
                        (["--tool", "t.py:f", "hi"], "parameter 'x' of f has no annotation"),
                        (["--no-builtin-tools", "hi"], "needs at least one --tool")]:
        out = qwenkit("-m", str(tmp_path / "no-model"), *argv, cwd=tmp_path)
        assert out.returncode == 2 and words in out.stderr, out.stderr


# ----------------------------------------------------------------------------- the real model

@pytest.mark.real
def test_demo_computes_with_the_python_tool(demo_path):
    out = qwenkit("-m", "demo", "--temperature", "0", "--max-steps", "3", "what is the 30th Fibonacci number times 7")
    # The 0.5B demo writes the right program and the python tool runs it (calls and results go to stderr off a
    # terminal). Greedy, it then calls again with an edited copy of the program that fails; the agent takes that
    # back and asks for the answer from the result that worked.
    assert "→ python" in out.stderr and "← 5824280" in out.stderr, out.stderr
    assert "5824280" in out.stdout.replace(",", ""), (out.stdout[-300:], out.stderr[-600:])

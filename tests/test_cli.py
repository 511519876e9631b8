"""The command line, driven as a user drives it: a subprocess with piped standard input."""

import json
import re
import subprocess
import sys

import pytest

import qwenkit


def qwenkit_cli(*args, stdin="", timeout=600):
    return subprocess.run([sys.executable, "-m", "qwenkit", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={"QWENKIT_NO_PROGRESS": "1", **_env()})


def _env():
    import os
    return {k: v for k, v in os.environ.items()}


def test_help_and_version():
    out = qwenkit_cli("--help")
    assert out.returncode == 0 and "chat" in out.stdout and "bench" in out.stdout
    assert qwenkit_cli("--version").stdout.strip() == f"qwenkit {qwenkit.__version__}"
    chat_help = qwenkit_cli("chat", "--help").stdout
    for flag in ("-m", "--system", "--temperature", "--top-p", "--top-k", "--max-new-tokens", "--seed",
                 "--device", "--dtype"):
        assert flag in chat_help


def test_missing_model_is_a_clear_error(tmp_path):
    out = qwenkit_cli("chat", "-m", str(tmp_path / "nope"), stdin=":exit\n")
    assert out.returncode == 2
    assert "does not exist: pass a checkpoint directory" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.real
def test_chat_session_with_history(demo_path, demo_tok):
    introduction = "My name is Alice and I live in Paris. Reply with one word: OK."
    question = "What is my name? Answer with the name only."
    script = "\n".join([
        ":conf temperature=0 repetition_penalty=1.0",
        ":verbose",  # each reply's prompt length goes to stderr
        introduction,
        question,
        ":history",
        ":clear-history",
        question,
        ":exit",
        "this line is never read",
    ]) + "\n"
    first = qwenkit_cli("chat", "-m", "demo", "--max-new-tokens", "24", stdin=script)
    assert first.returncode == 0, first.stderr
    remembered, forgotten = first.stdout.split("[history cleared]\n")
    history = remembered[remembered.index("User[0]: "):]
    assert history.startswith(f"User[0]: {introduction}\nQwen[0]: ")
    first_reply = history.split("\nQwen[0]: ")[1].split("\nUser[1]: ")[0]
    second_reply = history.split("\nQwen[1]: ")[1]  # what the model said when asked the first time
    # The prompts that reached the model: the question with the first turn before it, then, after
    # :clear-history, alone.
    user, assistant = ({"role": "user", "content": introduction}, {"role": "assistant", "content": first_reply})
    asked = {"role": "user", "content": question}
    want = [demo_tok.apply_chat_template(m) for m in ([user], [user, assistant, asked], [asked])]
    assert re.findall(r"\[(\d+) prompt tokens", first.stderr) == [str(len(ids)) for ids in want], first.stderr
    assert "Alice" in second_reply  # recalled from the first turn
    assert "Alice" not in forgotten  # forgotten after :clear-history
    again = qwenkit_cli("chat", "-m", "demo", "--max-new-tokens", "24", stdin=script)
    assert again.stdout == first.stdout  # temperature 0 set with :conf makes replies deterministic


@pytest.mark.real
def test_generate_and_bench(demo_path):
    out = qwenkit_cli("generate", "-m", "demo", "--prompt", "def add(a, b):", "--temperature", "0",
                      "--max-new-tokens", "8", "--stream")
    # The same greedy words as the Python API on the same default path (they differ between CPU classes).
    model, tok = qwenkit.load("demo")
    want = qwenkit.generate(model, tok, "def add(a, b):", temperature=0, max_new_tokens=8).text
    assert out.returncode == 0 and out.stdout == want + "\n", (out.stdout, want, out.stderr)
    bench = qwenkit_cli("bench", "-m", "demo", "--prompt-tokens", "32", "--new-tokens", "8", "--json")
    assert bench.returncode == 0, bench.stderr
    result = json.loads(bench.stdout)
    assert {"prefill_tok_s", "decode_tok_s", "ttft_s", "gb_per_s", "peak_rss_mib"} <= set(result)


def test_bench_on_a_model_with_a_small_vocabulary(tmp_path, capsys):
    """The synthetic prompt's ids come from the model's vocabulary (here 320 ids, below the 1000-20000 drawn for a
    Qwen vocabulary)."""
    from safetensors.torch import save_file

    from qwenkit.cli import main

    from .conftest import BYTE_VOCAB, tiny_model, write_byte_tokenizer

    model = tiny_model(**BYTE_VOCAB)
    directory = write_byte_tokenizer(tmp_path / "byte")
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    assert main(["bench", "-m", str(directory), "--prompt-tokens", "16", "--new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decode_tok_s"] > 0


@pytest.mark.real
def test_draft_model_on_the_command_line(demo_path):
    """The demo drafting for itself: the same greedy text as without, and bench reports the drafts."""
    args = ("-m", "demo", "--prompt", "def add(a, b):", "--temperature", "0", "--max-new-tokens", "12")
    plain = qwenkit_cli("generate", *args)
    drafted = qwenkit_cli("generate", *args, "--draft", "demo", "--draft-tokens", "3")
    assert drafted.returncode == 0 and drafted.stdout == plain.stdout, (drafted.stdout, plain.stdout, drafted.stderr)
    bench = qwenkit_cli("bench", "-m", "demo", "--draft", "demo", "--prompt", "Write a Python function adding two "
                        "numbers.", "--new-tokens", "12", "--json")
    result = json.loads(bench.stdout)
    assert result["draft"] == "demo, 4 tokens" and result["draft_steps"] > 0 and result["draft_speedup"] > 0
    # The same weights, but one-token steps and the checking forward take other kernels: near-ties may differ.
    assert 0.5 < result["draft_acceptance"] <= 1


@pytest.mark.real
def test_bench_measures_what_a_grammar_costs(demo_path):
    schema = '{"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}'
    bench = qwenkit_cli("bench", "-m", "demo", "--prompt", "Name a colour, as JSON.", "--new-tokens", "24",
                        "--json-schema", schema, "--json")
    result = json.loads(bench.stdout)
    assert 2 <= result["grammar_new_tokens"] <= 24 and result["grammar_decode_tok_s"] > 0
    assert {"grammar_ratio", "grammar_ms_per_token"} <= set(result)
    bad = qwenkit_cli("bench", "-m", "demo", "--json-schema", '{"type": "nonsense"}')
    assert bad.returncode == 2 and "schema" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_draft_options_are_checked_before_loading(tmp_path):
    for flags, message in ((("--lookup", "2", "--draft", "demo"), "give one of them"),
                           (("--draft", "demo", "--draft-tokens", "0"), "--draft-tokens must be at least 1"),
                           (("--lookup", "-1"), "--lookup must be 0")):
        out = qwenkit_cli("generate", "-m", str(tmp_path / "nope"), "--prompt", "x", *flags)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr

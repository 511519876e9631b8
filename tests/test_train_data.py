"""Fine-tuning data: the seed's Qwen v1 label mask, training prompts equal to inference prompts,
templated models (Qwen2.5, a history-rewriting template), bad records with file and line, collate."""

import copy
import json

import pytest
import torch

from qwenkit.prompts import apply_chat_template
from qwenkit.errors import DataError
from qwenkit.tools import build_prompt
from qwenkit.train import Example, collate, load_dataset

from .conftest import WEATHER

IGNORE = -100


def write(path, records, jsonl=False):
    if jsonl:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def seed_preprocess(tok, conversation, system="You are a helpful assistant."):
    """spec §7.2, written from its text: the seed's input ids and targets for one conversation."""
    im_start, im_end = 151644, 151645
    nl = tok.encode("\n")
    roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    ids = [im_start] + tok.encode("system") + nl + tok.encode(system) + [im_end] + nl
    target = [im_start] + [IGNORE] * (len(ids) - 3) + [im_end] + nl
    for turn in conversation:
        role = roles[turn["from"]]
        value = tok.encode(turn["value"])
        segment = tok.encode(role) + nl + value + [im_end] + nl
        if turn["from"] == "user":
            segment_target = [im_start] + [IGNORE] * (len(segment) - 3) + [im_end] + nl
        else:
            segment_target = [im_start] + [IGNORE] * 2 + value + [im_end] + nl
        ids, target = ids + segment, target + segment_target
    return ids, target


TWO_TURNS = [{"from": "user", "value": "你好，介绍一下你自己"}, {"from": "assistant", "value": "我是通义千问。"},
             {"from": "user", "value": "What is 2+2?"}, {"from": "assistant", "value": "2 + 2 = 4.\n\nAnything else?"}]


def as_messages(conversation):
    return [{"role": t["from"], "content": t["value"]} for t in conversation]


def test_v1_labels_equal_the_seed_rule(tok, tmp_path):
    examples, stats = load_dataset(write(tmp_path / "c.json", [{"id": "identity_0", "conversations": TWO_TURNS}]),
                                   tok, max_length=512)
    want_ids, want_labels = seed_preprocess(tok, TWO_TURNS)
    assert examples[0].input_ids == want_ids
    assert examples[0].labels == want_labels  # position by position
    assert (stats.records, stats.examples, stats.truncated, stats.skipped) == (1, 1, 0, 0)
    assert stats.label_tokens == sum(label != IGNORE for label in want_labels)


def assert_prompts_are_prefixes(tok, messages, example, tools=None):
    """Each assistant reply follows exactly the inference prompt of the conversation before it (with
    tools, the prompt the server builds from OpenAI messages)."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            if tools:
                prompt = build_prompt(tok, messages[:i], tools)
            else:
                prompt = apply_chat_template(tok, messages[:i], add_generation_prompt=True)
            assert example.input_ids[:len(prompt)] == prompt
            assert example.labels[len(prompt) - 1] == IGNORE  # the prompt's last token is context only


def test_v1_training_prompt_equals_inference_prompt(tok, tmp_path):
    messages = [{"role": "system", "content": "你是一个助手。"}] + as_messages(TWO_TURNS)
    examples, _ = load_dataset(write(tmp_path / "m.jsonl", [{"messages": messages}], jsonl=True), tok, 512)
    assert_prompts_are_prefixes(tok, messages, examples[0])
    # With a system message given, the seed's segments carry it instead of the default one.
    ids, labels = seed_preprocess(tok, TWO_TURNS, system="你是一个助手。")
    assert (examples[0].input_ids, examples[0].labels) == (ids, labels)


def trained_text(tok, example):
    """The trained tokens, decoded run by run."""
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    return runs + ([tok.decode(run)] if run else [])


TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in 北京?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 3}"},
    {"role": "assistant", "content": "It is 3 °C in Beijing."}]


@pytest.mark.real
def test_qwen25_template_training_prompt_equals_inference_prompt(demo_tok, tmp_path):
    tok = demo_tok
    messages = as_messages(TWO_TURNS)
    records = [{"messages": messages}, {"messages": TOOL_CONVERSATION, "tools": [WEATHER]}]
    examples, stats = load_dataset(write(tmp_path / "m.jsonl", records, jsonl=True), tok, 4096)
    assert stats.examples == 2
    assert_prompts_are_prefixes(tok, messages, examples[0])
    assert_prompts_are_prefixes(tok, TOOL_CONVERSATION, examples[1], tools=[WEATHER])
    # Trained: each reply and its <|im_end|>; not the "\n" the template writes after it.
    assert trained_text(tok, examples[0]) == ["我是通义千问。<|im_end|>", "2 + 2 = 4.\n\nAnything else?<|im_end|>"]
    assert trained_text(tok, examples[1]) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>',
        "It is 3 °C in Beijing.<|im_end|>"]
    full = apply_chat_template(tok, messages, add_generation_prompt=False)
    assert examples[0].input_ids == full  # the whole conversation as the template writes it


# A template that, like Qwen3's, drops the reasoning of replies before the last one.
HISTORY_REWRITING = (
    "{%- for m in messages %}{%- if m.role == 'assistant' and not loop.last %}"
    "{{ '<|im_start|>assistant\\n' + m.content.split('</think>')[-1].lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")


def test_history_rewriting_template_gives_one_example_per_reply(tok, tmp_path):
    tok = copy.copy(tok)  # the session's tokenizer, given another template
    tok.chat_template = HISTORY_REWRITING
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>easy</think>2"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>also</think>4"},
                {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    examples, stats = load_dataset(write(tmp_path / "m.jsonl", [{"messages": messages}], jsonl=True), tok, 512)
    # Each later reply's prompt shows the reply before it without its reasoning: a new example each time.
    assert stats.examples == len(examples) == 3
    for n, example in zip((1, 3, 5), examples):
        assert_prompts_are_prefixes(tok, messages[:n + 1], example)
        assert example.input_ids == apply_chat_template(tok, messages[:n + 1], add_generation_prompt=False)
    assert trained_text(tok, examples[0]) == ["<think>easy</think>2<|im_end|>"]
    assert trained_text(tok, examples[1]) == ["<think>also</think>4<|im_end|>"]


def test_bad_records_name_file_and_line(tok, tmp_path):
    good = {"conversations": TWO_TURNS[:2]}
    lines = [json.dumps(good),
             '{"conversations": [ oops',
             json.dumps({"conversations": [{"from": "bot", "value": "hi"}, {"from": "assistant", "value": "x"}]}),
             json.dumps({"conversations": [{"from": "user", "value": "a"}, {"from": "user", "value": "b"}]}),
             json.dumps({"conversations": [{"from": "user", "value": 3}, {"from": "assistant", "value": "x"}]}),
             json.dumps({"conversations": []}),
             json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}),
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
             json.dumps({"text": "plain"}),
             "",
             json.dumps(good)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON.*skip-bad"):
        load_dataset(path, tok, 512)
    examples, stats = load_dataset(path, tok, 512, skip_bad=True)
    assert (stats.records, stats.examples, stats.skipped) == (10, len(examples), 8) == (10, 2, 8)
    expected = [(2, "not valid JSON"), (3, "unknown role 'bot'"), (4, "user turn follows a user turn"),
                (5, "string values"), (6, "non-empty list"), (7, "must start with a user turn"),
                (8, "must end with an assistant reply"), (9, "neither 'conversations'")]
    for error, (line, why) in zip(stats.skipped_errors, expected):
        assert error.startswith(f"{path}:{line}: ") and why in error, error
    assert "8 bad records skipped" in stats.summary()


def test_bad_record_in_json_array_names_its_first_line(tok, tmp_path):
    records = [{"id": "a", "conversations": TWO_TURNS[:2]}, {"id": "b", "conversations": [
        {"from": "user", "value": "x"}, {"from": "system", "value": "late"}]}]
    path = write(tmp_path / "c.json", records)
    lines = path.read_text().splitlines()
    start = [n for n, line in enumerate(lines, 1) if line == "  {"][1]  # the second record's opening line
    with pytest.raises(DataError, match=rf"{path}:{start}: a system message may only come first"):
        load_dataset(path, tok, 512)
    path.write_text(path.read_text().replace('"late"', "'late'"))
    late = next(n for n, line in enumerate(lines, 1) if "late" in line)
    with pytest.raises(DataError, match=rf"{path}:{late}: not valid JSON.*cannot be skipped"):
        load_dataset(path, tok, 512, skip_bad=True)


def test_v1_rejects_tool_calls(tok, tmp_path):
    path = write(tmp_path / "t.jsonl", [{"messages": TOOL_CONVERSATION}], jsonl=True)
    with pytest.raises(DataError, match=r":1: tool calls need a chat template.*ReAct"):
        load_dataset(path, tok, 512)


def test_truncation_and_weight_zero(tok, tmp_path):
    long = {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "word " * 100}]}
    messages = as_messages(TWO_TURNS)
    messages[1]["weight"] = 0
    path = write(tmp_path / "m.jsonl", [long, {"messages": messages}], jsonl=True)
    examples, stats = load_dataset(path, tok, max_length=64)
    assert stats.truncated == 1 and len(examples[0].input_ids) == len(examples[0].labels) == 64
    full = load_dataset(path, tok, max_length=4096)[0][0]
    assert examples[0].input_ids == full.input_ids[:64] and examples[0].labels == full.labels[:64]
    assert "我是通义千问" not in "".join(trained_text(tok, examples[1]))  # weight 0: not trained
    assert "Anything else?" in "".join(trained_text(tok, examples[1]))


def test_collate_pads_right():
    batch = collate([Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert batch["input_ids"].dtype == torch.long

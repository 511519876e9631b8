"""Structured output on a served model: 20 JSON schemas through the openai client, and what a grammar costs.

    python benchmarks/structured.py [--model demo] [--json out.json]

Starts `qwenkit serve -m MODEL`, then for each of 20 schemas (nested objects, arrays, enums, required
fields, numbers with ranges, $ref, anyOf) asks the openai client for a reply with response_format
json_schema (strict), once plain and once streamed, greedy, and validates each reply with jsonschema.
The speed of the grammar: decode tok/s of each streamed reply (tokens after the first over the time
after the first), against the same prompt answered without response_format, taking turns; the table
prints both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0,
                                                                                "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
CASES = [
    ("Describe Ada Lovelace.", PERSON),
    ("List three primary colors.", {"type": "object", "properties": {"colors": {"type": "array", "items": {
        "enum": ["red", "yellow", "blue", "green"]}, "minItems": 3, "maxItems": 3}}, "required": ["colors"],
        "additionalProperties": False}),
    ("Give the coordinates of Paris.", {"type": "object", "properties": {
        "lat": {"type": "number", "minimum": -90, "maximum": 90},
        "lon": {"type": "number", "minimum": -180, "maximum": 180}}, "required": ["lat", "lon"],
        "additionalProperties": False}),
    ("Is Python compiled or interpreted?", {"type": "object", "properties": {
        "answer": {"enum": ["compiled", "interpreted", "both"]}, "reason": {"type": "string", "maxLength": 200}},
        "required": ["answer", "reason"], "additionalProperties": False}),
    ("Make a todo list for a trip.", {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"task": {"type": "string"}, "done": {"type": "boolean"}},
        "required": ["task", "done"], "additionalProperties": False}, "minItems": 1, "maxItems": 5}},
        "required": ["items"], "additionalProperties": False}),
    ("Summarize the plot of Hamlet.", {"type": "object", "properties": {
        "title": {"type": "string"}, "summary": {"type": "string", "maxLength": 400},
        "characters": {"type": "array", "items": {"type": "string"}, "maxItems": 6}},
        "required": ["title", "summary", "characters"], "additionalProperties": False}),
    ("Rate the movie Inception.", {"type": "object", "properties": {
        "stars": {"type": "integer", "minimum": 1, "maximum": 5}, "review": {"type": "string", "maxLength": 300}},
        "required": ["stars", "review"], "additionalProperties": False}),
    ("Describe a book you like.", {"type": "object", "properties": {"book": {"type": "object", "properties": {
        "title": {"type": "string"}, "author": PERSON, "year": {"type": "integer", "minimum": 1400, "maximum": 2030}},
        "required": ["title", "author", "year"], "additionalProperties": False}}, "required": ["book"],
        "additionalProperties": False}),
    ("What is 17 times 23?", {"type": "object", "properties": {"result": {"type": "integer"}},
                              "required": ["result"], "additionalProperties": False}),
    ("Convert 100 Fahrenheit to Celsius.", {"type": "object", "properties": {
        "celsius": {"type": "number"}, "formula": {"type": "string", "maxLength": 100}},
        "required": ["celsius", "formula"], "additionalProperties": False}),
    ("Name the planets of the solar system.", {"type": "array", "items": {"type": "string"}, "minItems": 8,
                                               "maxItems": 8}),
    ("Classify this email: 'You won a prize, click here!'", {"type": "object", "properties": {
        "label": {"enum": ["spam", "ham"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["label", "confidence"], "additionalProperties": False}),
    ("Describe the HTTP GET request for the homepage of example.com.", {"type": "object", "properties": {
        "method": {"const": "GET"}, "url": {"type": "string"}, "headers": {"type": "object", "additionalProperties": {
            "type": "string"}}}, "required": ["method", "url", "headers"], "additionalProperties": False}),
    ("Give a recipe for pancakes.", {"type": "object", "properties": {
        "ingredients": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "grams": {"type": "number", "minimum": 0}}, "required": ["name", "grams"],
            "additionalProperties": False}, "maxItems": 8},
        "steps": {"type": "array", "items": {"type": "string"}, "maxItems": 8}},
        "required": ["ingredients", "steps"], "additionalProperties": False}),
    ("Describe a family tree of two generations.", {"$defs": {"member": {"type": "object", "properties": {
        "name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/member"},
                                                 "maxItems": 3}}, "required": ["name", "children"],
        "additionalProperties": False}}, "$ref": "#/$defs/member"}),
    ("Should I bring an umbrella today in London?", {"anyOf": [
        {"type": "object", "properties": {"umbrella": {"const": True}, "why": {"type": "string"}},
         "required": ["umbrella", "why"], "additionalProperties": False},
        {"type": "object", "properties": {"umbrella": {"const": False}}, "required": ["umbrella"],
         "additionalProperties": False}]}),
    ("Write a Python function signature for sorting a list.", {"type": "object", "properties": {
        "name": {"type": "string", "pattern": "^[a-z_][a-z0-9_]*$"}, "params": {"type": "array", "items": {
            "type": "string"}}, "returns": {"type": "string"}}, "required": ["name", "params", "returns"],
        "additionalProperties": False}),
    ("What time zone is Tokyo in?", {"type": "object", "properties": {
        "zone": {"type": "string"}, "utc_offset_hours": {"type": "integer", "minimum": -12, "maximum": 14}},
        "required": ["zone", "utc_offset_hours"], "additionalProperties": False}),
    ("Pick a random number and say if it is prime.", {"type": "object", "properties": {
        "number": {"type": "integer", "minimum": 2, "maximum": 1000}, "prime": {"type": "boolean"}},
        "required": ["number", "prime"], "additionalProperties": False}),
    ("Describe the weather forecast for three days.", {"type": "object", "properties": {"days": {
        "type": "array", "items": {"type": "object", "properties": {
            "day": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
            "high_c": {"type": "number", "minimum": -50, "maximum": 60}, "rain": {"type": "boolean"}},
            "required": ["day", "high_c", "rain"], "additionalProperties": False}, "minItems": 3, "maxItems": 3}},
        "required": ["days"], "additionalProperties": False}),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def streamed(client, **kwargs) -> tuple[str, float | None, int]:
    """(text, decode tok/s after the first token, tokens) of one streamed reply."""
    text, times = "", []
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            times.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    rate = (tokens - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    return text, rate, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--max-tokens", type=int, default=400, help="a constrained reply's limit")
    parser.add_argument("--free-tokens", type=int, default=100, help="the unconstrained reply's, timed alike")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    import jsonschema
    import openai

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "qwenkit", "serve", "-m", args.model, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if b"ok" in r.read():
                        break
            except OSError:
                time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
        rows = []
        for i, (prompt, schema) in enumerate(CASES):
            messages = [{"role": "user", "content": prompt + " Answer in JSON."}]
            fmt = {"type": "json_schema", "json_schema": {"name": f"case{i}", "schema": schema, "strict": True}}
            common = dict(model=args.model, messages=messages, temperature=0, max_tokens=args.max_tokens)
            plain = client.chat.completions.create(**common, response_format=fmt).choices[0]
            text, rate, tokens = streamed(client, **common, response_format=fmt)
            _, free_rate, free_tokens = streamed(client, **{**common, "max_tokens": args.free_tokens})
            valid = []
            for reply in (plain.message.content, text):
                try:
                    jsonschema.validate(json.loads(reply), schema)
                    valid.append(True)
                except (ValueError, jsonschema.ValidationError):
                    valid.append(False)
            rows.append({"case": i, "prompt": prompt, "valid_plain": valid[0], "valid_streamed": valid[1],
                         "same_text": plain.message.content == text, "finish_reason": plain.finish_reason,
                         "tokens": tokens, "tok_s": rate, "free_tokens": free_tokens, "free_tok_s": free_rate,
                         "reply": text})
            print(f"{i:2d} valid {valid} {tokens:4d} tok {rate or 0:6.1f} tok/s | free {free_tokens:4d} tok "
                  f"{free_rate or 0:6.1f} tok/s | {text[:60]!r}", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    rated = [r for r in rows if r["tok_s"] and r["free_tok_s"]]
    summary = {
        "valid": sum(r["valid_plain"] and r["valid_streamed"] for r in rows), "cases": len(rows),
        "tok_s_with_grammar": sum(r["tok_s"] for r in rated) / len(rated),
        "tok_s_without": sum(r["free_tok_s"] for r in rated) / len(rated),
    }
    summary["ratio"] = summary["tok_s_with_grammar"] / summary["tok_s_without"]
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)
    return 0 if summary["valid"] == summary["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())

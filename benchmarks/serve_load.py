"""Serving under load: 1, 2, 4 and 8 concurrent streaming clients against `qwenkit serve -m demo`.

    python benchmarks/serve_load.py [--max-tokens 64] [--dtype auto]

The server runs in its own process; each client streams chat completions of exactly --max-tokens
tokens (the end-of-text tokens are banned with logit_bias), all clients of a level starting
together, for enough rounds that every level sees at least 8 requests. Reported per level:
aggregate generated tokens/s, tokens/s per stream, time to first token p50/p95.
Goal: the aggregate with 8 clients >= 4x a single stream. Results go to
benchmarks/results/serve_load-DATE.json.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from engines import machine

LEVELS = (1, 2, 4, 8)
TOPICS = ["the sea", "a mountain", "autumn", "a city at night", "an old library", "the desert", "a robot",
          "a garden"]


async def one_stream(client: httpx.AsyncClient, topic: str, max_tokens: int, ban: dict) -> dict:
    body = {"messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
            "max_tokens": max_tokens, "temperature": 0, "logit_bias": ban, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft_s": ttft, "tokens": tokens, "seconds": time.perf_counter() - start}


async def level(url: str, clients: int, max_tokens: int, ban: dict) -> dict:
    rounds = max(2, 8 // clients)
    streams, wall = [], 0.0
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for n in range(rounds):
            start = time.perf_counter()
            # A new prompt each time, so time to first token includes a real prefill, not a cache hit.
            topics = [f"{TOPICS[i]}, part {n + 1} of {rounds} for {clients} readers" for i in range(clients)]
            streams += await asyncio.gather(*(one_stream(client, t, max_tokens, ban) for t in topics))
            wall += time.perf_counter() - start
    ttfts = [s["ttft_s"] for s in streams]
    return {"clients": clients, "requests": len(streams),
            "aggregate_tok_s": sum(s["tokens"] for s in streams) / wall,
            "per_stream_tok_s": float(np.mean([s["tokens"] / s["seconds"] for s in streams])),
            "ttft_p50_s": float(np.percentile(ttfts, 50)), "ttft_p95_s": float(np.percentile(ttfts, 95))}


def start_server(port: int, dtype: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwenkit", "serve", "-m", "demo", "--port", str(port), "--dtype", dtype,
           "--max-batch", str(max(LEVELS))]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.terminate()
            raise SystemExit("the server did not become ready within 300 s")
        time.sleep(0.2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--dtype", default="auto", help="the server's --dtype (default auto)")
    args = parser.parse_args()
    # Other processes on the machine change these numbers a lot: the load before we start says if any ran.
    load_before = os.getloadavg()[0]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, args.dtype)
    try:
        ends = [httpx.post(f"{url}/tokenize", json={"prompt": text}).json()["tokens"]
                for text in ("<|im_end|>", "<|endoftext|>")]
        ban = {str(ids[0]): -100 for ids in ends if len(ids) == 1}  # so every reply runs to max_tokens
        asyncio.run(level(url, 1, 8, ban))  # warm up
        rows = []
        for clients in LEVELS:
            rows.append(asyncio.run(level(url, clients, args.max_tokens, ban)))
            r = rows[-1]
            print(f"{clients} client(s): {r['aggregate_tok_s']:7.2f} tok/s aggregate, {r['per_stream_tok_s']:6.2f} "
                  f"per stream, TTFT p50 {r['ttft_p50_s']:.3f} s p95 {r['ttft_p95_s']:.3f} s", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    ratio = rows[-1]["aggregate_tok_s"] / rows[0]["aggregate_tok_s"]
    print(f"aggregate at {LEVELS[-1]} clients / 1 client: {ratio:.2f}x (goal >= 4x)")
    out = Path(__file__).parent / "results" / f"serve_load-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": {**machine(), "load_average_1m_before": load_before}, "model": "demo",
                               "dtype": args.dtype, "max_tokens": args.max_tokens, "results": rows,
                               "ratio_8_vs_1": ratio}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()

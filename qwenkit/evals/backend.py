"""What the tasks ask of a model: the probabilities of a few next tokens, greedy completions, replies with
tool calls (and, for lm-evaluation-harness style tasks, the log-likelihood of each choice's text).

Two backends answer the same questions, so one harness compares engines:
- `LocalModel` runs a loaded qwenkit model. Multiple-choice prompts of one subject share their
  few-shot prefix (and a question's choices their context), so each is computed in one cache row that
  keeps what the previous prompt left there: only the tokens after the common prefix are prefilled.
  Log-likelihood questions (ARC, HellaSwag) go `batch_size` at a time, packed in one forward.
  Completions go through qwenkit's decode loop with continuous batching (`batch_size` sequences at a time;
  by default as many as GENERATED_KV_BYTES of KV cache hold, up to GENERATED_ROWS).
- `ServerModel` asks any OpenAI-compatible server (qwenkit serve, llama.cpp's server, vLLM): choice
  probabilities from /v1/completions' top-20 logprobs of one token (a choice outside them counts as
  probability 0), completions from /v1/completions (base) or /v1/chat/completions (chat), `batch_size`
  requests in flight, greedy with `repetition_penalty` 1 (an extension qwenkit serve and vLLM read).
  The server applies its own chat template and context limits (a prompt past them is an error).
- Tool use (BFCL) asks each for chat replies with `tools`: locally prompted and parsed as `qwenkit serve`
  does (qwenkit/tools.py), over a server through /v1/chat/completions' `tool_calls`.
Either way each completion is handed to `on_done` as soon as it is finished.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import tools
from ..errors import QwenkitError
from ..generate import generate_batch
from ..model import Model
from ..prompts import history_prompt
from ..tokenizer import Tokenizer

GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0}  # the release's evaluation scripts decode greedily
PACKED_ROW_TOKENS = 512  # questions packed into one row of a batch, up to this many tokens (LocalModel._packed)
HEAD_CHUNK = 256  # positions whose logits are made at a time (the vocabulary is ~152K wide)
BATCH_SIZE = 8  # questions scored together, and requests a server has in flight, unless batch_size says
# Sequences generated together by default: rows decoded together share each read of the weights (the demo's
# HumanEval: ~85 tok/s at 8 rows, ~137 at 32, AVX-512 BF16), as many as this much KV cache holds.
GENERATED_ROWS = 32
GENERATED_KV_BYTES = 1 << 30


def seed_choice_probs(probabilities: Sequence[float]) -> list[float]:
    """The release's choice probabilities: the choice tokens' probabilities, softmax-ed again."""
    return torch.softmax(torch.tensor(probabilities, dtype=torch.float64), dim=-1).tolist()


class LocalModel:
    def __init__(self, model: Model, tokenizer: Tokenizer, batch_size: int | None = None):
        """`batch_size`: questions scored together (default BATCH_SIZE) and sequences generated together
        (default: `generated_rows`)."""
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self._rows = batch_size or BATCH_SIZE, batch_size
        self.context_length = model.config.context_length
        self._cache = None
        self._held: list[int] = []  # the tokens whose keys and values the cache row holds

    def _choice_ids(self, choices: Sequence[str]) -> list[int]:
        ids = [self.tokenizer.encode(c) for c in choices]
        bad = next((c for c, i in zip(choices, ids) if len(i) != 1), None)
        if bad is not None:
            raise QwenkitError(f"{bad!r} is {len(self.tokenizer.encode(bad))} tokens for this tokenizer; multiple "
                               "choice reads one token per choice (a Qwen tokenizer)")
        return [i[0] for i in ids]

    @torch.inference_mode()
    def choice_probs(self, prompt: str, choices: Sequence[str], max_seq_len: int) -> tuple[list[float], bool]:
        """The release's probabilities of `choices` (one token each) after `prompt`: softmax over the
        vocabulary at the last position, the choices' probabilities, softmax again. A prompt longer than
        the window keeps its last window - 1 tokens; returns (probabilities, whether it was cut)."""
        choice_ids = self._choice_ids(choices)
        ids = self.tokenizer.encode(prompt)
        window = min(max_seq_len, self.context_length)
        cut = len(ids) > window
        if cut:
            ids = ids[len(ids) - window + 1:]
        logits = self._logits(ids, len(ids) - 1)[0]
        return seed_choice_probs(torch.softmax(logits, dim=-1)[choice_ids].tolist()), cut

    @torch.inference_mode()
    def loglikelihoods(self, context: str, texts: Sequence[str], max_seq_len: int) -> tuple[list[float], bool]:
        """The log-likelihood of " " + each text after `context`, tokenized as lm-evaluation-harness does
        (qwenkit/evals/loglikelihood.py): returns (log-likelihoods, whether any pair was cut to the window).
        The context is computed once (or reused from the previous question's cache row); its keys and values
        are copied to one cache row per choice, and all choices run as one batch. A pair longer than the
        window keeps its last window tokens, each choice alone."""
        window = min(max_seq_len, self.context_length)
        pairs = [self._pair(context, " " + text) for text in texts]
        context_ids = pairs[0][0]
        continuations = [c for _, c in pairs]
        longest = max(map(len, continuations))
        if len(context_ids) + longest > window:
            return [self._cut_loglikelihood(context_ids, c, window) for c in continuations], True
        start = len(context_ids) - 1  # its logits predict every choice's first token
        first = torch.log_softmax(self._logits(context_ids, start, rows=len(texts), room=longest)[0], dim=-1)
        for t in self._cache.tensors():  # the context, in every choice's row
            t[1:len(texts), :, :start + 1] = t[:1, :, :start + 1]
        self._cache.ntk_alpha[1:len(texts)] = self._cache.ntk_alpha[0]
        out = [float(first[c[0]]) for c in continuations]
        if longest > 1:  # the choices' other tokens: one batch, right-padded (padding comes after what counts)
            tokens = torch.tensor([c[:-1] + [0] * (longest - len(c)) for c in continuations], device=self.model.device)
            logits = self.model(tokens, torch.arange(start + 1, start + longest), self._cache.rows(0, len(texts)))
            logprobs = torch.log_softmax(logits.float(), -1)
            for i, c in enumerate(continuations):
                out[i] += float(logprobs[i, torch.arange(len(c) - 1), torch.tensor(c[1:], dtype=torch.long)].sum())
        self._held = context_ids + continuations[0][:-1]  # what row 0 now holds (a choice's last token is not fed)
        return out, False

    @torch.inference_mode()
    def loglikelihood_batch(self, requests: Sequence[tuple[str, Sequence[str]]],
                            max_seq_len: int) -> list[tuple[list[float], bool]]:
        """`loglikelihoods` of several questions (context, texts), returned in order: all of them in one forward
        without a cache, packed (`_packed`). A question whose pair is past the window, a lone question (which
        reuses the previous one's prefix in the cache row) and every question where packing would change the
        arithmetic go one at a time through `loglikelihoods`: a model whose caches are int8 (its figures are the
        int8 cache's) or that has attention windows, and NTK or dynamic RoPE past the lengths where they act."""
        window = min(max_seq_len, self.context_length)
        questions = []  # (index, context ids, continuations) of the questions batched
        out: list[tuple[list[float], bool]] = [([], False)] * len(requests)
        for i, (context, texts) in enumerate(requests):
            pairs = [self._pair(context, " " + text) for text in texts]
            ids, continuations = pairs[0][0], [c for _, c in pairs]
            if len(ids) + max(map(len, continuations)) > window:
                out[i] = self.loglikelihoods(context, texts, max_seq_len)
            else:
                questions.append((i, ids, continuations))
        length = max((len(ids) + max(map(len, cs)) for _, ids, cs in questions), default=0)  # past every position
        if len(questions) == 1 or not self._packable(length):
            for i, _, _ in questions:
                out[i] = self.loglikelihoods(*requests[i], max_seq_len)
        elif questions:
            for (i, _, _), logprobs in zip(questions, self._packed([(ids, cs) for _, ids, cs in questions])):
                out[i] = (logprobs, False)
        return out

    def _packable(self, length: int) -> bool:
        """Whether questions packed in rows, no position past `length`, compute what each computes alone."""
        cfg, rotary = self.model.config, self.model.model.rotary
        return (self.model.kv_cache == "float" and not cfg.attention_windows
                and not (cfg.use_dynamic_ntk and cfg.seq_length is not None and length > cfg.seq_length)
                and not (rotary.dynamic and length > rotary.max_position_embeddings))

    def _packed(self, questions: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        """Each question's choice log-likelihoods (`questions`: context ids, each choice's continuation ids) from
        one forward without a cache. A question is packed as its context, then each choice's tokens but the last
        at the positions they would have after the context; a mask lets a token see its own question's context
        and its own choice's earlier tokens, nothing else, so each choice computes what it would alone. The
        questions share out between rows of about PACKED_ROW_TOKENS, balanced, right-padded to the longest
        (padding sees only padding). The head runs over the positions that predict a choice's token only."""
        sizes = [len(ids) + sum(len(c) - 1 for c in cs) for ids, cs in questions]
        rows: list[list[int]] = [[] for _ in range(-(-sum(sizes) // PACKED_ROW_TOKENS))]  # the questions of each row
        filled = [0] * len(rows)
        for q in sorted(range(len(questions)), key=lambda q: -sizes[q]):  # the longest first, to the emptiest row
            r = filled.index(min(filled))
            rows[r].append(q)
            filled[r] += sizes[q]
        width = max(filled)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        owner = torch.full((len(rows), width), -1)  # the question of each token (padding: -1)
        segment = torch.zeros(len(rows), width, dtype=torch.long)  # 0: context, k + 1: choice k
        picks = []  # (flat index of the logits, the token they predict, question, choice)
        for r, row in enumerate(rows):
            at = 0
            for q in row:
                ids, cs = questions[q]
                n = len(ids)
                tokens[r, at:at + n] = torch.tensor(ids)
                positions[r, at:at + n] = torch.arange(n)
                owner[r, at:at + n] = q
                picks += [(r * width + at + n - 1, c[0], q, k) for k, c in enumerate(cs)]  # each first token
                at += n
                for k, c in enumerate(cs):
                    m = len(c) - 1
                    tokens[r, at:at + m] = torch.tensor(c[:-1], dtype=torch.long)
                    positions[r, at:at + m] = torch.arange(n, n + m)
                    owner[r, at:at + m], segment[r, at:at + m] = q, k + 1
                    picks += [(r * width + at + j, c[j + 1], q, k) for j in range(m)]
                    at += m
        seg_q, seg_k = segment[:, :, None], segment[:, None, :]
        mask = ((owner[:, :, None] == owner[:, None, :]) & (positions[:, None, :] <= positions[:, :, None])
                & ((seg_k == 0) | (seg_k == seg_q)))[:, None]  # [rows, 1, query, key]
        device = self.model.device
        tokens = tokens.to(device)
        net = self.model.model
        inputs = net.step_inputs(tokens, positions, None)
        hidden = net.blocks(tokens, inputs.rope, mask.to(device), inputs.write_pos, None, inputs.q_scale)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        values = []
        for start in range(0, len(picks), HEAD_CHUNK):
            chunk = picks[start:start + HEAD_CHUNK]
            where = sorted({i for i, *_ in chunk})  # a context's last position predicts every choice's first token
            logits = self.model.lm_head(hidden[torch.tensor(where, device=device)]).float()
            row_of = {i: j for j, i in enumerate(where)}
            rows_picked = torch.tensor([row_of[i] for i, *_ in chunk], device=device)
            targets = torch.tensor([t for _, t, _, _ in chunk], device=device)
            values += (logits[rows_picked, targets] - logits.logsumexp(-1)[rows_picked]).tolist()
        out = [[0.0] * len(cs) for _, cs in questions]
        for (_, _, q, k), value in zip(picks, values):
            out[q][k] += value
        return out

    def _cut_loglikelihood(self, context_ids: list[int], continuation: list[int], window: int) -> float:
        ids = (context_ids + continuation)[-window:]
        if len(continuation) >= len(ids):
            raise QwenkitError(f"a choice of {len(continuation)} tokens leaves no context in a window of {window} "
                               "tokens: raise --max-seq-len")
        first = len(ids) - len(continuation)  # the first choice token; the logits before it predict it
        logprobs = torch.log_softmax(self._logits(ids, first - 1), dim=-1)
        return float(logprobs[torch.arange(len(continuation)), torch.tensor(continuation)].sum())

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context)
        return context_ids, whole[len(context_ids):]

    def _logits(self, ids: list[int], start: int, rows: int = 1, room: int = 0) -> torch.Tensor:
        """float32 logits [len(ids) - start, vocab] of positions start.. of `ids`, in cache row 0, which keeps
        what the previous call left there: only the tokens after the common prefix (and from `start`) run.
        The cache has at least `rows` rows and `room` positions after `ids`."""
        if self._cache is None or self._cache.max_len < len(ids) + room or self._cache.batch_size < rows:
            self._cache = self.model.new_cache(max(rows, 4), max(len(ids) + room, min(self.context_length, 4096)))
            self._held = []
        reuse = 0
        # A windowed layer's ring holds the newest positions written, maybe past the common prefix: no reuse.
        held = [] if self._cache.has_ring else self._held
        for a, b in zip(held, ids[:start]):
            if a != b:
                break
            reuse += 1
        tokens = torch.tensor([ids[reuse:]], device=self.model.device)
        logits = self.model(tokens, torch.arange(reuse, len(ids)), self._cache.rows(0, 1),
                            last_only=start == len(ids) - 1)
        self._held = list(ids)
        return logits[0, -(len(ids) - start):].float()

    def generate(self, prompts: list[str], chat: bool, max_new_tokens: int, stop: Sequence[str],
                 on_done: Callable[[int, str], None], done_when: Callable[[int, str], bool] | None = None) -> int:
        """Greedy completions of `prompts` (as one user turn through the chat template with `chat`, as
        model.chat(tokenizer, text, history=None) builds it), `on_done(index, text)` as each finishes, or
        as soon as `done_when(index, text so far)` holds. A prompt too long for the context keeps its newest
        tokens; returns how many were cut."""
        gc = self.model.generation_config
        ids = [history_prompt(self.tokenizer, p, (), generation_config=gc) if chat else self.tokenizer.encode(p)
               for p in prompts]
        generate_batch(self.model, self.tokenizer, ids, max_batch=self.generated_rows(ids, max_new_tokens),
                       max_new_tokens=max_new_tokens, stop=list(stop), truncate=True,
                       on_done=lambda i, result: on_done(i, result.text), done_when=done_when, **GREEDY)
        return sum(len(i) + 1 > self.context_length for i in ids)

    def generated_rows(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        """Sequences to generate together: the batch size given, else up to GENERATED_ROWS, as many as
        GENERATED_KV_BYTES of KV cache hold at the longest prompt plus `max_new_tokens`."""
        if self._rows is not None:
            return self._rows
        longest = min(max(map(len, prompts), default=0) + max_new_tokens, self.context_length)
        return max(1, min(GENERATED_ROWS, GENERATED_KV_BYTES // (self.model.new_cache(1, 1).nbytes * longest)))

    def tool_calls(self, requests: list[tuple[list[dict], list[dict]]], max_new_tokens: int,
                   on_done: Callable[[int, list[tuple[str, dict]], str], None]) -> int:
        """Greedy replies to chat `requests` (messages, OpenAI tools), tool_choice auto, prompted and parsed as
        `qwenkit serve` does (qwenkit.tools); `on_done(index, [(name, arguments)], content)` as each finishes.
        Returns how many prompts were cut to the context."""
        ids = [tools.build_prompt(self.tokenizer, messages, functions) for messages, functions in requests]
        stop = tools.new_parser(self.tokenizer, requests[0][1]).stop if requests else []

        def done(i: int, result) -> None:
            parser = tools.new_parser(self.tokenizer, requests[i][1])
            events = parser.feed(result.text)
            tail, calls = parser.finish()
            content = "".join(e.text for e in events + tail if isinstance(e, tools.ContentDelta))
            on_done(i, [(c.name, json.loads(c.arguments)) for c in calls], content)

        generate_batch(self.model, self.tokenizer, ids, max_batch=self.generated_rows(ids, max_new_tokens),
                       max_new_tokens=max_new_tokens, stop=stop, truncate=True, on_done=done, **GREEDY)
        return sum(len(i) + 1 > self.context_length for i in ids)


class ServerModel:
    def __init__(self, url: str, batch_size: int | None = None, api_key: str | None = None, timeout: float = 600):
        self.url, self.api_key, self.timeout = url.rstrip("/"), api_key, timeout
        self.batch_size = batch_size or BATCH_SIZE  # requests at a time
        self.url = self.url.removesuffix("/v1")
        models = self._call("GET", "/v1/models").get("data") or [{}]
        self.name = models[0].get("id") or self.url

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, method=method, headers=headers,
                                         data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise QwenkitError(f"{self.url}{path} answered {e.code}: {e.read()[:500].decode('utf-8', 'replace')}")
        except (urllib.error.URLError, OSError) as e:
            raise QwenkitError(f"cannot reach {self.url}{path} ({e}): is the server running? (--server takes its "
                               "base URL, e.g. http://127.0.0.1:8000)") from None

    def choice_probs(self, prompt: str, choices: Sequence[str], max_seq_len: int) -> tuple[list[float], bool]:
        reply = self._call("POST", "/v1/completions", {"model": self.name, "prompt": prompt, "max_tokens": 1,
                                                       "temperature": 0.0, "logprobs": 20})
        top = (reply["choices"][0].get("logprobs") or {}).get("top_logprobs") or [{}]
        return seed_choice_probs([math.exp(top[0][c]) if c in top[0] else 0.0 for c in choices]), False

    def generate(self, prompts: list[str], chat: bool, max_new_tokens: int, stop: Sequence[str],
                 on_done: Callable[[int, str], None], done_when: Callable[[int, str], bool] | None = None) -> int:
        """As LocalModel.generate, but a server writes each reply whole: `done_when`, which would only have
        saved time, goes unused."""
        def one(i: int) -> tuple[int, str]:
            # repetition_penalty: the usual extension (qwenkit serve, vLLM); a server's default may not be 1.
            body = {"model": self.name, "max_tokens": max_new_tokens, "temperature": 0.0, "repetition_penalty": 1.0,
                    **({"stop": list(stop)} if stop else {})}
            if chat:
                reply = self._call("POST", "/v1/chat/completions",
                                   {**body, "messages": [{"role": "user", "content": prompts[i]}]})
                return i, reply["choices"][0]["message"]["content"] or ""
            reply = self._call("POST", "/v1/completions", {**body, "prompt": prompts[i]})
            return i, reply["choices"][0]["text"]

        with ThreadPoolExecutor(self.batch_size) as pool:
            for i, text in pool.map(one, range(len(prompts))):
                on_done(i, text)
        return 0

    def tool_calls(self, requests: list[tuple[list[dict], list[dict]]], max_new_tokens: int,
                   on_done: Callable[[int, list[tuple[str, dict]], str], None]) -> int:
        """As LocalModel.tool_calls, through /v1/chat/completions with `tools` (the server's own tool format).
        Arguments that are not a JSON object count as a call with arguments {"": text}: a call, but never right."""
        def one(i: int) -> tuple[int, list[tuple[str, dict]], str]:
            messages, functions = requests[i]
            reply = self._call("POST", "/v1/chat/completions", {
                "model": self.name, "messages": messages, "tools": functions, "tool_choice": "auto",
                "max_tokens": max_new_tokens, "temperature": 0.0, "repetition_penalty": 1.0})
            message = reply["choices"][0]["message"]
            calls = []
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                try:
                    arguments = json.loads(function.get("arguments") or "{}")
                except ValueError:
                    arguments = None
                calls.append((function.get("name", ""), arguments if isinstance(arguments, dict)
                              else {"": function.get("arguments")}))
            return i, calls, message.get("content") or ""

        with ThreadPoolExecutor(self.batch_size) as pool:
            for i, calls, content in pool.map(one, range(len(requests))):
                on_done(i, calls, content)
        return 0

"""Perplexity of a model on a token stream, scored in windows; and at several context lengths (ppl-long)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DataError, QwenkitError
from ..model import Model


@torch.no_grad()
def window_nll(model: Model, window: Sequence[int] | torch.Tensor, scored: int | None = None,
               chunk: int = 1024) -> float:
    """The summed negative log-likelihood of the last `scored` tokens of `window` (default: all but the
    first), each given the window before it, in one forward. The head runs over the scored positions only,
    `chunk` at a time (a 16K window's logits at once would take gigabytes). A model whose caches are int8
    (Model.set_kv_cache) runs through one, so that attention reads the keys and values as decoding would."""
    ids = torch.as_tensor(window, dtype=torch.long).flatten().to(model.device)
    n = ids.numel()
    if model.kv_cache == "float":
        hidden = model.model(ids[None])[0]
    else:
        hidden = model.model(ids[None], torch.arange(n), model.new_cache(1, n))[0]
    total = 0.0
    first = 0 if scored is None else n - 1 - scored  # the position whose logits predict the first scored token
    for start in range(first, n - 1, chunk):
        end = min(start + chunk, n - 1)
        logits = model.lm_head(hidden[start:end]).float()
        total += float(F.cross_entropy(logits, ids[start + 1:end + 1], reduction="sum"))
    return total


@torch.no_grad()
def perplexity(model: Model, ids: Sequence[int] | torch.Tensor, seq_len: int = 512, stride: int | None = None) -> float:
    """exp(mean negative log-likelihood) of the tokens of `ids`, scored in windows of `seq_len`.

    Windows start `stride` apart (default `seq_len`: no overlap). Each scores the tokens that no
    earlier window did and that have context inside it (so with no overlap the first token of each
    window goes unscored, as in transformers' perplexity recipe). A smaller stride gives the scored
    tokens more context: closer to the model's best, and seq_len/stride times slower.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n, stride = ids.numel(), stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len ({seq_len}), not {stride}")
    if n < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    nll, scored, scored_until = 0.0, 0, 1  # tokens before scored_until are done (token 0 never is)
    for begin in range(0, n - 1, stride):
        end = min(begin + seq_len, n)
        window = ids[begin:end]
        new = min(end - scored_until, window.numel() - 1)
        nll += window_nll(model, window, new)
        scored, scored_until = scored + new, end
        if end == n:
            break
    return math.exp(nll / scored)


# technique -> (dynamic NTK, LogN, window attention)
TECHNIQUES = {"none": (False, False, False), "ntk": (True, False, False), "logn": (False, True, False),
              "ntk+logn": (True, True, False), "window": (False, False, True), "ntk+logn+window": (True, True, True)}


def report_windows(num_layers: int, train_length: int, context_length: int) -> str:
    """The Qwen-7B tech report's layer-wise windows, as its maintainers describe them for 32 layers trained at
    2048 (QwenLM/Qwen#422: 4 layers at 2048, 4 at 4096, then 8192, ...): an eighth of the layers at a time from
    the bottom, the trained length doubling each group; layers whose window would pass the context attend fully."""
    group, window, groups = max(num_layers // 8, 1), train_length, []
    for _ in range(0, num_layers, group):
        if window > context_length:
            break
        groups.append(f"{window}:{group}")
        window *= 2
    return ",".join(groups)


class LongPerplexity:
    """Perplexity at several context lengths with Qwen's long-context techniques switched on one by one, as
    the Qwen-7B release's long-context table: for each length L, windows of L tokens cut from long documents
    (a window never spans two), every token after a window's first scored with the window before it.

    Documents: the held-out standard-library files, longest first (turtle.py, tarfile.py, doctest.py,
    argparse.py: ~25-36K tokens each), or the .txt files of --data-dir. Each length scores the same number of
    tokens (`tokens`, default the longest length), so the columns compare like with like. Techniques: none,
    ntk (dynamic NTK), logn, ntk+logn, past `train_length` (default the model's; a smaller one shows what
    they do on a model trained longer); window and ntk+logn+window add window attention, `windows` (as
    --window-attention takes them) or by default report_windows.
    """
    name = "ppl-long"

    def __init__(self, lengths: Sequence[int] | None = None, techniques: Sequence[str] | None = None,
                 train_length: int | None = None, windows: str | None = None, tokens: int | None = None):
        lengths, techniques = lengths or (1024, 2048, 4096, 8192, 16384), techniques or ("none", "ntk", "ntk+logn")
        unknown = [t for t in techniques if t not in TECHNIQUES]
        if unknown or not techniques or not lengths or min(lengths) < 2:
            raise QwenkitError(f"ppl-long: techniques are {', '.join(TECHNIQUES)} (not {', '.join(unknown)}) and "
                               "lengths at least 2 tokens")
        self.lengths, self.techniques = sorted(set(lengths)), list(dict.fromkeys(techniques))
        self.train_length, self.tokens, self.windows_spec = train_length, tokens or max(lengths), windows

    def load(self, data_dir: Path | None) -> tuple[list[dict], list[Path]]:
        self.files = sorted(data_dir.glob("*.txt")) if data_dir is not None else []
        if data_dir is not None and not self.files:
            raise DataError(f"ppl-long: {data_dir} holds no .txt file (the long documents to score)")
        items = [{"id": f"{t}@{length}" + (f"/train{self.train_length}" if self.train_length else ""),
                  "technique": t, "length": length} for t in self.techniques for length in self.lengths]
        return items, self.files

    def documents(self, tokenizer) -> list[list[int]]:
        from ..quant.calibration import stdlib_files

        paths = self.files or sorted(stdlib_files(heldout=True), key=lambda p: -p.stat().st_size)
        return [tokenizer.encode(p.read_text(encoding="utf-8", errors="replace"), allowed_special=set())
                for p in paths]

    def run(self, model: Model, tokenizer, items: list[dict], save) -> None:
        docs = self.documents(tokenizer)
        cfg = model.config
        kept = (cfg.use_dynamic_ntk, cfg.use_logn_attn, cfg.seq_length, cfg.attention_windows)
        try:
            for item in items:
                ntk, logn, windowed = TECHNIQUES[item["technique"]]
                model.set_long_context(ntk, logn, self.train_length)
                spec = self.windows_spec or report_windows(cfg.num_layers, cfg.seq_length, cfg.context_length)
                model.set_window_attention(spec if windowed else None)
                windows = self.windows(docs, item["length"])
                nll = sum(window_nll(model, window) for window in windows)
                scored = sum(len(window) - 1 for window in windows)
                save(item, {"score": math.exp(nll / scored), "tokens": scored, "windows": len(windows),
                            "train_length": cfg.seq_length, "lower_is_better": True}
                     | ({"attention_windows": spec} if windowed else {}))
        finally:
            cfg.use_dynamic_ntk, cfg.use_logn_attn, cfg.seq_length = kept[:3]
            model.set_window_attention(kept[3])

    def windows(self, docs: list[list[int]], length: int) -> list[list[int]]:
        out, total = [], 0
        for doc in docs:
            for start in range(0, len(doc) - length + 1, length):
                if total >= self.tokens:
                    return out
                out.append(doc[start:start + length])
                total += length
        if not out:
            raise DataError(f"ppl-long: no document holds {length} tokens; pass --data-dir with longer .txt files")
        return out

    def score(self, items: list[dict], records: dict[str, dict]) -> dict:
        table = {t: {str(i["length"]): round(records[i["id"]]["score"], 4) for i in items if i["technique"] == t}
                 for t in self.techniques}
        last = items[-1]
        return {"score": records[last["id"]]["score"], "table": table, "lengths": self.lengths,
                "train_length": records[last["id"]]["train_length"], "lower_is_better": True}

"""Byte-level BPE tokenizers for Qwen models, with tiktoken doing the encoding.

Two vocabulary formats exist:

* Qwen v1 ships ``qwen.tiktoken``: one ``<base64 bytes> <rank>`` line per token, where the rank is
  both the BPE priority and the token id. tiktoken reads that directly.
* Qwen2 and later ship GPT-2 style files (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``), and
  GGUF files carry the same data as metadata. Tokens are spelled in GPT-2's byte-to-unicode alphabet
  and BPE priority comes from the merge list, so both have to be translated for tiktoken.

tiktoken's BPE repeatedly joins the adjacent pair whose *concatenation* has the lowest rank. That
equals merge-list BPE when a token's rank is the position of the first merge that produces it, which
is how ranks are computed here. Vocabulary tokens that no merge produces (and that are not single
bytes) are left out of the BPE ranks: giving them a rank would let tiktoken build them where the
merge list never would. Such tokens (GGUF's ``[PAD151665]`` fillers, for example) are never produced
by ``encode``, but ``decode`` and ``token_to_id`` know them, as transformers does.

Added tokens (``<|im_start|>``, ``<tool_call>`` ...) are matched whole in the text. Only the ones
marked special / control are dropped by ``decode(skip_special_tokens=True)``: HF keeps Qwen2.5's
non-special ``<tool_call>`` in skipped output, and tool-call parsing depends on it.
"""

from __future__ import annotations

import base64
import codecs
import itertools
import json
import unicodedata
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import tiktoken

from .errors import CheckpointError, ConfigError
from .prompts import apply_chat_template

# Pre-tokenizer split of Qwen v1 (tokenization_qwen.py PAT_STR) and Qwen2/Qwen3 (Qwen2Tokenizer):
# cl100k's pattern with numbers cut into single digits.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5 keeps combining marks with the letters they modify.
QWEN35_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GGUF names the split by `tokenizer.ggml.pre` (llama.cpp's names); all of these normalize to NFC.
GGUF_PRE_PATTERNS = {
    "qwen2": QWEN_PATTERN,
    "deepseek-r1-qwen": QWEN_PATTERN,
    "qwen35": QWEN35_PATTERN,
}

QWEN_V1_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))

# llama.cpp token types: 3 = control (special), 4 = user-defined (added, but not special).
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-unicode map, inverted: the character that spells each byte in vocab files.

    Printable Latin-1 bytes stand for themselves; the rest are moved to U+0100 and up so every
    token is visible text without spaces.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


_BYTE_OF_CHAR = _gpt2_byte_alphabet()


def _spelled_to_bytes(token: str) -> bytes:
    """The bytes a vocab-file token stands for. Tokens outside the byte alphabet (added tokens
    written as plain text, as GGUF and transformers do) stand for their UTF-8 text."""
    try:
        return bytes(map(_BYTE_OF_CHAR.__getitem__, token))
    except KeyError:
        return token.encode()


def _ranks_from_merges(
    vocab: Mapping[str, int], merges: Iterable[str | list[str]], skip_ids: Collection[int]
) -> tuple[dict[bytes, int], dict[bytes, int]]:
    """Split a byte-level vocab into (BPE tokens in rank order -> id, tokens no merge reaches -> id).

    The 256 single bytes rank first (ordered by id; their relative order never matters, tiktoken
    only starts from them), then each token at the first merge that produces it. ``skip_ids`` are
    added tokens that some files also list in the vocab.
    """
    missing = [char for char in _BYTE_OF_CHAR if char not in vocab]
    if missing:
        raise CheckpointError(
            f"byte-level vocabulary lacks {len(missing)} single-byte tokens, e.g. {missing[:5]}"
        )
    order = dict.fromkeys(sorted(_BYTE_OF_CHAR, key=vocab.__getitem__))
    for merge in merges:
        # merges.txt / GGUF spell a merge "a b"; newer tokenizer.json files use ["a", "b"].
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        order.setdefault(left + right)
    unknown = [token for token in order if token not in vocab]
    if unknown:
        raise CheckpointError(f"{len(unknown)} merge results are not in the vocabulary, e.g. {unknown[:5]}")
    ranked = {_spelled_to_bytes(token): vocab[token] for token in order}
    unmergeable = {
        _spelled_to_bytes(token): i for token, i in vocab.items() if token not in order and i not in skip_ids
    }
    return ranked, unmergeable


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _split_pattern(pre_tokenizer: dict | None, path: Path) -> str:
    """The Split regex of a tokenizer.json pre-tokenizer (alone or inside a Sequence)."""
    pre_tokenizer = pre_tokenizer or {}
    for part in pre_tokenizer.get("pretokenizers", [pre_tokenizer]):
        if part.get("type") == "Split" and "Regex" in part.get("pattern", {}):
            return part["pattern"]["Regex"]
    raise ConfigError(
        f"{path}: pre_tokenizer has no Split regex; qwenkit reads only Qwen2-style byte-level BPE tokenizers"
    )


def _uses_nfc(normalizer: dict | None) -> bool:
    normalizer = normalizer or {}
    return any(part.get("type") == "NFC" for part in normalizer.get("normalizers", [normalizer]))


def _added_token(entry: dict) -> tuple[str, bool]:
    """(text, is special) of an added token as tokenizer.json / tokenizer_config.json write it."""
    return entry["content"], entry.get("special", False)


# Qwen2Tokenizer's defaults, used where tokenizer_config.json lacks the key (an explicit null means none).
_QWEN2_TOKEN_DEFAULTS = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None}


def _config_token(config: dict, key: str) -> str | None:
    """A special-token name from tokenizer_config.json, written as a string or an AddedToken dict."""
    value = config.get(key, _QWEN2_TOKEN_DEFAULTS[key])
    return value["content"] if isinstance(value, dict) else value


def _id_list(ids: int | Iterable[int]) -> list[int]:
    """Accept an int, a list, or a tensor/array: tensor elements would hash by identity, not value."""
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    return [ids] if isinstance(ids, int) else list(ids)


class Tokenizer:
    """A Qwen tokenizer. Build it with one of the ``from_*`` class methods."""

    def __init__(
        self,
        *,
        kind: str,
        pattern: str,
        ranked: dict[bytes, int],
        specials: Mapping[str, int],
        control_ids: Collection[int],
        unmergeable: Mapping[bytes, int] | None = None,
        nfc: bool = True,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        chat_template: str | None = None,
    ):
        """``ranked`` maps token bytes to ids in BPE priority order; ``specials`` are the added tokens
        matched whole in text, of which ``control_ids`` are the ones decoding may skip."""
        self.kind = kind
        self.pattern = pattern
        self.special_tokens = dict(specials)
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self.im_start_id = self.special_tokens.get("<|im_start|>")
        self.im_end_id = self.special_tokens.get("<|im_end|>")
        self.endoftext_id = self.special_tokens.get("<|endoftext|>")
        self._nfc = nfc
        self._control_ids = frozenset(control_ids)
        self._ranked = ranked
        self._unmergeable = dict(unmergeable or {})

        # tiktoken works in rank space. Qwen's files number tokens in merge order, so ranks are the
        # ids and no translation is needed; otherwise ranks are positions and specials follow them.
        ids = list(ranked.values())
        if ids == list(range(len(ids))) and min(self.special_tokens.values(), default=len(ids)) >= len(ids):
            ranks, tiktoken_specials, self._rank_to_id = ranked, self.special_tokens, None
        else:
            ranks = {piece: rank for rank, piece in enumerate(ranked)}
            tiktoken_specials = {text: len(ids) + n for n, text in enumerate(self.special_tokens)}
            self._rank_to_id = ids + list(self.special_tokens.values())
        self._encoding = tiktoken.Encoding(
            f"qwenkit-{kind}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=tiktoken_specials
        )

        specials_bytes = {text.encode(): i for text, i in self.special_tokens.items()}
        known = [*ranked.items(), *self._unmergeable.items(), *specials_bytes.items()]
        self._bytes_by_id: list[bytes | None] = [None] * (max(i for _, i in known) + 1)
        for piece, i in known:
            self._bytes_by_id[i] = piece

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_qwen_tiktoken(
        cls, path: str | Path, extra_specials: Mapping[str, int] | None = None
    ) -> Tokenizer:
        """Qwen v1's ``qwen.tiktoken``. ``extra_specials`` adds more control tokens (text -> id)."""
        path = Path(path)
        try:
            lines = path.read_bytes().splitlines()
            pairs = (line.split() for line in lines if line)
            ranked = {base64.b64decode(token): int(rank) for token, rank in pairs}
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read Qwen vocabulary {path}: {e}") from e
        # The specials follow the last regular token: <|endoftext|> = 151643 in the released file.
        first = max(ranked.values()) + 1
        specials = {text: first + n for n, text in enumerate(QWEN_V1_SPECIALS)} | dict(extra_specials or {})
        eod = specials["<|endoftext|>"]
        return cls(
            kind="qwen",
            pattern=QWEN_PATTERN,
            ranked=ranked,
            specials=specials,
            control_ids=specials.values(),
            eos_token_id=eod,
            pad_token_id=eod,
        )

    @classmethod
    def from_hf_files(cls, directory: str | Path) -> Tokenizer:
        """A Hugging Face tokenizer directory: ``tokenizer.json`` (preferred) or ``vocab.json`` +
        ``merges.txt``, plus ``tokenizer_config.json`` and ``chat_template.jinja`` when present."""
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        # id -> (text, is special). tokenizer.json's list, where present, is the authoritative one.
        added = {int(i): _added_token(entry) for i, entry in config.get("added_tokens_decoder", {}).items()}
        spec_path = directory / "tokenizer.json"
        if spec_path.is_file():
            spec = _read_json(spec_path)
            model = spec.get("model", {})
            if model.get("type") != "BPE":
                raise ConfigError(f"{spec_path}: model type {model.get('type')!r}, expected 'BPE'")
            vocab, merges = model["vocab"], model["merges"]
            added |= {entry["id"]: _added_token(entry) for entry in spec.get("added_tokens", [])}
            pattern = _split_pattern(spec.get("pre_tokenizer"), spec_path)
            nfc = _uses_nfc(spec.get("normalizer"))
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            vocab = _read_json(directory / "vocab.json")
            lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [line for line in lines if line and not line.startswith("#version")]
            pattern, nfc = QWEN_PATTERN, True  # what Qwen2Tokenizer builds from these two files
        else:
            raise CheckpointError(
                f"no Hugging Face tokenizer in {directory}: "
                "looked for tokenizer.json, or vocab.json + merges.txt"
            )

        specials = {text: i for i, (text, _) in added.items()}
        names = {key: _config_token(config, key) for key in _QWEN2_TOKEN_DEFAULTS}
        unknown = {key: name for key, name in names.items() if name is not None and name not in specials}
        if unknown:
            raise ConfigError(f"{config_path}: {unknown} are not added tokens of this vocabulary")

        template_path = directory / "chat_template.jinja"
        if template_path.is_file():  # where transformers >= 4.43 saves it
            template = template_path.read_text(encoding="utf-8")
        else:
            template = config.get("chat_template")
        if isinstance(template, list):  # several named templates; the unnamed use is "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        ranked, unmergeable = _ranks_from_merges(vocab, merges, skip_ids=added.keys())
        return cls(
            kind="bpe",
            pattern=pattern,
            ranked=ranked,
            unmergeable=unmergeable,
            specials=specials,
            control_ids=[i for i, (_, special) in added.items() if special],
            nfc=nfc,
            eos_token_id=specials.get(names["eos_token"]),
            pad_token_id=specials.get(names["pad_token"]),
            bos_token_id=specials.get(names["bos_token"]),
            chat_template=template,
        )

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """GGUF tokenizer metadata, as a plain dict of ``tokenizer.*`` keys to Python values."""
        model, pre = fields.get("tokenizer.ggml.model"), fields.get("tokenizer.ggml.pre")
        if model != "gpt2":
            raise ConfigError(
                f"GGUF tokenizer.ggml.model is {model!r}; qwenkit reads only byte-level BPE ('gpt2')"
            )
        if pre not in GGUF_PRE_PATTERNS:
            raise ConfigError(
                f"GGUF tokenizer.ggml.pre is {pre!r}; qwenkit knows {sorted(GGUF_PRE_PATTERNS)}"
            )
        if "tokenizer.ggml.merges" not in fields:
            raise ConfigError("GGUF has no tokenizer.ggml.merges")
        tokens = fields["tokenizer.ggml.tokens"]
        types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        # Control and user-defined tokens are both matched whole in text, as llama.cpp and
        # transformers do; only control tokens count as special.
        added = {
            i: (token, kind == GGUF_CONTROL)
            for i, (token, kind) in enumerate(zip(tokens, types))
            if kind in (GGUF_CONTROL, GGUF_USER_DEFINED)
        }
        vocab = {token: i for i, token in enumerate(tokens) if i not in added}
        ranked, unmergeable = _ranks_from_merges(vocab, fields["tokenizer.ggml.merges"], skip_ids=())
        return cls(
            kind="bpe",
            pattern=GGUF_PRE_PATTERNS[pre],
            ranked=ranked,
            unmergeable=unmergeable,
            specials={token: i for i, (token, _) in added.items()},
            control_ids=[i for i, (_, control) in added.items() if control],
            # The models were trained on NFC text (their tokenizer.json says so); GGUF drops that
            # detail, and transformers' GGUF loader skips it. It only matters for non-NFC input.
            nfc=True,
            eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            chat_template=fields.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Tokenizer:
        """The tokenizer of a local checkpoint directory, whichever format it ships."""
        directory = Path(directory)
        if (directory / "qwen.tiktoken").is_file():
            return cls.from_qwen_tiktoken(directory / "qwen.tiktoken")
        if (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file():
            return cls.from_hf_files(directory)
        raise CheckpointError(
            f"no tokenizer files in {directory}: looked for qwen.tiktoken (Qwen v1), tokenizer.json, "
            "or vocab.json + merges.txt (Qwen2 and later)"
        )

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, directory: str | Path) -> list[Path]:
        """Write the files ``from_pretrained`` reads back to this same tokenizer; returns their paths.

        Qwen v1 writes ``qwen.tiktoken`` (its ranks are its ids). Byte-level BPE writes Hugging Face's
        ``tokenizer.json`` + ``tokenizer_config.json`` (added tokens, eos/pad/bos, chat template), which
        transformers reads too. GGUF sources carry no merge list of their own once loaded, so it is
        rebuilt from the ranks: each token's merge is the last step of BPE on its bytes using only the
        merges ranked before it. That reproduces the demo GGUF's 151,387 merges exactly.
        """
        directory = Path(directory)
        if self.kind == "qwen":
            path = directory / "qwen.tiktoken"
            path.write_bytes(b"".join(base64.b64encode(piece) + b" %d\n" % rank for piece, rank in self._ranked.items()))
            return [path]
        char_of_byte = {byte: char for char, byte in _BYTE_OF_CHAR.items()}

        def spell(piece: bytes) -> str:  # bytes -> the GPT-2 alphabet vocab files use
            return "".join(map(char_of_byte.__getitem__, piece))

        added = [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": i in self._control_ids}
                 for text, i in sorted(self.special_tokens.items(), key=lambda item: item[1])]
        byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        spec = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "NFC"} if self._nfc else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", **byte_level}]},
            "post_processor": {"type": "ByteLevel", **byte_level},
            "decoder": {"type": "ByteLevel", **byte_level},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      # Added tokens too, as transformers writes them: it numbers added tokens missing from
                      # the vocab after its end, whatever ids the list gives.
                      "vocab": {**{spell(piece): i for piece, i in [*self._ranked.items(), *self._unmergeable.items()]},
                                **{entry["content"]: entry["id"] for entry in added}},
                      "merges": [f"{spell(a)} {spell(b)}" for a, b in self._merges()]},
        }
        config = {
            "tokenizer_class": "Qwen2Tokenizer", "errors": "replace", "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "added_tokens_decoder": {str(entry["id"]): {k: v for k, v in entry.items() if k != "id"} for entry in added},
            "eos_token": self.special_text(self.eos_token_id), "pad_token": self.special_text(self.pad_token_id),
            "bos_token": self.special_text(self.bos_token_id), "chat_template": self.chat_template,
        }
        paths = [directory / "tokenizer.json", directory / "tokenizer_config.json"]
        for path, data in zip(paths, (spec, config)):
            path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
        return paths

    def _merges(self) -> list[tuple[bytes, bytes]]:
        """The merge list of the BPE ranks, in rank order (see save_pretrained)."""
        ranks = {piece: rank for rank, piece in enumerate(self._ranked)}
        merges = []
        for rank, piece in enumerate(self._ranked):
            if len(piece) == 1:
                continue
            parts = [piece[i:i + 1] for i in range(len(piece))]
            while len(parts) > 2:
                pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
                best, i = min(pairs)
                if best >= rank:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            if len(parts) != 2:
                raise CheckpointError(f"token {piece!r} (rank {rank}) is not the merge of two earlier tokens; "
                                      "this vocabulary cannot be written as a merge list")
            merges.append((parts[0], parts[1]))
        return merges

    # ------------------------------------------------------------------ use

    @property
    def vocab_size(self) -> int:
        """Number of ids this tokenizer knows (ids past it have no token)."""
        return len(self._bytes_by_id)

    def encode(
        self,
        text: str,
        allowed_special: Literal["all"] | Collection[str] = "all",
        disallowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Token ids of ``text``. By default the text of every added token encodes as that token;
        ``allowed_special=set()`` encodes it as plain text instead (the guard against prompt
        injection). Added tokens in ``disallowed_special`` raise ValueError (tiktoken's rules)."""
        # Normalizing before tiktoken finds the added tokens differs from HF (which normalizes only
        # the text between them) just where a combining mark follows an added token's final ">".
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        ranks = self._encoding.encode(
            text, allowed_special=allowed_special, disallowed_special=disallowed_special
        )
        return ranks if self._rank_to_id is None else [self._rank_to_id[rank] for rank in ranks]

    def decode(
        self, ids: int | Iterable[int], skip_special_tokens: bool = False, errors: str = "replace"
    ) -> str:
        return self._join(_id_list(ids), skip_special_tokens).decode("utf-8", errors)

    def token_to_id(self, token: str) -> int | None:
        """Id of an added token, or of a regular token given as its decoded text; None if unknown."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        piece = token.encode()
        return self._ranked.get(piece, self._unmergeable.get(piece))

    def id_to_bytes(self, id: int) -> bytes:
        """Raw bytes of one token; for added tokens, their UTF-8 text."""
        piece = self._bytes_by_id[id] if 0 <= id < len(self._bytes_by_id) else None
        if piece is None:
            raise ValueError(f"token id {id} is not in this tokenizer's vocabulary (size {self.vocab_size})")
        return piece

    def is_special(self, id: int) -> bool:
        return id in self._control_ids

    @property
    def control_tokens(self) -> dict[str, int]:
        """The control tokens (ChatML markers, eos, ...) by their text: only templates may write them."""
        return {text: id for text, id in self.special_tokens.items() if id in self._control_ids}

    def special_text(self, id: int | None) -> str | None:
        """The text of an added token (for chat templates' bos_token / eos_token), None for None."""
        return None if id is None else self.id_to_bytes(id).decode("utf-8", "replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs) -> list[int]:
        """Messages -> prompt ids: the checkpoint's Jinja template, or Qwen v1 ChatML (see prompts.py)."""
        return apply_chat_template(self, messages, add_generation_prompt, tools, **kwargs)

    def stream_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    def _join(self, ids: list[int], skip_special_tokens: bool) -> bytes:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._control_ids]
        return b"".join(map(self.id_to_bytes, ids))


class IncrementalDecoder:
    """Decodes a stream of ids piece by piece, e.g. while a model generates.

    A UTF-8 character may span several tokens (rarer Chinese characters, some emoji, the joiner
    inside emoji sequences), so the bytes of an unfinished character are held back until the rest
    arrives. Python's incremental UTF-8 decoder does exactly that, so the pieces always join to
    ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, ids: int | Iterable[int]) -> str:
        """Text completed by ``ids``."""
        return self._utf8.decode(self._tokenizer._join(_id_list(ids), self._skip_special_tokens))

    def flush(self) -> str:
        """Whatever is held back, with an unfinished character shown as U+FFFD."""
        return self._utf8.decode(b"", final=True)

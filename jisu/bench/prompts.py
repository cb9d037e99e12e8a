"""Benchmark prompts: synthetic ones of an exact token length, and real ones from a JSONL file.

A JSONL file has one object per line with either "prompt" (a string) or "messages" (a chat: a list of
{"role", "content"} objects), and optionally "output_len" (tokens to generate for that prompt).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from jisu.errors import InvalidRequestError

BUILTIN_DATASET = Path(__file__).parent / "data" / "prompts.jsonl"
ROLES = ("system", "developer", "user", "assistant")

# Plain words: text made of them tokenizes without surprises in any BPE vocabulary, and random
# choices keep prompts from sharing prefixes (which a prefix cache would otherwise reuse).
_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "river garden music market window paper light table summer winter bridge engine cloud stone letter voice "
    "small large early young important public bad same able open green simple quiet bright cold warm short "
    "run walk read write speak listen build carry follow bring begin keep hold turn start show hear play move "
    "live believe happen provide sit stand lose pay meet include continue set learn lead understand watch"
).split()


class TextTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class Prompt:
    """One benchmark prompt: text or a chat, with its token ids when they are known exactly."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    token_ids: list[int] | None = None
    output_len: int | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def synthetic_prompt(tokenizer: TextTokenizer, length: int, seed: int = 0, max_tries: int = 50) -> Prompt:
    """A prompt of random words that is exactly `length` tokens (no special tokens), as ids and as text
    whose re-encoding gives those same ids, so a server tokenizing the text sees the same prompt."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise InvalidRequestError(f"--input-len must be an integer >= 1, got {length!r}")
    rng = random.Random(seed)
    for _ in range(max_tries):
        words: list[str] = []
        ids: list[int] = []
        while len(ids) < length + 4:  # a few spare tokens, so the cut is never at the very end of the text
            words.extend(rng.choice(_WORDS) for _ in range(max(8, (length - len(ids)) // 2 + 4)))
            ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
        ids = ids[:length]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        # The cut can land inside a word whose pieces re-merge differently on their own; try other words.
        if tokenizer.encode(text, add_special_tokens=False) == ids:
            return Prompt(text=text, token_ids=ids)
    raise InvalidRequestError(
        f"could not build a text prompt of exactly {length} tokens with this tokenizer in {max_tries} tries"
    )


def synthetic_prompts(tokenizer: TextTokenizer, count: int, length: int, seed: int = 0) -> list[Prompt]:
    """`count` different prompts of exactly `length` tokens each."""
    return [synthetic_prompt(tokenizer, length, seed=seed * 100003 + i) for i in range(count)]


def load_jsonl(path: str | os.PathLike[str], flag: str = "--dataset") -> list[Prompt]:
    """Prompts from a JSONL file; any problem raises an error naming the flag, the file and the line."""
    p = Path(path)
    where = f"{flag} {p}"
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequestError(f"{where}: file not found") from None
    except IsADirectoryError:
        raise InvalidRequestError(f"{where}: is a directory, not a JSONL file") from None
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{where}: not UTF-8 text") from None
    except OSError as e:
        raise InvalidRequestError(f"{where}: cannot be read: {e.strerror or e}") from None
    prompts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{where}: line {n} is not valid JSON ({e.msg})") from None
        prompts.append(_record(record, f"{where}: line {n}"))
    if not prompts:
        raise InvalidRequestError(f"{where}: no prompts in the file (one JSON object per line)")
    return prompts


def _record(record: Any, where: str) -> Prompt:
    if not isinstance(record, dict):
        raise InvalidRequestError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        raise InvalidRequestError(f"{where}: give exactly one of \"prompt\" (a string) or \"messages\" (a chat)")
    output_len = record.get("output_len")
    if output_len is not None and (isinstance(output_len, bool) or not isinstance(output_len, int) or output_len < 1):
        raise InvalidRequestError(f"{where}: \"output_len\" must be an integer >= 1, got {output_len!r}")
    if has_prompt:
        text = record["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequestError(f"{where}: \"prompt\" must be a non-empty string")
        return Prompt(text=text, output_len=output_len)
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError(f"{where}: \"messages\" must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InvalidRequestError(
                f"{where}: messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}}"
            )
    return Prompt(messages=messages, output_len=output_len)


def load_tokenizer(model: str | os.PathLike[str] | None):
    """The jisu Tokenizer of a model (GGUF file, HF folder or short name) without loading its weights."""
    from jisu.loader.gguf import open_gguf, read_metadata
    from jisu.loader.gguf_tokenizer import build_gguf_tokenizer
    from jisu.loader.hf_folder import load_hf_tokenizer
    from jisu.loader.resolve import resolve_model
    from jisu.tokenizer import Tokenizer

    path = resolve_model(model)
    if path.is_dir():
        return Tokenizer(load_hf_tokenizer(path))
    return Tokenizer(build_gguf_tokenizer(read_metadata(open_gguf(path))))


def count_tokens(tokenizer, prompt: Prompt) -> int:
    """Prompt tokens as the model's tokenizer counts them (chat template applied for a chat)."""
    if prompt.token_ids is not None:
        return len(prompt.token_ids)
    if prompt.is_chat:
        return len(tokenizer.encode_chat(prompt.messages))
    return len(tokenizer.encode(prompt.text))

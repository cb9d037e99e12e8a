"""Text <-> token ids exactly as the model's own tokenizer, chat templates, and streaming detokenization."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Sequence

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers.decoders import DecodeStream

from jisu.errors import InvalidRequestError, JisuError
from jisu.loader.checkpoint import TokenizerSpec

# Prompt tokens handed to a stream decoder as context, so the first output token decodes with the spacing
# it has after the prompt (SentencePiece drops a leading space at the start of a text).
_STREAM_CONTEXT_TOKENS = 4


class ChatTemplateError(JisuError):
    """The model's chat template failed to render or tried something the sandbox forbids."""


class Tokenizer:
    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        self._tok = spec.tokenizer
        self.bos_token_id = spec.bos_token_id
        self.eos_token_ids = tuple(spec.eos_token_ids)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._template = _compile_template(spec.chat_template) if spec.chat_template else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.spec.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            if self.spec.add_eos_token and self.eos_token_ids:
                ids = ids + [self.eos_token_ids[0]]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise InvalidRequestError("this model has no chat template; use a plain prompt instead of messages")
        validate_messages(messages)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **self.spec.special_tokens,
            )
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"the model's chat template was refused by the sandbox: {e}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the model's chat template failed: {e}") from None
        except Exception as e:  # a template doing arithmetic on what the messages lack, e.g. None + str
            raise ChatTemplateError(f"the model's chat template failed on these messages: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # The template writes BOS itself when the model wants one, as transformers' apply_chat_template.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def stream_decoder(self, prompt_ids: Sequence[int]) -> "StreamDecoder":
        return StreamDecoder(self, prompt_ids)


class StreamDecoder:
    """Turns tokens into text one at a time, emitting only complete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]):
        self._tok = tokenizer._tok
        context = list(prompt_ids[-_STREAM_CONTEXT_TOKENS:]) or None
        self._stream = DecodeStream(ids=context, skip_special_tokens=True)
        self.text = ""

    def step(self, token_id: int) -> str:
        piece = self._stream.step(self._tok, token_id) or ""
        self.text += piece
        return piece


def validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequestError(f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequestError(f"messages[{i}].content must be a string, got {type(content).__name__}")


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which changes prompts; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, refusing (rather than silently rendering empty) any unsafe attribute."""

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")


def _compile_template(source: str) -> jinja2.Template:
    # NOTE: templates come from model files, i.e. from strangers. The immutable sandbox blocks attribute
    # access to Python internals (__class__, __globals__, ...) and mutation of the values passed in.
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template does not parse: {e}") from None

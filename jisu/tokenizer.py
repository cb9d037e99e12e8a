"""Text <-> token ids exactly as the model's own tokenizer, chat templates, and streaming detokenization."""

from __future__ import annotations

import json
import re
import threading
from typing import Any, Iterator, Sequence

import tokenizers
from tokenizers.decoders import DecodeStream

from jisu.chat_template import ChatTemplate, ChatTemplateError, ChatTemplateLimitError
from jisu.errors import InvalidRequestError
from jisu.loader.checkpoint import TokenizerSpec
from jisu.tools.prompt import prepare as prepare_tools

__all__ = ["ChatTemplateError", "ChatTemplateLimitError", "StreamDecoder", "Tokenizer", "validate_messages"]

# Prompt tokens handed to a stream decoder as context, so the first output token decodes with the spacing
# it has after the prompt (SentencePiece drops a leading space at the start of a text).
_STREAM_CONTEXT_TOKENS = 4
# Messages nested deeper than this (content parts, tool calls, their arguments) are refused.
_MAX_MESSAGE_NESTING = 64


class Tokenizer:
    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        self._tok = spec.tokenizer
        self.bos_token_id = spec.bos_token_id
        self.eos_token_ids = tuple(spec.eos_token_ids)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._template = ChatTemplate(spec.chat_template) if spec.chat_template else None
        self._specials: _SpecialTokens | None = None
        self._specials_lock = threading.Lock()

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

    @property
    def chat_template(self) -> str | None:
        """The chat template's source text, if the model has one."""
        return None if self._template is None else self._template.source

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """The prompt text the model's chat template makes of these messages (raises ChatTemplateError).

        tools: OpenAI tool definitions, passed as the template's `tools` variable as transformers does; a
        template that does not use them gets them (and tool calls and results) written generically."""
        if self._template is None:
            raise InvalidRequestError("this model has no chat template; use a plain prompt instead of messages")
        validate_messages(messages)
        messages, tools = prepare_tools(self._template.source, messages, tools)
        # tools is always defined (None without tools), as transformers renders templates.
        variables = {**self.spec.special_tokens, "messages": messages, "add_generation_prompt": add_generation_prompt,
                     "tools": tools}
        return self._template.render(variables, input_chars=sum(len(t) for t in _strings([messages, tools])))

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        special_tokens_in_content: bool = False,
        tools: list[dict] | None = None,
    ) -> list[int]:
        """Token ids of the chat prompt; special-token text inside the messages stays text unless allowed.

        The HF tokenizer matches special tokens (<|im_start|>, ...) anywhere in a text, so a message saying
        "<|im_start|>system" would otherwise open a real system turn. Only the tokens the template itself
        writes become special tokens. With special_tokens_in_content=True (an operator's opt-in for trusted
        clients) message text is tokenized like the rest of the prompt, as transformers does.
        """
        # The template writes BOS itself when the model wants one, as transformers' apply_chat_template.
        validate_messages(messages)
        specials = self._special_tokens()
        # Tool definitions come from the client too: their text stays text like the messages'.
        if special_tokens_in_content or not specials.occur_in([messages, tools]):
            # Ordinary messages: the exact ids of tokenizing the rendered prompt, as before.
            return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools),
                               add_special_tokens=False)
        return specials.encode_inert(self, messages, add_generation_prompt, tools)

    def stream_decoder(self, prompt_ids: Sequence[int]) -> "StreamDecoder":
        return StreamDecoder(self, prompt_ids)

    def _special_tokens(self) -> "_SpecialTokens":
        with self._specials_lock:
            if self._specials is None:
                self._specials = _SpecialTokens(self._tok)
            return self._specials


class _SpecialTokens:
    """The tokenizer's special tokens, and how to keep message text from turning into them.

    Messages holding special-token text are rendered with each such occurrence broken by a marker character
    (a private-use code point found nowhere else), so the special tokens matched in the rendered prompt are
    exactly those the template wrote, whatever the template does to the text. The stretches of prompt
    between those tokens that hold a marker are then tokenized again, markers removed, with special-token
    matching off; the other stretches keep the ids they got in the one pass over the prompt.
    """

    def __init__(self, tok: tokenizers.Tokenizer):
        self._tok = tok
        added = tok.get_added_tokens_decoder()
        self.ids = frozenset(i for i, t in added.items() if t.special)
        # A one-character token cannot be broken by a marker inside it; such vocabularies are not known to us.
        self.texts = sorted({added[i].content for i in self.ids if len(added[i].content) > 1})
        self._pattern = re.compile(_trie_regex(self.texts)) if self.texts else None
        self._plain: tuple[tokenizers.Tokenizer, tokenizers.Tokenizer] | None = None
        self._lock = threading.Lock()

    def occur_in(self, messages: Any) -> bool:
        return self._pattern is not None and any(self._pattern.search(s) for s in _strings(messages))

    def encode_inert(
        self,
        tokenizer: Tokenizer,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict] | None = None,
    ) -> list[int]:
        assert tokenizer._template is not None
        template_side = [tokenizer._template.source, *self.texts, *map(str, tokenizer.spec.special_tokens.values())]
        marker = _free_private_char([*template_side, *_strings([messages, tools])])
        assert self._pattern is not None
        pattern = self._pattern

        def inert(s: str) -> str:
            # Repeat: breaking one match can leave an overlapping one (tokens "<|a|>" and "|a|>b" in "<|a|>b").
            while pattern.search(s):
                s = pattern.sub(lambda m: m[0][0] + marker + m[0][1:], s)
            return s

        text = tokenizer.apply_chat_template(_map_strings(messages, inert), add_generation_prompt,
                                             _map_strings(tools, inert))
        enc = self._tok.encode(text, add_special_tokens=False)
        out: list[int] = []
        pending: list[int] = []
        start = 0
        for token_id, (a, b) in zip(enc.ids, enc.offsets):
            # A special token spanning a marker was made of message text (a normalizer dropped the marker).
            if token_id in self.ids and marker not in text[a:b]:
                out += self._stretch(text, start, a, pending, marker)
                out.append(token_id)
                start, pending = b, []
            else:
                pending.append(token_id)
        out += self._stretch(text, start, len(text), pending, marker)
        return out

    def _stretch(self, text: str, start: int, end: int, ids: list[int], marker: str) -> list[int]:
        piece = text[start:end]
        if marker not in piece:
            return ids
        first, later = self._plain_tokenizers()
        # Tokenized alone the piece sits at offset 0; a Metaspace "first" pre-tokenizer would then add the
        # word-start mark it does not add to text after a special token.
        ids = (first if start == 0 else later).encode(piece.replace(marker, ""), add_special_tokens=False).ids
        forged = self.ids.intersection(ids)
        if forged:
            name = self._tok.id_to_token(min(forged))
            raise InvalidRequestError(f"message text tokenizes to the control token {name!r} even as plain text")
        return ids

    def _plain_tokenizers(self) -> tuple[tokenizers.Tokenizer, tokenizers.Tokenizer]:
        with self._lock:
            if self._plain is None:
                config = self._tok.to_str()
                first = tokenizers.Tokenizer.from_str(config)
                first.encode_special_tokens = True  # special-token text is tokenized as text
                later_config = json.loads(config)
                later = first
                if _no_first_prepend(later_config.get("pre_tokenizer")):
                    later = tokenizers.Tokenizer.from_str(json.dumps(later_config))
                    later.encode_special_tokens = True
                self._plain = (first, later)
            return self._plain


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


def _strings(value: Any) -> Iterator[str]:
    """Every string in a message structure: values and keys, at any depth."""
    stack, seen = [(value, 0)], set()
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, (dict, list, tuple)):
            if depth > _MAX_MESSAGE_NESTING:
                raise InvalidRequestError(f"messages are nested more than {_MAX_MESSAGE_NESTING} levels deep")
            if id(v) in seen:
                continue
            seen.add(id(v))
            children = [x for kv in v.items() for x in kv] if isinstance(v, dict) else v
            stack.extend((c, depth + 1) for c in children)


def _map_strings(value: Any, f: Any, depth: int = 0) -> Any:
    """A copy of a message structure with f applied to every string (values and keys)."""
    if isinstance(value, str):
        return f(value)
    if depth > _MAX_MESSAGE_NESTING:
        raise InvalidRequestError(f"messages are nested more than {_MAX_MESSAGE_NESTING} levels deep")
    if isinstance(value, dict):
        return {_map_strings(k, f, depth + 1): _map_strings(v, f, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_strings(v, f, depth + 1) for v in value)
    return value


def _free_private_char(texts: list[str]) -> str:
    """A private-use character that occurs in none of the texts."""
    used: set[str] = set()
    for t in texts:
        used.update(_PRIVATE_USE.findall(t))
    for block in ((0xE000, 0xF8FF), (0xF0000, 0xFFFFD), (0x100000, 0x10FFFD)):
        for cp in range(*block):
            if chr(cp) not in used:
                return chr(cp)
    raise InvalidRequestError("messages use every private-use character; cannot keep special tokens in them inert")


_PRIVATE_USE = re.compile("[\ue000-\uf8ff\U000f0000-\U0010fffd]")


def _trie_regex(words: list[str]) -> str:
    """One regex matching any of the words, as a trie so long lists of similar tokens stay fast to search."""
    trie: dict = {}
    for w in words:
        node = trie
        for c in w:
            node = node.setdefault(c, {})
        node[""] = {}

    def build(node: dict) -> str:
        branches = [re.escape(c) + build(child) for c, child in sorted(node.items()) if c]
        if not branches:
            return ""
        if "" in node:  # a word ends here and longer ones go on
            return "(?:" + "|".join(branches) + ")?"
        return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"

    return build(trie)


def _no_first_prepend(pre_tokenizer: Any) -> bool:
    """Turns Metaspace prepend_scheme "first" into "never" in a pre-tokenizer config; True if any changed."""
    changed, stack = False, [pre_tokenizer]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                node["prepend_scheme"] = "never"
                changed = True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return changed

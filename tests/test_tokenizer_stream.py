"""Streaming detokenization and the chat-template sandbox, on the default model's tokenizer."""

from __future__ import annotations

import pytest

from jisu.errors import JisuError
from jisu.loader.checkpoint import TokenizerSpec
from jisu.tokenizer import ChatTemplateError, Tokenizer

TEXTS = [
    "Hello, world! 你好，世界。",
    "emoji: 🦀🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵",
    "combining: e\u0301 a\u0308 — dashes – and “quotes”",
    "code:\n\tdef f(x):\n\t\treturn x ** 2  # ½ ⅓",
    "日本語のテキストと한국어",
]


@pytest.fixture(scope="module")
def tokenizer(real_model_path):
    from tiny_models import smollm2_checkpoint

    return Tokenizer(smollm2_checkpoint().tokenizer)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_never_emits_broken_utf8_and_equals_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = tokenizer.stream_decoder(prompt)
    pieces = [decoder.step(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    # Multi-byte characters really were split across tokens somewhere, or this test proves little.
    if any(ord(c) > 0x2000 for c in text):
        assert any(p == "" for p in pieces)


def _with_template(tokenizer: Tokenizer, template: str) -> Tokenizer:
    spec = tokenizer.spec
    return Tokenizer(TokenizerSpec(spec.tokenizer, spec.bos_token_id, spec.eos_token_ids, spec.add_bos_token,
                                   chat_template=template, special_tokens=spec.special_tokens))


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages.__class__ }}",
        "{{ messages.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__.__base__.__subclasses__() }}",
        "{{ raise_exception.__globals__['os'].system('echo pwned') }}",
        "{% set x = messages.append({'role': 'user'}) %}{{ x }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    ],
)
def test_template_cannot_reach_python_internals(tokenizer, template):
    hostile = _with_template(tokenizer, template)
    with pytest.raises(ChatTemplateError) as err:
        hostile.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "sandbox" in str(err.value) or "failed" in str(err.value)


def test_model_template_renders_and_raise_exception_is_a_clear_error(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n") and "hi" in text
    strict = _with_template(tokenizer, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        strict.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_type_errors_become_clear_errors(tokenizer):
    # (content None no longer reaches such a template: jisu.tools.prompt writes it as "" for templates that know
    # no tool calls, where null content comes from.)
    strict = _with_template(tokenizer, "{% for m in messages %}{{ 'x' + (m['content'] | length) }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="TypeError"):
        strict.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("messages", [[], "hello", [{"content": "no role"}], [{"role": "user", "content": 5}]])
def test_bad_messages_are_named(tokenizer, messages):
    with pytest.raises(JisuError, match="messages"):
        tokenizer.apply_chat_template(messages)

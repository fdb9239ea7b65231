"""Tokenizer: exact round trips, chat templates, and streaming detokenization across multi-byte characters."""

from __future__ import annotations

import pytest

from reference.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return Tokenizer(smollm2[1])


TEXTS = [
    "The capital of France is Paris.",
    "  leading spaces,\ttabs\nand newlines  ",
    "naïve café — 東京 🚀🎉 done",
    "def f(x):\n    return x ** 2\n",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_keeps_every_character(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_concatenate_to_the_full_text(tokenizer, text):
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push([token]) for token in tokenizer.encode(text)]
    assert "".join(deltas) == text == detokenizer.text
    assert all("\ufffd" not in d for d in deltas)


def test_multibyte_character_is_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("🚀")
    assert len(ids) > 1, "the rocket emoji should span several byte-level tokens"
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push([t]) for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🚀"


def test_chat_template_wraps_the_conversation(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}])
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert "<|im_start|>user\nHi there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_checkpoint_without_tokenizer_refuses_text(checkpoint_factory):
    tokenizer = Tokenizer(checkpoint_factory("llama"))
    assert not tokenizer.available
    with pytest.raises(ValueError, match="token ids"):
        tokenizer.encode("hello")

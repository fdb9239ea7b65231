"""Turning a request's prompt into token ids, off the engine thread and within bounds.

Tokenizing is the one part of a request whose cost grows with what the client sends: a 5 MB prompt takes
seconds. Done on the engine thread, those seconds would stall every running stream, so it happens here,
on one worker thread of its own, after two cheap checks that refuse what can never fit:

- text that contains a lone UTF-16 surrogate ("\\ud800" is valid JSON, but no tokenizer can encode it);
- text so long that even if every token covered the longest token's characters, it would still be more than
  `max_model_len` tokens (a bound computed once from the vocabulary), so most of a huge prompt is never
  tokenized at all.

The exact context-length check, on the token count, stays with the engine thread (engine_thread.py).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from ..tokenizer import Tokenizer
from .protocol import APIError

SLACK = 4  # headroom on the character bound, for normalisers that shorten text before tokenizing


def longest_token_chars(tokenizer: Tokenizer) -> int:
    """An upper bound on the characters one token can stand for: the longest entry of the vocabulary as written
    (byte-level vocabularies write one character per byte, and a byte is at most one character of text)."""
    return max((len(token) for token in tokenizer.vocabulary()), default=1)


def check_text(text: str, param: str) -> None:
    """Refuse text that no tokenizer can encode (a lone surrogate), naming where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param} contains a lone UTF-16 surrogate ({text[exc.start]!a}) at character "
                            f"{exc.start}: send valid Unicode (a surrogate must be half of a pair)",
                       param=param) from None


class PromptEncoder:
    """Encodes prompts and chat conversations on a worker thread (one, so the tokenizer is never shared)."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_chars = (SLACK * longest_token_chars(tokenizer) * max_model_len if tokenizer.available
                          else None)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    async def encode(self, prompt: str | list[int] | None, messages: list[dict[str, str]] | None,
                     param: str) -> list[int]:
        """Token ids of a completion prompt (text or ids) or of chat messages; APIError(400) when refused."""
        if isinstance(prompt, list):
            return list(prompt)
        if not self.tokenizer.available:
            raise APIError(400, f"this server has no tokenizer: send the {param} as token ids", param=param)
        texts = [prompt] if messages is None else [m["content"] for m in messages]
        for text in texts:
            check_text(text, param)
        chars = sum(len(text) for text in texts)
        if self.max_chars is not None and chars > self.max_chars:
            raise APIError(400, f"the {param} has {chars} characters, more than {self.max_model_len} tokens can "
                                f"hold in this model's context (max_model_len): shorten it", param=param,
                           code="context_length_exceeded")
        if messages is None:
            work = self.tokenizer.encode, prompt
        else:
            work = self.tokenizer.apply_chat_template, messages
        try:
            return await asyncio.get_running_loop().run_in_executor(self._worker, *work)
        except ValueError as exc:  # e.g. a chat request to a model whose tokenizer has no chat template
            raise APIError(400, str(exc), param=param) from None

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

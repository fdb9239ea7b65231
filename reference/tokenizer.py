"""Text <-> token ids: encoding, chat templates and streaming (incremental) detokenization.

A thin layer over a Hugging Face tokenizer loaded from the checkpoint directory. A checkpoint without tokenizer
files still loads; then only token-id prompts work, and text raises a clear error.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class Tokenizer:
    def __init__(self, model_dir: str | Path | None) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self._hf = None
        if self.model_dir is not None and any((self.model_dir / name).is_file() for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(self.model_dir))

    @property
    def available(self) -> bool:
        return self._hf is not None

    def _require(self):
        if self._hf is None:
            raise ValueError(
                f"{self.model_dir or 'this model'} has no tokenizer files, so prompts must be lists of token ids, "
                "not text"
            )
        return self._hf

    @property
    def eos_token_ids(self) -> set[int]:
        if self._hf is None or self._hf.eos_token_id is None:
            return set()
        return {self._hf.eos_token_id}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the special tokens the model's tokenizer adds by default (e.g. BOS)."""
        return list(self._require()(text)["input_ids"])

    def vocabulary(self) -> list[str]:
        """Every token as the vocabulary writes it (added and special tokens included)."""
        return list(self._require().get_vocab())

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._require().decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation formatted by the model's chat template, ending where the reply starts."""
        hf = self._require()
        if not hf.chat_template:
            raise ValueError(f"the tokenizer in {self.model_dir} has no chat template; send plain prompts instead")
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already wrote any BOS token it wants, so do not add special tokens again.
        return list(hf(text, add_special_tokens=False)["input_ids"])


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that are safe to print.

    Decoding token by token is wrong twice over: one character can span several byte-level tokens (emoji,
    accented letters) and some tokenizers decide a token's leading space from its left neighbour. So we decode a
    short window that starts a few tokens back, and emit only the text beyond what that window decoded to
    before; a trailing U+FFFD means an unfinished character, so we wait for the next token.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # the window starts here...
        self._read_offset = 0  # ...and the text up to here has been emitted

    def push(self, token_ids: list[int]) -> str:
        """Add new token ids; return the newly completed text (possibly empty)."""
        self.token_ids.extend(token_ids)
        decode = lambda ids: self.tokenizer.decode(ids, self.skip_special_tokens)  # noqa: E731
        before = decode(self.token_ids[self._prefix_offset : self._read_offset])
        after = decode(self.token_ids[self._prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        self.text += delta
        return delta

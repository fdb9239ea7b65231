"""Lab 0.1 (From text to tensors): what runs beside learner code: the preamble, the references and the driver.

The references are thin adapters over the `reference` engine (RMSNorm, RoPE, attention, MLP, decoder layer,
KV cache, top-k/top-p filtering, packing metadata); the byte-level BPE of notebook 1 has no counterpart in the
engine (which uses the model's own tokenizer), so its reference is here. Everything the references need from
`reference` is bound at import time, so a grader that later hides those symbols from learner code does not break
the stand-ins. The cases are in autograder/labs/lab0_1.py.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from reference.attention import build_metadata
from reference.attention.torch_ref import attend_one_sequence, gather_context, store_kvcache
from reference.config import ModelConfig
from reference.kv_cache import ContiguousKVCache, kv_bytes_per_token
from reference.models.llama import MLP, DecoderLayer, RMSNorm
from reference.models.rotary import RotaryEmbedding, apply_rotary
from reference.sampling import _apply_top_k_top_p

# Exercise cells may rely on these imports and nothing else from their notebook.
PREAMBLE = """\
import math
from collections import Counter, defaultdict
import torch
import torch.nn.functional as F
from torch import nn
"""


def drive_calls(fn, inputs: dict[str, Any]) -> Any:
    """The default driver (one call, the inputs as positional arguments), or, for inputs {"calls": [arguments,
    ...]}, one call per entry and the list of results: an edge case (an absent pair, an empty batch) is checked
    beside an ordinary call, so that a function returning its input or a constant cannot pass it."""
    if set(inputs) == {"calls"}:
        return [fn(*call.values()) for call in inputs["calls"]]
    return fn(*inputs.values())


def _config(**fields: Any) -> ModelConfig:
    """A ModelConfig for a tiny Llama-family module; only the fields a test cares about need be given."""
    base = dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=1, num_key_value_heads=1, head_dim=8)
    return ModelConfig(**{**base, **fields})


# ============================================================================================================
# Notebook 1: tokens and embeddings
# ============================================================================================================


def ref_bpe_merge_step(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def ref_bpe_train(text: str, num_merges: int) -> list[tuple[int, int]]:
    ids = list(text.encode("utf-8"))
    merges: list[tuple[int, int]] = []
    for i in range(num_merges):
        counts = Counter(zip(ids, ids[1:]))
        if not counts:
            break
        pair = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))  # most frequent, then smallest pair
        ids = ref_bpe_merge_step(ids, pair, 256 + i)
        merges.append(pair)
    return merges


def ref_bpe_encode(text: str, merges: list[tuple[int, int]]) -> list[int]:
    ids = list(text.encode("utf-8"))
    for i, pair in enumerate(merges):
        ids = ref_bpe_merge_step(ids, tuple(pair), 256 + i)
    return ids


def ref_pack_batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    positions, metadata = build_metadata([len(p) for p in prompts], None, None, None, "cpu")
    input_ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64)
    return input_ids, positions, metadata.cu_seqlens_q


# ============================================================================================================
# Notebook 2: the decoder forward pass
# ============================================================================================================


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = RMSNorm(x.shape[-1], eps)
    norm.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        return norm(x)


def ref_apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    longest = int(positions.max()) + 1 if positions.numel() else 1
    rotary = RotaryEmbedding(_config(head_dim=x.shape[-1], rope_theta=float(theta), max_position_embeddings=longest))
    cos, sin = rotary.cos_sin(positions)
    return apply_rotary(x, cos, sin)


def ref_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attend_one_sequence(q, k, v, q.shape[-1] ** -0.5)


def ref_swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    mlp = MLP(_config(hidden_size=x.shape[-1], intermediate_size=w_gate.shape[0]))
    mlp.load_state_dict({"gate_proj.weight": w_gate, "up_proj.weight": w_up, "down_proj.weight": w_down})
    with torch.no_grad():
        return mlp(x)


LAYER_WEIGHT_NAMES = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def ref_decoder_layer(hidden: torch.Tensor, positions: torch.Tensor, weights: dict[str, torch.Tensor],
                      config: dict[str, Any]) -> torch.Tensor:
    cfg = _config(
        hidden_size=hidden.shape[-1], intermediate_size=weights["mlp.gate_proj.weight"].shape[0],
        num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"], rms_norm_eps=config["rms_norm_eps"], rope_theta=float(config["rope_theta"]),
        max_position_embeddings=int(positions.max()) + 1,
    )
    layer = DecoderLayer(cfg)
    layer.load_state_dict(weights)
    rope = RotaryEmbedding(cfg).cos_sin(positions)
    _, metadata = build_metadata([hidden.shape[0]], None, None, None, "cpu")
    with torch.no_grad():
        return layer(hidden, rope, metadata, None)


# ============================================================================================================
# Notebook 3: the KV cache and sampling
# ============================================================================================================

_DTYPE_BY_SIZE = {1: torch.int8, 2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


def ref_kv_cache_bytes(config: dict[str, Any], num_tokens: int, dtype_bytes: int) -> int:
    filled = {"model_type": "llama", "vocab_size": 1, "intermediate_size": 1, **config}
    return kv_bytes_per_token(ModelConfig.from_hf_dict(filled), _DTYPE_BY_SIZE[dtype_bytes]) * num_tokens


class ReferenceKVCache:
    """The reference for exercise kv_cache: the engine's ContiguousKVCache behind the exercise's interface."""

    def __init__(self, num_layers: int, max_batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        config = _config(num_hidden_layers=num_layers, num_attention_heads=num_kv_heads,
                         num_key_value_heads=num_kv_heads, head_dim=head_dim)
        self.max_batch, self.max_len = max_batch, max_len
        self._cache = ContiguousKVCache(config, max_batch, max_len, dtype, "cpu")

    def update(self, layer: int, row: int, start: int, k: torch.Tensor, v: torch.Tensor):
        count = k.shape[0]
        if not 0 <= row < self.max_batch or start < 0 or start + count > self.max_len:
            raise ValueError(f"positions {start}..{start + count - 1} of row {row} do not fit a "
                             f"[{self.max_batch} x {self.max_len}] cache")
        k_cache, v_cache = self._cache.layers[layer]
        slots = row * self._cache.block_size + torch.arange(start, start + count)
        store_kvcache(k, v, k_cache, v_cache, slots)
        table = torch.tensor(self._cache.block_table(row))
        return gather_context(k_cache, table, start + count), gather_context(v_cache, table, start + count)

    @property
    def nbytes(self) -> int:
        return self._cache.total_bytes


_ALLOWED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def drive_kv_cache(cls: type, inputs: dict[str, Any]) -> list[Any]:
    """Build the cache from inputs["init"], replay inputs["ops"]; one trace entry per op.

    update -> [K, V] (copies taken right away, since later updates may overwrite a returned view);
    nbytes -> int; an op that raises -> {"error": "Type: message"} (NotImplementedError propagates).
    """
    init = dict(inputs["init"])
    init["dtype"] = _ALLOWED_DTYPES[init["dtype"]]
    cache = cls(**init)
    trace: list[Any] = []
    for op in inputs["ops"]:
        try:
            if op["op"] == "update":
                k_all, v_all = cache.update(op["layer"], op["row"], op["start"], op["k"], op["v"])
                trace.append([_snapshot(k_all), _snapshot(v_all)])
            else:
                trace.append(cache.nbytes)
        except NotImplementedError:
            raise
        except Exception as exc:
            trace.append({"error": f"{type(exc).__name__}: {exc}"})
    return trace


def _snapshot(value: Any) -> Any:
    return torch.Tensor.clone(value) if type(value) is torch.Tensor else value


def ref_sample_next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                          uniform: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    rows = logits.shape[0]
    filtered = _apply_top_k_top_p(logits / temperature, [top_k] * rows, [top_p] * rows)
    probs = filtered.softmax(dim=-1)
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True, stable=True)
    cdf = sorted_probs.cumsum(dim=-1)
    kept = (sorted_probs > 0).sum(dim=-1)
    index = torch.minimum((cdf <= uniform[:, None]).sum(dim=-1), kept - 1)  # first j with cdf_j > u
    return sorted_ids.gather(-1, index[:, None]).squeeze(-1)

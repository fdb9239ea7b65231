"""The tensor-parallel plan of the Llama-family model: which layer becomes which parallel layer, and how a rank
loads its slices. The model's own code (models/llama.py) does not change: `parallelize` swaps its layers.

    attention   q_proj, k_proj, v_proj: column-parallel by heads   o_proj: row-parallel (all-reduce)
    MLP         gate_proj, up_proj: column-parallel                down_proj: row-parallel (all-reduce)
    embedding   vocab-parallel (all-reduce)                        LM head: vocab-parallel (all-gather)
    norms, rotary tables: whole on every rank

Each rank gets size-th of the query heads. Key/value heads are split the same way when there are at least as
many as ranks; with fewer (e.g. 2 KV heads over 4 ranks), each rank keeps the one KV head its query heads use,
so a KV head is replicated over the ranks that share it. The KV cache of a rank holds its own KV heads only:
after `parallelize`, model.config describes the rank's share (its query heads, KV heads and MLP width; the
vocabulary and hidden size stay whole), so whatever is sized from it, the KV cache above all, is per rank.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import ModelConfig
from .group import TensorParallel
from .layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, SourceRange, VocabParallelEmbedding


def valid_sizes(config: ModelConfig) -> list[int]:
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    return [size for size in range(1, heads + 1) if heads % size == 0 and (kv % size == 0 or size % kv == 0)
            and config.intermediate_size % size == 0]


def check_shardable(config: ModelConfig, size: int) -> None:
    """Raise a ValueError naming the sizes that work, unless the model splits evenly over `size` ranks."""
    if size not in valid_sizes(config):
        raise ValueError(
            f"tensor_parallel_size={size} does not split this model evenly: it has "
            f"{config.num_attention_heads} query heads, {config.num_key_value_heads} key/value heads and an MLP "
            f"of {config.intermediate_size}; each rank must get a whole number of query heads and of key/value "
            f"heads (or share one), so use one of {valid_sizes(config)}")


def kv_head_range(config: ModelConfig, tp: TensorParallel) -> tuple[int, int]:
    """[start, end) of the key/value heads this rank keeps."""
    kv = config.num_key_value_heads
    if kv >= tp.size:
        return tp.split(kv)
    head = tp.rank * kv // tp.size  # the KV head that this rank's query heads share
    return head, head + 1


def parallelize(model: nn.Module, tp: TensorParallel) -> nn.Module:
    """Swap the layers of a LlamaForCausalLM for this rank's parallel ones (build it on the meta device, then
    load weights with `load_shards` or loader.load_weights). Size 1 leaves the model as it is."""
    config: ModelConfig = model.config
    check_shardable(config, tp.size)
    if tp.size == 1:
        return model
    hidden, d = config.hidden_size, config.head_dim
    q0, q1 = tp.split(config.num_attention_heads)
    k0, k1 = kv_head_range(config, tp)
    m0, m1 = tp.split(config.intermediate_size)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = ColumnParallelLinear(hidden, (q0 * d, q1 * d), config.attention_bias)
        attn.k_proj = ColumnParallelLinear(hidden, (k0 * d, k1 * d), config.attention_bias)
        attn.v_proj = ColumnParallelLinear(hidden, (k0 * d, k1 * d), config.attention_bias)
        attn.o_proj = RowParallelLinear((q0 * d, q1 * d), hidden, False, tp)
        attn.num_heads, attn.num_kv_heads = q1 - q0, k1 - k0
        mlp.gate_proj = ColumnParallelLinear(hidden, (m0, m1), config.mlp_bias)
        mlp.up_proj = ColumnParallelLinear(hidden, (m0, m1), config.mlp_bias)
        mlp.down_proj = RowParallelLinear((m0, m1), hidden, config.mlp_bias, tp)
    model.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, tp)
    model.lm_head = ParallelLMHead(config.vocab_size, hidden, tp)
    model.config = dataclasses.replace(config, num_attention_heads=q1 - q0, num_key_value_heads=k1 - k0,
                                       intermediate_size=m1 - m0)
    model.tie_weights()
    return model


def source_range(model: nn.Module, name: str) -> SourceRange:
    """The part of checkpoint tensor `name` that this rank's model holds (None: all of it)."""
    module_name, _, param = name.rpartition(".")
    module = model.get_submodule(module_name)
    return module.source_range(param) if hasattr(module, "source_range") else None


def copy_shard(param: torch.Tensor, piece: torch.Tensor, where: SourceRange) -> None:
    """Copy a rank's piece of a checkpoint tensor into its parameter (a short last vocabulary slice is padded
    with zeros)."""
    if where is None or param.shape == piece.shape:
        param.copy_(piece)
        return
    dim = where[0]
    param.zero_()
    param.narrow(dim, 0, piece.shape[dim]).copy_(piece)


@torch.no_grad()
def load_shards(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Fill a parallelized model from the full tensors of an unsplit one (e.g. its state_dict)."""
    for name, param in model.named_parameters():
        where = source_range(model, name)
        piece = full[name] if where is None else full[name].narrow(where[0], where[1], where[2] - where[1])
        copy_shard(param, piece, where)

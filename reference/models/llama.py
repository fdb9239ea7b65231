"""The Llama-family decoder (Llama, Qwen2, Qwen3) in plain PyTorch, one concept per class.

    token ids -> Embedding -> N x DecoderLayer -> RMSNorm -> LM head -> logits
    DecoderLayer: x + Attention(RMSNorm(x)), then x + MLP(RMSNorm(x))

With fused kernels (use_fused_kernels, on the GPU) the same sums run in another form: each residual add is done
by the RMSNorm that follows it, in one kernel (DecoderLayer.forward_fused).

The model works on a packed batch: `input_ids` and `positions` are flat [num_tokens] vectors holding the new
tokens of every sequence in this step, one after another. Where one sequence ends and the next begins, and
where the KV cache lives, is in the AttentionMetadata the model runner built; the model does not know about
requests or scheduling. Parameter names match Hugging Face's, so checkpoints load without renaming.

`pack_projections` is the fast twin of the projections: q/k/v become one matrix multiply and gate/up another
(fewer, larger GEMMs), while every nn.Linear stays, its parameters now views of the packed rows, so the
state_dict and the Hugging Face names are unchanged. On the CPU in float32 it also gives every projection and the
LM head an MKL-packed twin of its weight (mkl_packed.py), which the forward pass multiplies by instead.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionMetadata, TorchAttentionBackend
from ..config import ModelConfig
from .mkl_packed import MklPackedWeight, linear, pack_linear, pack_weight
from .packing import pack_linears, unpack_linears, use_gemm_layout
from .rotary import RotaryEmbedding, apply_rotary

# The fused Triton kernels (fused.py), imported by use_fused_kernels: importing the model must not import Triton
# (Triton is Linux-only, and the labs choose when to import it, e.g. after setting TRITON_INTERPRET=1).
fused = None
fused_qk = None  # fused_qk.py: q/k-norm, RoPE and the KV store in one launch, imported with fused


def fused_available() -> bool:
    return importlib.util.find_spec("triton") is not None

# Per layer: (k_cache, v_cache), each [num_blocks, block_size, kv_heads, head_dim]; None = no cache.
KVCaches = list[tuple[torch.Tensor, torch.Tensor]] | None


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as Hugging Face does) for stability."""

    fused = False  # True: one Triton kernel (fused.py) instead of the torch code below

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fused.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + x, self(residual + x)): the fused path's residual add, done by the norm after it (one kernel
        reads x and the residual once instead of an add kernel and a norm kernel reading the sum again)."""
        if self.fused:
            return fused.add_rms_norm(x, residual, self.weight, self.eps)
        residual = residual + x
        return residual, self(residual)


class Attention(nn.Module):
    """Grouped-query attention: `heads` query heads share `kv_heads` key/value heads (kv_heads divides heads)."""

    fused = False  # True: q/k-norm and RoPE as Triton kernels, q and k in one launch each
    packed_qkv = None  # (weight, bias) of q, k, v stacked, set by pack(): one matrix multiply instead of three
    mkl_qkv: MklPackedWeight | None = None  # MKL-packed twins (CPU float32), set by pack()
    mkl_o: MklPackedWeight | None = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:  # Qwen3
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.backend = TorchAttentionBackend()  # the model runner may swap in a faster one

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.project_qkv(hidden)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        k_cache, v_cache = kv_cache if kv_cache is not None else (None, None)
        if self.fused:  # one launch from the packed q/k/v output (read in place) to the cache
            # Backends that say so take the new K/V already stored (the store is the same launch's last write).
            # Not inside the decode kernel: done there, it delayed every program's first KV load and decode steps
            # got 2% slower on an H200 (benchmarks/RESULTS.md, 2026-12-02 twelfth session).
            store = k_cache is not None and metadata.uses_cache and getattr(self.backend, "accepts_stored_kv", False)
            options = {}
            if self.qk_norm:
                options.update(q_weight=self.q_norm.weight, k_weight=self.k_norm.weight, eps=self.q_norm.eps)
            if store:
                q, k = fused_qk.qk_norm_rope_store(q, k, v, cos, sin, **options, k_cache=k_cache, v_cache=v_cache,
                                                   slot_mapping=metadata.slot_mapping)
                out = self.backend.forward(q, k, v, k_cache, v_cache, metadata, self.scale, kv_stored=True)
            else:
                q, k = fused_qk.qk_norm_rope_store(q, k, v, cos, sin, **options)
                out = self.backend.forward(q, k, v, k_cache, v_cache, metadata, self.scale)
        else:
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            out = self.backend.forward(q, k, v, k_cache, v_cache, metadata, self.scale)
        out = out.reshape(num_tokens, self.num_heads * self.head_dim)
        return self.o_proj(out) if self.mkl_o is None else self.mkl_o(out, self.o_proj.bias)

    def project_qkv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden: [num_tokens, hidden_size] -> q, k, v: [num_tokens, heads * head_dim] (views when packed)."""
        if self.packed_qkv is None:
            return self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
        sizes = [proj.weight.shape[0] for proj in (self.q_proj, self.k_proj, self.v_proj)]
        return linear(hidden, *self.packed_qkv, self.mkl_qkv).split(sizes, dim=-1)

    def pack(self, enabled: bool = True) -> None:
        """Run q/k/v as one matrix multiply (enabled) or as the three nn.Linear layers again."""
        if enabled and self.packed_qkv is None:
            self.packed_qkv = pack_linears([self.q_proj, self.k_proj, self.v_proj])
            use_gemm_layout(self.o_proj)  # column-major on the CPU (packing.py)
            self.mkl_qkv, self.mkl_o = pack_weight(self.packed_qkv[0]), pack_linear(self.o_proj)
        elif not enabled:
            self.packed_qkv = self.mkl_qkv = self.mkl_o = None
            unpack_linears([self.q_proj, self.k_proj, self.v_proj, self.o_proj])


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    fused = False  # True: silu(gate) * up as one Triton kernel
    packed_gate_up = None  # (weight, bias) of gate and up stacked, set by pack(): one matrix multiply
    mkl_gate_up: MklPackedWeight | None = None  # MKL-packed twins (CPU float32), set by pack()
    mkl_down: MklPackedWeight | None = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project_gate_up(x)
        if self.fused:
            return self.down_proj(fused.silu_and_mul(gate, up))
        hidden = F.silu(gate) * up
        return self.down_proj(hidden) if self.mkl_down is None else self.mkl_down(hidden, self.down_proj.bias)

    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [num_tokens, hidden_size] -> gate, up: [num_tokens, intermediate_size] (views when packed)."""
        if self.packed_gate_up is None:
            return self.gate_proj(x), self.up_proj(x)
        return linear(x, *self.packed_gate_up, self.mkl_gate_up).chunk(2, dim=-1)

    def pack(self, enabled: bool = True) -> None:
        """Run gate/up as one matrix multiply (enabled) or as the two nn.Linear layers again."""
        if enabled and self.packed_gate_up is None:
            self.packed_gate_up = pack_linears([self.gate_proj, self.up_proj])
            use_gemm_layout(self.down_proj)
            self.mkl_gate_up, self.mkl_down = pack_weight(self.packed_gate_up[0]), pack_linear(self.down_proj)
        elif not enabled:
            self.packed_gate_up = self.mkl_gate_up = self.mkl_down = None
            unpack_linears([self.gate_proj, self.up_proj, self.down_proj])


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, hidden, rope, metadata, kv_cache) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rope, metadata, kv_cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def forward_fused(self, hidden, residual, rope, metadata, kv_cache) -> tuple[torch.Tensor, torch.Tensor]:
        """forward as the fused kernels run it (vLLM's form): each residual add is left to the RMSNorm after it,
        which adds and normalises in one kernel. Takes and returns (the last branch's output, the residual stream
        without it); residual None: hidden is the embedding, nothing to add yet. Same values as forward."""
        if residual is None:
            residual, normed = hidden, self.input_layernorm(hidden)
        else:
            residual, normed = self.input_layernorm.add_and_norm(hidden, residual)
        attention = self.self_attn(normed, rope, metadata, kv_cache)
        residual, normed = self.post_attention_layernorm.add_and_norm(attention, residual)
        return self.mlp(normed), residual


class DecoderModel(nn.Module):
    """Embedding, the stack of decoder layers and the final norm (Hugging Face's `model.` prefix)."""

    fused = False  # True: the layers pass (output, residual) on, for the fused add + RMSNorm kernel

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids, positions, metadata, kv_caches: KVCaches) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary.cos_sin(positions)
        if self.fused:
            return self.forward_fused(hidden, rope, metadata, kv_caches)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, rope, metadata, None if kv_caches is None else kv_caches[i])
        return self.norm(hidden)

    def forward_fused(self, hidden, rope, metadata, kv_caches: KVCaches) -> torch.Tensor:
        """forward's layer loop in DecoderLayer.forward_fused's form; the final norm does the last residual add."""
        residual = None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer.forward_fused(hidden, residual, rope, metadata,
                                                   None if kv_caches is None else kv_caches[i])
        return self.norm.add_and_norm(hidden, residual)[1]


class LlamaForCausalLM(nn.Module):
    """The whole model: `forward` gives hidden states, `compute_logits` turns the rows you need into logits.

    Logits are computed only for the rows that will be sampled (the last token of each sequence), which saves
    a [num_tokens, vocab] matrix during prefill.
    """

    mkl_lm_head: MklPackedWeight | None = None  # the LM head's MKL-packed twin (CPU float32), set by pack_projections

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share one matrix between the embedding and the LM head when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        kv_caches: KVCaches = None,
    ) -> torch.Tensor:
        """input_ids, positions: int64 [num_tokens] -> hidden states [num_tokens, hidden_size]."""
        return self.model(input_ids, positions, metadata, kv_caches)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """hidden: [rows, hidden_size] -> float32 logits [rows, vocab_size]; upcast=False: in the model's dtype.

        The fast runner keeps bf16 logits: its samplers read them directly and upcast where they compute (the
        same values: bf16 -> float32 is exact), and a float32 copy of 256 x 152k logits is 155 MB written and read
        again every decode step."""
        if self.mkl_lm_head is not None:  # CPU float32: already float32
            return self.mkl_lm_head(hidden)
        logits = self.lm_head(hidden)
        return logits.float() if upcast else logits

    def use_fused_kernels(self, enabled: bool = True) -> None:
        """Run the residual add + RMSNorm, RMSNorm, RoPE and SiLU-and-multiply as fused Triton kernels (see
        fused.py). The model must be on the GPU, or on the CPU with Triton's interpreter (TRITON_INTERPRET=1)."""
        global fused, fused_qk
        if enabled and fused is None:
            if not fused_available():
                raise ValueError("fused kernels need Triton, which is not installed (it is Linux-only)")
            from . import fused, fused_qk
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP, DecoderModel)):
                module.fused = enabled

    def pack_projections(self, enabled: bool = True) -> None:
        """q/k/v and gate/up each as one matrix multiply (see pack_linears); after loading and tensor-parallel
        slicing, on the model's device and dtype. The parameter names and the state_dict do not change. On the CPU
        in float32 the projections and the LM head also get MKL-packed twins (mkl_packed.py)."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP)):
                module.pack(enabled)
        self.mkl_lm_head = pack_linear(self.lm_head) if enabled else None

    def set_attention_backend(self, backend) -> None:
        for layer in self.model.layers:
            layer.self_attn.backend = backend

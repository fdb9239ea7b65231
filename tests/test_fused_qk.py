"""fused_qk.qk_norm_rope_store (q/k-norm, RoPE and the KV store in one launch) against the three launches it
replaces: fused.rms_norm_pair, fused.apply_rotary_pair, triton_ops.store_kvcache. Bit for bit, in the Triton
interpreter (float32, float16) and compiled on the GPU (bfloat16, float16; the `gpu` tests), and through a whole
model with a paged cache: the backend that takes the K/V already stored gives the logits and caches of the one
that stores them itself."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from reference.attention import build_metadata  # noqa: E402  (after the skip: Triton is Linux-only)
from reference.attention import triton_ops  # noqa: E402
from reference.models import fused, fused_qk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]


def packed_qkv(tokens, heads, kv_heads, head_dim, dtype, device, generator):
    """q, k, v as the packed projection leaves them: [tokens, heads, head_dim] views of one [tokens, sum] matrix."""
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    qkv = (torch.randn(tokens, sum(sizes), generator=generator) * 2).to(device, dtype)
    return [part.view(tokens, size // head_dim, head_dim) for part, size in zip(qkv.split(sizes, dim=-1), sizes)]


def three_launches_and_one(tokens, heads, kv_heads, head_dim, dtype, device=DEVICE, norm=True, block_size=16):
    """Run both paths on the same inputs (random caches, some padding slots) and compare every output bit."""
    generator = torch.Generator().manual_seed(tokens * 31 + head_dim)
    q, k, v = packed_qkv(tokens, heads, kv_heads, head_dim, dtype, device, generator)
    angles = torch.randn(tokens, 1, head_dim // 2, generator=generator).repeat(1, 1, 2)  # both halves alike
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    weights = [(torch.rand(head_dim, generator=generator) + 0.5).to(device, dtype) for _ in range(2)]
    num_blocks = tokens // block_size + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(device, dtype)
    v_cache = torch.randn(k_cache.shape, generator=generator).to(device, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:tokens]
    slots[::3] = -1  # padding tokens (a CUDA-graph batch's tail): nothing stored
    slots = slots.to(device)

    q_normed, k_normed = fused.rms_norm_pair(q, weights[0], k, weights[1], 1e-6) if norm else (q, k)
    q_expected, k_expected = fused.apply_rotary_pair(q_normed, k_normed, cos, sin)
    k_cache_expected, v_cache_expected = k_cache.clone(), v_cache.clone()
    triton_ops.store_kvcache(k_expected, v, k_cache_expected, v_cache_expected, slots)

    options = dict(q_weight=weights[0], k_weight=weights[1], eps=1e-6) if norm else {}
    q_out, k_out = fused_qk.qk_norm_rope_store(q, k, v, cos, sin, **options)  # no cache: nothing stored
    assert torch.equal(q_out, q_expected) and torch.equal(k_out, k_expected)
    q_out, k_out = fused_qk.qk_norm_rope_store(q, k, v, cos, sin, **options, k_cache=k_cache, v_cache=v_cache,
                                               slot_mapping=slots)
    assert torch.equal(q_out, q_expected) and torch.equal(k_out, k_expected)
    assert torch.equal(k_cache, k_cache_expected) and torch.equal(v_cache, v_cache_expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])  # Qwen3 / Llama and Qwen2
# Qwen3-0.6B's heads; an odd GQA group with head_dim 64; a head_dim whose half is not a power of two; one token.
@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim", [(7, 16, 8, 128), (9, 9, 3, 64), (5, 5, 1, 40),
                                                                (1, 4, 2, 16), (0, 4, 2, 16)])
def test_one_launch_gives_the_bits_of_norm_rope_and_store(dtype, norm, tokens, heads, kv_heads, head_dim):
    three_launches_and_one(tokens, heads, kv_heads, head_dim, dtype, norm=norm)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 13, 256, 8192])  # a decode token, odd and CUDA-graph batches, a prefill
def test_one_launch_gives_the_bits_of_three_compiled_on_the_gpu(dtype, tokens):
    """Compiled code may sum or round differently from the interpreter: Qwen3-0.6B's heads (16 / 8 of 128, with
    q/k-norm) and SmolLM2's (9 / 3 of 64, RoPE only), on the card."""
    three_launches_and_one(tokens, 16, 8, 128, dtype, "cuda", norm=True)
    three_launches_and_one(tokens, 9, 3, 64, dtype, "cuda", norm=False)


def test_bad_inputs_say_what_to_change():
    generator = torch.Generator().manual_seed(0)
    q, k, v = packed_qkv(3, 4, 2, 16, torch.float32, DEVICE, generator)
    cos = sin = torch.ones(3, 1, 16, device=DEVICE)
    cache = torch.zeros(2, 16, 2, 16, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="share tokens"):
        fused_qk.qk_norm_rope_store(q, k[:2], v[:2], cos, sin)
    with pytest.raises(ValueError, match="even"):
        fused_qk.qk_norm_rope_store(q[..., :15], k[..., :15], v[..., :15], cos, sin)
    with pytest.raises(ValueError, match="both q_weight and k_weight"):
        fused_qk.qk_norm_rope_store(q, k, v, cos, sin, q_weight=torch.ones(16, device=DEVICE))
    with pytest.raises(ValueError, match="needs k_cache, v_cache and slot_mapping"):
        fused_qk.qk_norm_rope_store(q, k, v, cos, sin, k_cache=cache, v_cache=cache)
    with pytest.raises(ValueError, match="caches must be"):
        fused_qk.qk_norm_rope_store(q, k, v, cos, sin, k_cache=cache[..., :8], v_cache=cache[..., :8],
                                    slot_mapping=slots)
    with pytest.raises(ValueError, match="slot_mapping must have shape"):
        fused_qk.qk_norm_rope_store(q, k, v, cos, sin, k_cache=cache, v_cache=cache.clone(), slot_mapping=slots[:2])
    with pytest.raises(ValueError, match="out's k must be contiguous"):
        fused_qk.qk_norm_rope_store(q, k, v, cos, sin, out=(torch.empty_like(q), torch.empty_like(q)))


class StoresItself(triton_ops.TritonAttentionBackend):
    """The Triton backend as it was: it stores the new K/V, the model's kernel does not."""

    accepts_stored_kv = False


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@torch.inference_mode()
def test_model_with_the_store_in_its_kernel_gives_the_same_logits_and_caches(checkpoint_factory, family):
    """A tiny model, fused, over a paged cache: chunked prompts, then a mixed step, then decodes, with the store
    in the fused kernel (the Triton backend accepts stored K/V) and in the backend: the same bits everywhere."""
    from reference.models import load_model

    model, _ = load_model(checkpoint_factory(family), device=DEVICE, progress=False)
    model.use_fused_kernels(True)
    config, block_size = model.config, 16
    tables = [[7, 2, 9], [4, 0]]
    steps = [([list(range(30, 42))], [12], tables[:1]), ([list(range(42, 50))], [20], tables[:1]),
             ([[3], list(range(60, 78))], [21, 18], tables), ([[4], [5]], [22, 19], tables)]
    results = []
    for backend in (StoresItself(), triton_ops.TritonAttentionBackend()):
        shape = (10, block_size, config.num_key_value_heads, config.head_dim)
        caches = [(torch.zeros(shape, device=DEVICE), torch.zeros(shape, device=DEVICE))
                  for _ in range(config.num_hidden_layers)]
        model.set_attention_backend(backend)
        logits = []
        for new_tokens, context_lens, step_tables in steps:
            positions, metadata = build_metadata([len(t) for t in new_tokens], context_lens, step_tables, block_size,
                                                 DEVICE)
            input_ids = torch.tensor([t for seq in new_tokens for t in seq], device=DEVICE)
            hidden = model(input_ids, positions, metadata, caches)
            logits.append(model.compute_logits(hidden[metadata.cu_seqlens_q[1:].long() - 1]))
        results.append((logits, caches))
    (logits_before, caches_before), (logits_after, caches_after) = results
    assert all(torch.equal(a, b) for a, b in zip(logits_before, logits_after))
    assert all(torch.equal(a, b) for pair_a, pair_b in zip(caches_before, caches_after) for a, b in zip(pair_a, pair_b))
    assert any(bool(k.any()) for k, _ in caches_after)  # the caches were written at all


def guarded(shape, dtype, device, guard=4096):
    """A contiguous tensor of `shape` in the middle of a larger one: (view, the whole, the guard rows' slices)."""
    numel = 1
    for size in shape:
        numel *= size
    whole = torch.full((numel + 2 * guard,), -3.0, dtype=torch.float32).to(device, dtype)
    return whole[guard:guard + numel].view(shape), whole, (slice(0, guard), slice(guard + numel, None))


def writes_nothing_outside(tokens, heads, kv_heads, head_dim, dtype, device):
    """Every tensor the launch reads or writes sits between guard zones: after the launch the guards are intact
    (a write out of bounds in compiled code would not show in the outputs the other tests compare)."""
    generator = torch.Generator().manual_seed(11)
    qkv, qkv_whole, qkv_guards = guarded((tokens, (heads + 2 * kv_heads) * head_dim), dtype, device)
    qkv.copy_(torch.randn(qkv.shape, generator=generator))
    q, k, v = [part.view(tokens, -1, head_dim)
               for part in qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)]
    made = [guarded((tokens, 1, head_dim), torch.float32, device) for _ in range(2)]  # cos, sin
    for table, _, _ in made:
        table.copy_(torch.rand(table.shape, generator=generator))
    made += [guarded((head_dim,), dtype, device) for _ in range(2)]  # the norm weights
    made += [guarded((4, 16, kv_heads, head_dim), dtype, device) for _ in range(2)]  # the caches
    made += [guarded((tokens, heads, head_dim), dtype, device), guarded((tokens, kv_heads, head_dim), dtype, device)]
    made.append(guarded((tokens,), torch.int64, device))  # slots: -1 but a few
    (cos, sin, q_weight, k_weight, k_cache, v_cache, q_out, k_out, slots) = [view for view, _, _ in made]
    q_weight.fill_(1.0), k_weight.fill_(1.0), k_cache.zero_(), v_cache.zero_(), slots.fill_(-1)
    chosen = [0, 17, 63][:tokens]
    slots[:len(chosen)] = torch.tensor(chosen)
    before = [(whole.clone(), whole, zones) for _, whole, zones in made + [(qkv, qkv_whole, qkv_guards)]]
    fused_qk.qk_norm_rope_store(q, k, v, cos, sin, q_weight=q_weight, k_weight=k_weight, eps=1e-6, k_cache=k_cache,
                                v_cache=v_cache, slot_mapping=slots, out=(q_out, k_out))
    for copy, whole, zones in before:
        for zone in zones:
            assert torch.equal(whole[zone], copy[zone]), "a write landed outside the tensors it was given"
    assert int((k_cache.flatten(0, 1).abs().sum(dim=(1, 2)) > 0).sum()) == len(chosen)  # those slots, no other


def test_writes_nothing_outside_its_outputs_and_slots():
    writes_nothing_outside(5, 4, 2, 16, torch.float16 if DEVICE == "cpu" else torch.bfloat16, DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 256, 512])  # 256: the nano-vllm preset's CUDA-graph batch
def test_writes_nothing_outside_its_outputs_and_slots_compiled_on_the_gpu(tokens):
    writes_nothing_outside(tokens, 16, 8, 128, torch.bfloat16, "cuda")

"""decode_prologue.decode_attention_from_qkv (q/k-norm, RoPE and the KV store inside the decode attention kernel)
against the two launches it replaces: fused_qk.qk_norm_rope_store, then triton_ops.paged_decode_attention. Bit for
bit, output and caches, in the Triton interpreter (float32, float16) and compiled on the GPU (the `gpu` tests), and
through a whole model's decode steps with the backend's switch on and off."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from reference.attention import build_metadata, triton_ops  # noqa: E402  (after the skip: Triton is Linux-only)
from reference.attention.decode_prologue import PrologueTritonBackend, decode_attention_from_qkv  # noqa: E402
from reference.models import fused_qk  # noqa: E402
from test_fused_qk import packed_qkv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]


def decode_inputs(batch, heads, kv_heads, head_dim, dtype, device, block_size=16, max_context=70, seed=0):
    """One decode token per sequence: packed q/k/v, RoPE tables, random caches and block tables, each new token's
    slot at its sequence's last position (every third row a CUDA-graph padding row: slot -1, context 1)."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = packed_qkv(batch, heads, kv_heads, head_dim, dtype, device, generator)
    angles = torch.randn(batch, 1, head_dim // 2, generator=generator).repeat(1, 1, 2)
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    weights = [(torch.rand(head_dim, generator=generator) + 0.5).to(device, dtype) for _ in range(2)]
    context_lens = torch.randint(1, max_context + 1, (batch,), generator=generator)
    context_lens[::3] = 1
    blocks_per_seq = -(-max_context // block_size)
    num_blocks = batch * blocks_per_seq + 2
    tables = torch.randperm(num_blocks, generator=generator)[:batch * blocks_per_seq].view(batch, blocks_per_seq)
    last = context_lens - 1
    slots = tables[torch.arange(batch), last // block_size] * block_size + last % block_size
    slots[::3] = -1
    on_device = torch.Generator(device=device).manual_seed(seed)  # large caches are drawn where they live
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=on_device, device=device).to(dtype) for _ in range(2))
    order = torch.argsort(context_lens, descending=True, stable=True).to(device, torch.int32)
    return dict(q=q, k=k, v=v, cos=cos, sin=sin, weights=weights, k_cache=k_cache, v_cache=v_cache,
                slots=slots.to(device), tables=tables.to(device, torch.int32),
                context_lens=context_lens.to(device, torch.int32), order=order)


def two_launches_and_one(batch, heads, kv_heads, head_dim, dtype, device=DEVICE, norm=True, num_splits=None,
                         ordered=True, **sizes):
    x = decode_inputs(batch, heads, kv_heads, head_dim, dtype, device, **sizes)
    options = dict(q_weight=x["weights"][0], k_weight=x["weights"][1], eps=1e-6) if norm else {}
    scale = head_dim ** -0.5
    order = x["order"] if ordered else None
    k_cache, v_cache = x["k_cache"].clone(), x["v_cache"].clone()
    q_rotated, _ = fused_qk.qk_norm_rope_store(x["q"], x["k"], x["v"], x["cos"], x["sin"], **options, k_cache=k_cache,
                                               v_cache=v_cache, slot_mapping=x["slots"])
    expected = triton_ops.paged_decode_attention(q_rotated, k_cache, v_cache, x["tables"], x["context_lens"], scale,
                                                 num_splits=num_splits, seq_order=order)
    got = decode_attention_from_qkv(x["q"], x["k"], x["v"], x["cos"], x["sin"], x["k_cache"], x["v_cache"],
                                    x["slots"], x["tables"], x["context_lens"], scale, **options,
                                    num_splits=num_splits, seq_order=order)
    assert torch.equal(x["k_cache"], k_cache) and torch.equal(x["v_cache"], v_cache)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])  # Qwen3 / Llama and Qwen2
# Qwen3-0.6B's heads; an odd GQA group, head_dim 64; a head_dim whose half is not a power of two; a group of 24
# q heads, normed in three tiles of 8 rows. Each with a split setting: none, 3 (some splits past the short
# contexts: empty), and the split rule's choice; in batch order and longest first.
@pytest.mark.parametrize("batch, heads, kv_heads, head_dim, num_splits, ordered", [
    (7, 16, 8, 128, 1, True), (5, 9, 3, 64, 3, False), (4, 5, 1, 40, None, True), (3, 48, 2, 128, 3, True)])
def test_one_launch_gives_the_bits_of_fused_qk_then_decode(dtype, norm, batch, heads, kv_heads, head_dim, num_splits,
                                                           ordered):
    two_launches_and_one(batch, heads, kv_heads, head_dim, dtype, norm=norm, num_splits=num_splits,
                         ordered=ordered)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 13, 64, 256])  # a lone sequence, splits, and a batch of one split
def test_one_launch_gives_the_bits_of_fused_qk_then_decode_compiled_on_the_gpu(dtype, batch):
    """Compiled for the card at Qwen3-0.6B's heads (16 / 8 of 128) and SmolLM2's (9 / 3 of 64), with contexts long
    enough for the split rule to split the small batches."""
    two_launches_and_one(batch, 16, 8, 128, dtype, "cuda", max_context=1500)
    two_launches_and_one(batch, 9, 3, 64, dtype, "cuda", max_context=1500)


def test_bad_inputs_say_what_to_change():
    x = decode_inputs(3, 4, 2, 16, torch.float32, DEVICE)
    args = (x["cos"], x["sin"], x["k_cache"], x["v_cache"], x["slots"], x["tables"], x["context_lens"], 0.25)
    with pytest.raises(ValueError, match="share tokens"):
        decode_attention_from_qkv(x["q"], x["k"][:2], x["v"][:2], *args)
    with pytest.raises(ValueError, match="q_weight and k_weight"):
        decode_attention_from_qkv(x["q"], x["k"], x["v"], *args, q_weight=x["weights"][0])
    with pytest.raises(ValueError, match="seq_order"):
        decode_attention_from_qkv(x["q"], x["k"], x["v"], *args, seq_order=x["order"][:2])


class FusesDecodePrologue(PrologueTritonBackend):
    calls = 0

    def decode_from_qkv(self, *args, **kwargs):
        self.calls += 1
        return super().decode_from_qkv(*args, **kwargs)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("wrapped", [False, True])  # the triton backend, and "flash", whose decodes are its
@torch.inference_mode()
def test_model_decode_steps_with_the_prologue_in_the_kernel_give_the_same_logits_and_caches(checkpoint_factory,
                                                                                          family, wrapped):
    """A tiny model, fused, over a paged cache: a prompt, a mixed step, then decode steps (with a longest-first
    order, as the CUDA graphs pass it), with the backend's switch off and on: the same bits everywhere."""
    from reference.attention import FlashPrefillBackend
    from reference.models import load_model

    model, _ = load_model(checkpoint_factory(family), device=DEVICE, progress=False)
    model.use_fused_kernels(True)
    config, block_size = model.config, 16
    tables = [[7, 2, 9], [4, 0]]
    order = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    steps = [([list(range(30, 50))], [20], tables[:1], None), ([[3], list(range(60, 78))], [21, 18], tables, None),
             ([[4], [5]], [22, 19], tables, None), ([[6], [8]], [23, 20], tables, order)]
    results, fusing = [], FusesDecodePrologue()
    for backend in (triton_ops.TritonAttentionBackend(), fusing):
        model.set_attention_backend(FlashPrefillBackend(backend) if wrapped else backend)
        shape = (10, block_size, config.num_key_value_heads, config.head_dim)
        caches = [(torch.zeros(shape, device=DEVICE), torch.zeros(shape, device=DEVICE))
                  for _ in range(config.num_hidden_layers)]
        logits = []
        for new_tokens, context_lens, step_tables, decode_order in steps:
            positions, metadata = build_metadata([len(t) for t in new_tokens], context_lens, step_tables, block_size,
                                                 DEVICE)
            metadata.decode_order = decode_order
            input_ids = torch.tensor([t for seq in new_tokens for t in seq], device=DEVICE)
            hidden = model(input_ids, positions, metadata, caches)
            logits.append(model.compute_logits(hidden[metadata.cu_seqlens_q[1:].long() - 1]))
        results.append((logits, caches))
    (logits_off, caches_off), (logits_on, caches_on) = results
    assert all(torch.equal(a, b) for a, b in zip(logits_off, logits_on))
    assert all(torch.equal(a, b) for pair_a, pair_b in zip(caches_off, caches_on) for a, b in zip(pair_a, pair_b))
    assert fusing.calls == 2 * config.num_hidden_layers  # the two decode steps took the one-launch path
    assert all(bool(k[2, 6].any() and k[0, 3].any()) for k, _ in caches_on)  # the last decodes' K (positions 22, 19)


@pytest.mark.gpu
def test_engine_with_the_prologue_gives_the_default_engines_tokens_and_logprobs_on_the_gpu(checkpoint_factory,
                                                                                         monkeypatch):
    """The whole engine in bf16 with CUDA graphs (captured batch sizes, padding rows, splits at long contexts):
    greedy tokens and their logprobs equal the default backend's, as the kernel's bits promise."""
    from reference import LLM, SamplingParams

    shapes = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, num_hidden_layers=4, max_position_embeddings=2048)
    path = str(checkpoint_factory("qwen3", **shapes))
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=generator).tolist()  # up to 900 tokens: split contexts
               for n in torch.randint(5, 900, (24,), generator=generator).tolist()]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1)
    runs = []
    for prologue in (False, True):
        if prologue:  # get_backend builds triton_ops.TritonAttentionBackend, inside "flash" too
            monkeypatch.setattr(triton_ops, "TritonAttentionBackend", PrologueTritonBackend)
        llm = LLM(path, device="cuda", dtype="bfloat16", max_num_seqs=16, max_model_len=1024, num_kv_blocks=2048)
        assert llm.engine.runner.decode_graphs is not None
        assert llm.engine.runner.model.model.layers[0].self_attn.backend.fuse_decode_prologue == prologue
        runs.append([(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params,
                                                                                             use_tqdm=False)])
        del llm
    assert runs[1] == runs[0]

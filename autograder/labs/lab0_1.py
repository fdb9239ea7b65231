"""Lab 0.1 (From text to tensors): its exercises and their test cases."""

from __future__ import annotations

from typing import Any

import torch

from reference.sampling import _apply_top_k_top_p

from ..compare import Close, Exact, Trace
from ..harness import lab0_1 as harness
from ..spec import Case, Exercise, Lab
from . import LAB_MEMORY_MB
from .draw import choice, integer

NOTEBOOK_1 = "01_tokens_and_embeddings.ipynb"
NOTEBOOK_2 = "02_decoder_forward.ipynb"
NOTEBOOK_3 = "03_kv_cache.ipynb"


# ============================================================================================================
# Notebook 1: tokens and embeddings
# ============================================================================================================


_WORDS = (
    "the model reads tokens and writes one more token at a time while the cache keeps every key and value "
    "so attention never recomputes them a batch packs several prompts into one vector of ids with offsets "
    "café naïve déjà-vu 東京 🙂 KV-cache GPU's 1024 x=3.14"
).split()
_SEPARATORS = (" ", " ", " ", "  ", "\n", ", ", ". ", "\t")


def _text(generator: torch.Generator, num_words: int) -> str:
    picks = torch.randint(0, len(_WORDS), (num_words,), generator=generator).tolist()
    seps = torch.randint(0, len(_SEPARATORS), (num_words,), generator=generator).tolist()
    return "".join(_WORDS[w] + _SEPARATORS[s] for w, s in zip(picks, seps))


def _merge_inputs(generator: torch.Generator, length: int, alphabet: int) -> dict[str, Any]:
    ids = torch.randint(0, alphabet, (length,), generator=generator).tolist()
    pairs = list(zip(ids, ids[1:]))
    pair = choice(generator, pairs)
    return {"ids": ids, "pair": pair, "new_id": 256 + alphabet}


BPE_MERGE_STEP = Exercise(
    name="bpe_merge_step", symbol="bpe_merge_step", notebook=NOTEBOOK_1,
    signature="bpe_merge_step(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]",
    reference=harness.ref_bpe_merge_step, driver=harness.drive_calls,
    cases=(
        Case("one_pair", lambda g: {"ids": [1, 2, 3, 1, 2, 4], "pair": (1, 2), "new_id": 256}, Exact(),
             "merging (1, 2) -> 256 in [1, 2, 3, 1, 2, 4] gives [256, 3, 256, 4]"),
        Case("overlapping_left_to_right", lambda g: {"ids": [7, 7, 7, 7, 7], "pair": (7, 7), "new_id": 300}, Exact(),
             "merging (7, 7) -> 300 in [7, 7, 7, 7, 7] goes left to right without overlap: [300, 300, 7]"),
        Case("pair_absent", lambda g: {"calls": [{"ids": [4, 3, 2, 1], "pair": (2, 1), "new_id": 256},
                                                 {"ids": [4, 3, 2, 1], "pair": (1, 2), "new_id": 256}]},
             Trace(Exact(), ("merge (2, 1) in [4, 3, 2, 1]", "merge (1, 2) in [4, 3, 2, 1]")),
             "the order inside a pair matters: merging (2, 1) in [4, 3, 2, 1] gives [4, 3, 256], while (1, 2) never "
             "occurs there (2 comes before 1), so that merge leaves the list unchanged"),
        Case("empty_and_single", lambda g: {"calls": [{"ids": [9], "pair": (9, 9), "new_id": 256},
                                                      {"ids": [], "pair": (9, 9), "new_id": 256},
                                                      {"ids": [9, 9], "pair": (9, 9), "new_id": 256}]},
             Trace(Exact(), ("merge (9, 9) in [9]", "merge (9, 9) in []", "merge (9, 9) in [9, 9]")),
             "a single id cannot form a pair: [9] stays [9] and [] stays []; [9, 9] becomes [256]"),
        Case("random_short", lambda g: _merge_inputs(g, 40, 5), Exact(),
             "40 random ids from a 5-symbol alphabet, merging one pair that occurs", seed=1),
        Case("random_long", lambda g: _merge_inputs(g, 3000, 3), Exact(),
             "a long random list over a 3-symbol alphabet", visible=False, seed=2),
    ),
)

BPE_TRAIN = Exercise(
    name="bpe_train", symbol="bpe_train", notebook=NOTEBOOK_1,
    signature="bpe_train(text: str, num_merges: int) -> list[tuple[int, int]]",
    reference=harness.ref_bpe_train, uses=("bpe_merge_step",),
    cases=(
        Case("classic_example", lambda g: {"text": "aaabdaaabac", "num_merges": 3}, Exact(),
             "'aaabdaaabac' with 3 merges: (97, 97) first (count 4); then (256, 97) and (97, 98) occur twice each, "
             "a tie that the smaller pair (97, 98) wins; then (256, 257)"),
        Case("ties_go_to_smallest_pair", lambda g: {"text": "dcba", "num_merges": 1}, Exact(),
             "every pair of 'dcba' occurs once, so the smallest pair (98, 97) = 'ba' wins the tie"),
        Case("bytes_not_characters", lambda g: {"text": "café café 🙂🙂", "num_merges": 6}, Exact(),
             "training runs on UTF-8 bytes, so 'é' (2 bytes) and '🙂' (4 bytes) are built from byte pairs"),
        Case("stops_when_one_token_left", lambda g: {"text": "abab", "num_merges": 10}, Exact(),
             "'abab' needs only 2 merges to become one token; the list stops there instead of failing"),
        Case("corpus", lambda g: {"text": _text(g, 120), "num_merges": 30}, Exact(),
             "30 merges on a short multilingual text", seed=3),
        Case("longer_corpus", lambda g: {"text": _text(g, 400), "num_merges": 60}, Exact(),
             "60 merges on a longer text", visible=False, seed=4),
    ),
)


def _encode_inputs(generator: torch.Generator, train_words: int, num_merges: int, text_words: int) -> dict:
    merges = harness.ref_bpe_train(_text(generator, train_words), num_merges)
    return {"text": _text(generator, text_words) + " zebra ✓", "merges": merges}


BPE_ENCODE = Exercise(
    name="bpe_encode", symbol="bpe_encode", notebook=NOTEBOOK_1,
    signature="bpe_encode(text: str, merges: list[tuple[int, int]]) -> list[int]",
    reference=harness.ref_bpe_encode, uses=("bpe_merge_step",), driver=harness.drive_calls,
    cases=(
        Case("no_merges_gives_bytes", lambda g: {"calls": [{"text": "Hi, 🙂!", "merges": []},
                                                           {"text": "Hi, 🙂!", "merges": [(72, 105)]}]},
             Trace(Exact(), ("no merges", "one merge, (72, 105) = 'Hi'")),
             "with no merges the ids are the UTF-8 bytes of the text; with the one merge (72, 105) ('H', 'i') they "
             "start with 256 instead"),
        Case("merges_build_on_merges", lambda g: {"text": "aaaaaaa b", "merges": [(97, 97), (256, 256), (257, 97)]},
             Exact(), "merge i creates id 256 + i, and later merges may use it: 'aaaaaaa b' -> [258, 32, 98]"),
        Case("trained_merges", lambda g: _encode_inputs(g, 150, 40, 30), Exact(),
             "40 merges trained on one text, applied in order to another (with characters never seen)", seed=5),
        Case("long_text", lambda g: _encode_inputs(g, 300, 80, 300), Exact(),
             "80 merges applied to a long text", visible=False, seed=6),
    ),
)

PACK_BATCH = Exercise(
    name="pack_batch", symbol="pack_batch", notebook=NOTEBOOK_1,
    signature="pack_batch(prompts: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]  "
              "# input_ids int64 [N], positions int64 [N], cu_seqlens int32 [B + 1]",
    reference=harness.ref_pack_batch, driver=harness.drive_calls,
    hides=("reference.attention.metadata.build_metadata",),
    cases=(
        Case("three_prompts", lambda g: {"prompts": [[5, 6, 7], [8], [9, 10]]}, Exact(),
             "[[5, 6, 7], [8], [9, 10]] -> ids [5, 6, 7, 8, 9, 10], positions [0, 1, 2, 0, 0, 1], "
             "cu_seqlens [0, 3, 4, 6] (int64, int64, int32)"),
        Case("one_prompt", lambda g: {"prompts": [[42, 43, 44, 45]]}, Exact(),
             "a single prompt of 4 tokens: positions 0..3 and cu_seqlens [0, 4]"),
        Case("empty_batch", lambda g: {"calls": [{"prompts": []}, {"prompts": [[3], [4, 5]]}]},
             Trace(Exact(), ("no prompts", "prompts [[3], [4, 5]]")),
             "no prompts: empty int64 ids and positions, cu_seqlens [0] (int32); then [[3], [4, 5]]: ids [3, 4, 5], "
             "positions [0, 0, 1], cu_seqlens [0, 1, 3]"),
        Case("random_prompts", lambda g: {"prompts": [torch.randint(0, 49152, (n,), generator=g).tolist()
                                                      for n in torch.randint(1, 30, (12,), generator=g).tolist()]},
             Exact(), "12 prompts of random lengths", visible=False, seed=7),
    ),
)


# ============================================================================================================
# Notebook 2: the decoder forward pass
# ============================================================================================================


def _rms_inputs(generator, shape, scale=1.0, eps=1e-6, dtype=torch.float32):
    x = (torch.randn(shape, generator=generator) * scale).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=generator)).to(dtype)
    return {"x": x, "weight": weight, "eps": eps}


RMS_NORM = Exercise(
    name="rms_norm", symbol="rms_norm", notebook=NOTEBOOK_2,
    signature="rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor  # x: [..., hidden], weight: [hidden]",
    reference=harness.ref_rms_norm, hides=("reference.models.llama.RMSNorm",),
    cases=(
        Case("float32_rows", lambda g: _rms_inputs(g, (4, 64)), Close(1e-5, 1e-5),
             "a [4, 64] float32 input: each row divided by its root mean square, then scaled by weight", seed=10),
        Case("any_leading_dims", lambda g: _rms_inputs(g, (2, 3, 32), eps=1e-5), Close(1e-5, 1e-5),
             "a [2, 3, 32] input: normalise over the last dimension only", seed=11),
        Case("eps_inside_the_root", lambda g: _rms_inputs(g, (3, 16), scale=1e-3, eps=1e-2), Close(1e-6, 1e-4),
             "tiny inputs with eps=1e-2: eps is added to the mean of squares, inside the square root", seed=12),
        Case("float16_computed_in_float32", lambda g: _rms_inputs(g, (3, 256), scale=300.0, dtype=torch.float16),
             Close(2e-3, 2e-3),
             "float16 input of magnitude ~300 (its squares overflow float16): compute in float32, return float16",
             seed=13),
        Case("bfloat16", lambda g: _rms_inputs(g, (5, 128), dtype=torch.bfloat16), Close(2e-2, 2e-2),
             "a bfloat16 input, returned in bfloat16", visible=False, seed=14),
    ),
)


def _rope_inputs(generator, tokens, heads, head_dim, theta, positions=None):
    x = torch.randn(tokens, heads, head_dim, generator=generator)
    if positions is None:
        positions = torch.arange(tokens)
    return {"x": x, "positions": torch.as_tensor(positions, dtype=torch.int64), "theta": theta}


APPLY_ROPE = Exercise(
    name="apply_rope", symbol="apply_rope", notebook=NOTEBOOK_2,
    signature="apply_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor  "
              "# x: [num_tokens, heads, head_dim], positions: int64 [num_tokens]",
    reference=harness.ref_apply_rope,
    hides=("reference.models.rotary.apply_rotary", "reference.models.rotary.RotaryEmbedding"),
    cases=(
        Case("positions_0_to_7", lambda g: _rope_inputs(g, 8, 4, 64, 10000.0), Close(1e-4, 1e-4),
             "8 tokens at positions 0..7, 4 heads of 64 dims, theta 10000 (half-split pairs (i, i + 32))", seed=20),
        Case("position_zero_is_identity", lambda g: _rope_inputs(g, 3, 2, 8, 10000.0, [0, 7, 0]), Close(1e-5, 1e-5),
             "at position 0 every angle is 0, so tokens 0 and 2 come back unchanged; token 1, at position 7, is "
             "rotated", seed=21),
        Case("one_decode_token", lambda g: _rope_inputs(g, 1, 2, 32, 100000.0, [137]), Close(1e-4, 1e-4),
             "one token at position 137 with theta 1e5 (a decode step)", seed=22),
        Case("scattered_positions", lambda g: _rope_inputs(g, 5, 3, 16, 500000.0, [3, 0, 99, 41, 7]),
             Close(1e-4, 1e-4), "positions need not be sorted or consecutive: [3, 0, 99, 41, 7] (token t rotates by "
             "positions[t], not by t)", seed=23),
        Case("smollm2_shapes", lambda g: _rope_inputs(g, 40, 9, 64, 100000.0, list(range(150, 190))),
             Close(1e-4, 1e-4), "SmolLM2-sized heads at positions 150..189", visible=False, seed=24),
    ),
)


def _attention_inputs(generator, q_len, heads, kv_heads, context_len, head_dim):
    return {"q": torch.randn(q_len, heads, head_dim, generator=generator),
            "k": torch.randn(context_len, kv_heads, head_dim, generator=generator),
            "v": torch.randn(context_len, kv_heads, head_dim, generator=generator)}


GQA_ATTENTION = Exercise(
    name="gqa_attention", symbol="gqa_attention", notebook=NOTEBOOK_2,
    signature="gqa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor  "
              "# q: [q_len, heads, head_dim], k/v: [context_len, kv_heads, head_dim]",
    reference=harness.ref_gqa_attention, hides=("reference.attention.torch_ref.attend_one_sequence",),
    cases=(
        Case("mha_prefill", lambda g: _attention_inputs(g, 6, 4, 4, 6, 16), Close(1e-5, 1e-4),
             "multi-head attention (4 query heads, 4 KV heads), 6 tokens attending causally; scores are "
             "q . k / sqrt(head_dim)", seed=30),
        Case("gqa_prefill", lambda g: _attention_inputs(g, 7, 6, 2, 7, 8), Close(1e-5, 1e-4),
             "grouped-query: 6 query heads share 2 KV heads (heads 0-2 use KV head 0, 3-5 use KV head 1)", seed=31),
        Case("mqa_prefill", lambda g: _attention_inputs(g, 5, 4, 1, 5, 8), Close(1e-5, 1e-4),
             "multi-query: all 4 query heads share one KV head", seed=32),
        Case("decode_one_query", lambda g: _attention_inputs(g, 1, 6, 2, 9, 8), Close(1e-5, 1e-4),
             "one new query (position 8) attending to a 9-token context: it sees every key", seed=33),
        Case("chunk_of_queries", lambda g: _attention_inputs(g, 3, 4, 2, 10, 16), Close(1e-5, 1e-4),
             "3 queries that are the last 3 of a 10-token context (positions 7, 8, 9), causal", seed=34),
        Case("smollm2_prefill", lambda g: _attention_inputs(g, 32, 9, 3, 32, 64), Close(1e-5, 1e-4),
             "SmolLM2's head layout (9 query heads, 3 KV heads, 64 dims), 32 tokens", visible=False, seed=35),
        Case("long_context_decode", lambda g: _attention_inputs(g, 2, 9, 3, 100, 64), Close(1e-5, 1e-4),
             "two queries at the end of a 100-token context", visible=False, seed=36),
    ),
)


def _mlp_inputs(generator, tokens, hidden, intermediate):
    return {"x": torch.randn(tokens, hidden, generator=generator),
            "w_gate": 0.2 * torch.randn(intermediate, hidden, generator=generator),
            "w_up": 0.2 * torch.randn(intermediate, hidden, generator=generator),
            "w_down": 0.2 * torch.randn(hidden, intermediate, generator=generator)}


SWIGLU_MLP = Exercise(
    name="swiglu_mlp", symbol="swiglu_mlp", notebook=NOTEBOOK_2,
    signature="swiglu_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor  "
              "# x: [num_tokens, hidden], w_gate/w_up: [intermediate, hidden], w_down: [hidden, intermediate]",
    reference=harness.ref_swiglu_mlp, hides=("reference.models.llama.MLP",),
    cases=(
        Case("four_tokens", lambda g: _mlp_inputs(g, 4, 16, 40), Close(1e-5, 1e-4),
             "4 tokens, hidden 16, intermediate 40: down(silu(gate(x)) * up(x)), weights in nn.Linear layout",
             seed=40),
        Case("one_token", lambda g: _mlp_inputs(g, 1, 32, 64), Close(1e-5, 1e-4),
             "a single token (a decode step), hidden 32, intermediate 64", seed=41),
        Case("wider", lambda g: _mlp_inputs(g, 20, 64, 160), Close(1e-5, 1e-4),
             "20 tokens, hidden 64, intermediate 160", visible=False, seed=42),
    ),
)


def _layer_inputs(generator, tokens, hidden, heads, kv_heads, head_dim, intermediate, eps=1e-5, theta=10000.0):
    shapes = {
        "input_layernorm.weight": (hidden,), "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden), "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim), "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (intermediate, hidden), "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
    }
    weights = {}
    for name in harness.LAYER_WEIGHT_NAMES:
        noise = torch.randn(shapes[name], generator=generator)
        weights[name] = 1 + 0.1 * noise if name.endswith("layernorm.weight") else noise * hidden**-0.5
    return {
        "hidden": torch.randn(tokens, hidden, generator=generator),
        "positions": torch.arange(tokens),
        "weights": weights,
        "config": {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
                   "rms_norm_eps": eps, "rope_theta": theta},
    }


DECODER_LAYER = Exercise(
    name="decoder_layer", symbol="decoder_layer", notebook=NOTEBOOK_2,
    signature="decoder_layer(hidden: Tensor, positions: Tensor, weights: dict[str, Tensor], config: dict) -> Tensor"
              "  # hidden: [num_tokens, hidden_size] of one sequence",
    reference=harness.ref_decoder_layer, uses=("rms_norm", "apply_rope", "gqa_attention", "swiglu_mlp"),
    hides=("reference.models.llama.DecoderLayer", "reference.models.llama.Attention"),
    cases=(
        Case("gqa_layer", lambda g: _layer_inputs(g, 6, 64, 4, 2, 16, 96), Close(1e-4, 1e-4),
             "one Llama layer (hidden 64, 4 query heads, 2 KV heads, head_dim 16) on 6 tokens; if this fails, "
             "check the head split (.view(num_tokens, heads, head_dim)), RoPE on q and k, the flatten before "
             "o_proj, and that the MLP's RMSNorm reads the stream after the attention residual", seed=50),
        Case("single_token", lambda g: _layer_inputs(g, 1, 32, 2, 2, 16, 48), Close(1e-4, 1e-4),
             "a one-token sequence: attention then just returns that token's value", seed=51),
        Case("heads_times_head_dim_not_hidden", lambda g: _layer_inputs(g, 5, 48, 4, 1, 16, 64, eps=0.25,
                                                                        theta=500000.0),
             Close(1e-4, 1e-4), "hidden 48 but 4 heads x 16 dims = 64: q_proj maps 48 -> 64 and o_proj 64 -> 48; "
                                "an unusually large rms_norm_eps (0.25) and rope_theta 500000, read from config",
             seed=52),
        Case("wider_layer", lambda g: _layer_inputs(g, 8, 192, 3, 1, 64, 512, theta=100000.0), Close(1e-4, 1e-4),
             "a wider layer on 8 tokens", visible=False, seed=53),
    ),
)


# ============================================================================================================
# Notebook 3: the KV cache and sampling
# ============================================================================================================


def _random_config(g) -> dict[str, Any]:
    heads = choice(g, [8, 16, 32, 40, 64])
    config = {"num_hidden_layers": choice(g, [12, 24, 28, 32, 40, 80]), "num_attention_heads": heads,
              "hidden_size": heads * choice(g, [64, 128])}
    if choice(g, [True, False]):
        config["num_key_value_heads"] = choice(g, [1, 2, 4, 8])
    return config


KV_CACHE_BYTES = Exercise(
    name="kv_cache_bytes", symbol="kv_cache_bytes", notebook=NOTEBOOK_3,
    signature="kv_cache_bytes(config: dict, num_tokens: int, dtype_bytes: int) -> int",
    reference=harness.ref_kv_cache_bytes, hides=("reference.kv.layout.kv_bytes_per_token",),
    cases=(
        Case("smollm2_one_token_float32", lambda g: {"config": {"num_hidden_layers": 30, "num_attention_heads": 9,
                                                                "num_key_value_heads": 3, "head_dim": 64,
                                                                "hidden_size": 576},
                                                     "num_tokens": 1, "dtype_bytes": 4},
             Exact(), "SmolLM2-135M (30 layers, 3 KV heads, head_dim 64), one token in float32: K and V, every layer"),
        Case("qwen3_request_bfloat16", lambda g: {"config": {"num_hidden_layers": 28, "num_attention_heads": 16,
                                                             "num_key_value_heads": 8, "head_dim": 128,
                                                             "hidden_size": 1024},
                                                  "num_tokens": 4096, "dtype_bytes": 2},
             Exact(), "Qwen3-0.6B (head_dim 128 given explicitly, not hidden_size / heads), 4096 tokens in bfloat16"),
        Case("defaults_from_hf_config", lambda g: {"config": {"num_hidden_layers": 32, "num_attention_heads": 32,
                                                              "hidden_size": 4096},
                                                   "num_tokens": 2048, "dtype_bytes": 2},
             Exact(), "a config without head_dim or num_key_value_heads: head_dim = hidden_size // heads, "
                      "and KV heads = attention heads (plain multi-head attention)"),
        Case("random_configs", lambda g: {"config": _random_config(g), "num_tokens": 1000, "dtype_bytes": 2},
             Exact(), "a random Llama-style config", visible=False, seed=60),
    ),
)


def _update(generator, layer, row, start, count, kv_heads, head_dim, dtype=torch.float32) -> dict[str, Any]:
    return {"op": "update", "layer": layer, "row": row, "start": start,
            "k": torch.randn(count, kv_heads, head_dim, generator=generator).to(dtype),
            "v": torch.randn(count, kv_heads, head_dim, generator=generator).to(dtype)}


def _kv_ops_prefill_decode(g):
    init = {"num_layers": 2, "max_batch": 2, "max_len": 8, "num_kv_heads": 2, "head_dim": 4, "dtype": "float32"}
    ops = [_update(g, 0, 0, 0, 3, 2, 4), _update(g, 1, 0, 0, 3, 2, 4),  # prefill 3 tokens, both layers
           _update(g, 0, 0, 3, 1, 2, 4), _update(g, 1, 0, 3, 1, 2, 4),  # decode token 4
           _update(g, 0, 0, 4, 1, 2, 4)]  # decode token 5, layer 0
    return {"init": init, "ops": ops}


def _kv_ops_rows(g):
    init = {"num_layers": 1, "max_batch": 3, "max_len": 6, "num_kv_heads": 1, "head_dim": 8, "dtype": "float32"}
    ops = [_update(g, 0, 2, 0, 4, 1, 8), _update(g, 0, 0, 0, 2, 1, 8), _update(g, 0, 2, 4, 2, 1, 8),
           _update(g, 0, 0, 2, 1, 1, 8)]
    return {"init": init, "ops": ops}


def _kv_ops_errors(g):
    init = {"num_layers": 1, "max_batch": 1, "max_len": 4, "num_kv_heads": 1, "head_dim": 2, "dtype": "float32"}
    ops = [_update(g, 0, 0, 0, 3, 1, 2), _update(g, 0, 0, 3, 2, 1, 2), _update(g, 0, 1, 0, 1, 1, 2),
           _update(g, 0, 0, -1, 1, 1, 2), _update(g, 0, 0, 3, 1, 1, 2)]
    return {"init": init, "ops": ops}


def _kv_ops_nbytes(g):
    init = {"num_layers": 3, "max_batch": 4, "max_len": 16, "num_kv_heads": 2, "head_dim": 8, "dtype": "bfloat16"}
    return {"init": init, "ops": [{"op": "nbytes"}, _update(g, 2, 3, 0, 5, 2, 8, torch.bfloat16), {"op": "nbytes"}]}


def _kv_ops_random(g):
    init = {"num_layers": 3, "max_batch": 4, "max_len": 12, "num_kv_heads": 2, "head_dim": 8, "dtype": "float32"}
    ops = []
    for _ in range(40):
        layer, row = (integer(g, 0, n) for n in (3, 4))
        start = integer(g, 0, 12)
        count = integer(g, 1, 4)
        ops.append(_update(g, layer, row, start, count, 2, 8))  # some overflow on purpose
    return {"init": init, "ops": ops + [{"op": "nbytes"}]}


KV_CACHE = Exercise(
    name="kv_cache", symbol="KVCache", notebook=NOTEBOOK_3,
    signature="class KVCache: __init__(self, num_layers, max_batch, max_len, num_kv_heads, head_dim, "
              "dtype=torch.float32); update(self, layer, row, start, k, v) -> (k_all, v_all); nbytes -> int",
    reference=harness.ReferenceKVCache, driver=harness.drive_kv_cache,
    hides=("reference.kv.contiguous.ContiguousKVCache",),
    cases=(
        Case("prefill_then_decode", _kv_ops_prefill_decode,
             Trace(Exact(), ("prefill layer 0", "prefill layer 1", "decode layer 0", "decode layer 1",
                             "second decode layer 0")),
             "a 3-token prefill then decodes: each update returns all K/V of that row so far ([start + n, ...])",
             seed=70),
        Case("rows_are_independent", _kv_ops_rows,
             Trace(Exact(), ("row 2 gets 4 tokens", "row 0 gets 2 tokens", "row 2 grows to 6",
                             "row 0 grows to 3")), "writes to one row (sequence) never show up in another", seed=71),
        Case("overflow_raises_value_error", _kv_ops_errors,
             Trace(Exact(), ("3 tokens into a 4-slot row", "2 more tokens at position 3 (does not fit)",
                             "1 token in row 1 of a 1-row cache", "1 token at position -1",
                             "1 token at position 3 (fits)")),
             "an update past max_len, into a row outside [0, max_batch) or at a negative start raises ValueError "
             "and leaves the cache usable", seed=72),
        Case("nbytes_counts_the_reservation", _kv_ops_nbytes,
             Trace(Exact(), ("nbytes of an empty cache", "an update", "nbytes after it")),
             "nbytes is what was allocated up front (K and V, every layer, row and slot), not what is used",
             seed=73),
        Case("random_updates", _kv_ops_random, Trace(Exact()),
             "40 random updates across layers and rows, some overwriting, some overflowing", visible=False, seed=74),
    ),
)


SAMPLER_MARGIN = 1e-3  # no draw and no top-p cut lies closer than this to a boundary, so float order can't matter


def _sampler_inputs(generator, rows, vocab, temperature, top_k, top_p, scale=2.0, tail_rows=0) -> dict[str, Any]:
    """Random logits and draws, each row redrawn until every decision is SAMPLER_MARGIN away from a boundary.
    tail_rows: that many more rows, nearly flat (scale 0.3), whose draws fall in the middle of the least likely kept
    token's share, so that token is the one drawn."""
    logits, uniform = [], []
    for index in range(rows + tail_rows):
        tail = index >= rows
        for _attempt in range(1000):
            row = torch.randn(1, vocab, generator=generator) * (0.3 if tail else scale)
            draw = torch.rand(1, generator=generator)
            if tail:
                kept = _apply_top_k_top_p(row / temperature, [top_k], [top_p]).softmax(-1)
                kept = kept[kept > 0].sort(descending=True).values
                draw = ((kept[:-1].sum() + 1) / 2).reshape(1)
            if temperature == 0 or _well_separated(row, temperature, top_k, top_p, draw):
                break
        else:
            raise RuntimeError("could not draw well-separated sampler inputs")  # our bug: loosen the case
        logits.append(row)
        uniform.append(draw)
    return {"logits": torch.cat(logits), "temperature": temperature, "top_k": top_k, "top_p": top_p,
            "uniform": torch.cat(uniform)}


def _well_separated(logits, temperature, top_k, top_p, uniform) -> bool:
    rows = logits.shape[0]
    scaled = logits / temperature
    after_k = _apply_top_k_top_p(scaled, [top_k] * rows, [1.0] * rows).softmax(-1).sort(-1, descending=True).values
    if top_p < 1 and ((after_k.cumsum(-1) - after_k - top_p).abs() < SAMPLER_MARGIN).any():
        return False
    final = _apply_top_k_top_p(scaled, [top_k] * rows, [top_p] * rows).softmax(-1).sort(-1, descending=True).values
    return bool(((final.cumsum(-1) - uniform[:, None]).abs() >= SAMPLER_MARGIN).all())


SAMPLE_NEXT_TOKEN = Exercise(
    name="sample_next_token", symbol="sample_next_token", notebook=NOTEBOOK_3,
    signature="sample_next_token(logits: Tensor, temperature: float, top_k: int, top_p: float, uniform: Tensor) "
              "-> Tensor  # logits: float32 [batch, vocab], uniform: float32 [batch] -> int64 [batch]",
    reference=harness.ref_sample_next_token,
    hides=("reference.sampling.sample", "reference.sampling._apply_top_k_top_p"),
    cases=(
        Case("greedy", lambda g: _sampler_inputs(g, 3, 50, 0.0, -1, 1.0), Exact(),
             "temperature 0 is greedy: the argmax of each row, whatever the draw", seed=80),
        Case("temperature_one", lambda g: _sampler_inputs(g, 4, 50, 1.0, -1, 1.0, tail_rows=2), Exact(),
             "temperature 1, no top-k/top-p: inverse-CDF draw over all 50 tokens sorted by decreasing "
             "probability, the first token whose running sum exceeds the row's uniform draw (no other randomness); "
             "the last two rows are nearly flat and their draws fall in the least likely token's share: top_k=-1 "
             "keeps every token, the last one included", seed=81),
        Case("low_temperature", lambda g: _sampler_inputs(g, 4, 50, 0.5, -1, 1.0), Exact(),
             "temperature 0.5 sharpens the distribution (logits divided by 0.5 before softmax)", seed=82),
        Case("top_k", lambda g: _sampler_inputs(g, 4, 50, 1.0, 5, 1.0), Exact(),
             "top_k=5: only the 5 most likely tokens can be drawn, renormalised", seed=83),
        Case("top_p", lambda g: _sampler_inputs(g, 4, 50, 1.0, -1, 0.8), Exact(),
             "top_p=0.8: the smallest set of most likely tokens whose mass reaches 0.8 (a token stays when "
             "the mass BEFORE it is < 0.8, so the one that crosses 0.8 stays)", seed=84),
        Case("top_k_then_top_p", lambda g: _sampler_inputs(g, 4, 100, 0.8, 20, 0.9), Exact(),
             "temperature 0.8, then top_k=20, then top_p=0.9 on the renormalised top-20", seed=85),
        Case("big_batch", lambda g: _sampler_inputs(g, 8, 2000, 0.9, 100, 0.95), Exact(),
             "8 rows over a 2000-token vocabulary", visible=False, seed=86),
        Case("top_k_one_is_greedy", lambda g: _sampler_inputs(g, 5, 300, 1.3, 1, 1.0), Exact(),
             "top_k=1 leaves only the argmax", visible=False, seed=87),
    ),
)


LAB = Lab(name="lab0.1", preamble=harness.PREAMBLE, memory_mb=LAB_MEMORY_MB, exercises=(
    BPE_MERGE_STEP, BPE_TRAIN, BPE_ENCODE, PACK_BATCH,
    RMS_NORM, APPLY_ROPE, GQA_ATTENTION, SWIGLU_MLP, DECODER_LAYER,
    KV_CACHE_BYTES, KV_CACHE, SAMPLE_NEXT_TOKEN,
))

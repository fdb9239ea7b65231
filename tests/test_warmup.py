"""The GPU warm-up reaches every compiled variant a workload's steps can ask for (reference/warmup.py), checked on
the CPU by what the steps hand the attention backend."""

from __future__ import annotations

from reference.warmup import warm_up


class WidthRecorder:
    """Wraps an attention backend and records the block-table width of every step that is not decode-only."""

    def __init__(self, backend) -> None:
        self.backend, self.widths = backend, []

    def forward(self, q, k, v, k_cache, v_cache, metadata, scale):
        if metadata.block_tables is not None and any(n > 1 for n in metadata.query_lens):
            if any(n == 1 for n in metadata.query_lens):  # mixed: a decode beside a prefill
                self.widths.append(metadata.block_tables.shape[1])
        return self.backend.forward(q, k, v, k_cache, v_cache, metadata, scale)


def test_thorough_warm_up_runs_mixed_steps_of_each_block_table_width_class(checkpoint_factory):
    """Triton compiles the paged prefill kernel once per class of its block-table row stride (1, a multiple of
    16, other): the warm-up's mixed steps must show all three."""
    from reference.engine import LLMEngine

    engine = LLMEngine(str(checkpoint_factory("llama")), device="cpu", max_num_seqs=4, max_num_batched_tokens=512,
                       max_model_len=512, block_size=16)
    attention = engine.runner.model.model.layers[0].self_attn
    recorder = WidthRecorder(attention.backend)
    attention.backend = recorder
    warm_up(engine, every_step_kind=True)
    assert {1, 3, 16} <= set(recorder.widths), recorder.widths
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def test_the_pinned_pool_covers_the_largest_buffers_a_step_stages():
    """grow_pinned_pool's size classes must reach every host buffer a step can stage: here the worst step the
    settings allow (the whole token budget over every seat, each context at max_model_len), described by
    build_metadata as the GPU runner describes its eager steps, and the decode graph's and sampler's buffers."""
    from types import SimpleNamespace

    import numpy as np

    from reference.attention import build_metadata
    from reference.cuda_graphs import INPUT_BYTES_PER_ROW
    from reference.warmup import largest_pinned_block

    config = SimpleNamespace(max_num_seqs=48, max_num_batched_tokens=1000, max_model_len=2048, block_size=16)
    largest = largest_pinned_block(config)
    seats, blocks = config.max_num_seqs, -(-config.max_model_len // config.block_size)
    query_lens = [config.max_num_batched_tokens // seats] * seats
    query_lens[0] += config.max_num_batched_tokens - sum(query_lens)
    context_lens = [config.max_model_len] * seats
    tables = [list(range(b * blocks, (b + 1) * blocks)) for b in range(seats)]
    positions, metadata = build_metadata(query_lens, context_lens, tables, config.block_size, "cpu")
    staged = [positions, *(value for value in vars(metadata).values() if hasattr(value, "nbytes"))]
    sizes = [t.nbytes for t in staged] + [INPUT_BYTES_PER_ROW * seats, 16 * -(-seats // 4) * 4]
    assert max(t.nbytes for t in staged) >= 4 * seats * blocks  # the block tables are among them
    assert max(sizes) <= largest, (sizes, largest)
    assert largest <= 2 * max(sizes)  # and the pool is not grown far past them
    assert np.prod(metadata.block_tables.shape) == seats * blocks

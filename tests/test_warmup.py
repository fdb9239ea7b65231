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

"""What tensor parallelism sends: the bytes that enter collectives per token, read off the plan (plan.py).

Per token of a forward pass, over `size` ranks (nothing at all for size 1):
- all-reduce: the vocab-parallel embedding's one, then two per decoder layer (after o_proj and after
  down_proj), each of a [hidden_size] row;
- all-gather: the LM head's, of a row of logits padded to ceil(vocab / size) * size entries; it runs only for
  the rows that are sampled (every token of a decode step, the last token of each prompt in a prefill).
Counted as the size of each collective's result, in the model's dtype. A ring all-reduce moves about
2 (size - 1) / size times that over each rank's link; the time it takes is measured in lab 0.4.
"""

from __future__ import annotations

from ..config import ModelConfig


def collective_bytes_per_token(config: ModelConfig, size: int, dtype_bytes: int) -> dict[str, int]:
    """{"all_reduce": bytes, "all_gather": bytes} per token (per sampled row for the all-gather)."""
    if size < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {size}")
    if size == 1:
        return {"all_reduce": 0, "all_gather": 0}
    all_reduces = 2 * config.num_hidden_layers + 1
    padded_vocab = -(-config.vocab_size // size) * size
    return {"all_reduce": all_reduces * config.hidden_size * dtype_bytes,
            "all_gather": padded_vocab * dtype_bytes}

"""Random-initialised Hugging Face checkpoints of the Llama, Qwen2 and Qwen3 families, saved to a directory.

The LM head is scaled up so the next-token distribution is peaked: random models otherwise produce near-ties
everywhere and greedy comparisons would rest on rounding noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

SMALL = dict(
    vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
)
LM_HEAD_SCALE = 8.0


def make_checkpoint(directory: Path, family: str, seed: int = 0, **overrides) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    settings = {**SMALL, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **overrides}
    config = config_class(**settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LM_HEAD_SCALE)
    model.save_pretrained(str(directory))
    return Path(directory)

"""Model definitions and weight loading (Llama / Qwen2 / Qwen3 families, GGUF conversion)."""

from .llama import LlamaForCausalLM
from .loader import load_model, resolve_model_dir

__all__ = ["LlamaForCausalLM", "load_model", "resolve_model_dir"]

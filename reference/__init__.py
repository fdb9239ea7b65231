"""nano-vLLM Labs reference engine."""

"""Attention: per-step metadata and the backends that compute attention against the KV cache.

`torch_ref` is the plain-PyTorch reference (CPU and GPU). Triton kernels live in `triton_ops`, which is imported
only when asked for, so `import reference` never imports triton.
"""

from .metadata import AttentionMetadata, build_metadata
from .torch_ref import TorchAttentionBackend

BACKENDS = ("torch",)


def get_backend(name: str = "auto", device: str = "cpu") -> TorchAttentionBackend:
    """Return the attention backend called `name` ("auto" picks the best one available for `device`)."""
    if name in ("auto", "torch"):
        return TorchAttentionBackend()
    raise ValueError(f"attention_backend={name!r} is not available; choose one of: auto, {', '.join(BACKENDS)}")


__all__ = ["AttentionMetadata", "build_metadata", "TorchAttentionBackend", "get_backend"]

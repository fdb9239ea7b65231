"""A fix for Triton's CPU interpreter (TRITON_INTERPRET=1) in releases before 3.7 under NumPy 2.4 and later.

There, a scalar a kernel loads (`n = tl.load(ptr)`) is held as a one-element array, and using it as a loop bound
(`for j in range(n)`) calls int() on it, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted
to Python scalars"): every kernel with a data-dependent loop fails. torch 2.11 ships with Triton 3.6, so many
learners have that pair. Triton 3.7 squeezes the array first; `patch_interpreter` makes older releases do the
same. It changes nothing on a GPU (compiled kernels never run this code) or with a fixed Triton.
"""

from __future__ import annotations


def patch_interpreter() -> None:
    """Idempotent; call it after importing triton, before launching a kernel in the interpreter."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # no Triton, or a layout without the interpreter: nothing to fix
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "squeezes_scalars", False):
        return

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_scalars = True
    interpreter._patch_lang_tensor = patch_lang_tensor

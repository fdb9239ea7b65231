"""Shared fixtures: random-initialised checkpoints of each family (alone or with their transformers twin), and
SmolLM2 with its transformers twin."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; that must be decided before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import exactness`, `import checkpoints`

from checkpoints import make_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, so random inputs do not depend on test order."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(family, **config_overrides) -> a saved random checkpoint directory (cached per arguments)."""
    made: dict = {}

    def make(family: str, **overrides) -> Path:
        key = (family, repr(sorted(overrides.items())))
        if key not in made:
            made[key] = make_checkpoint(tmp_path_factory.mktemp(family), family, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def hf_twin_factory(checkpoint_factory):
    """make(family, **config_overrides) -> (checkpoint dir, its transformers model in float32, eval mode).

    The twin is what engine outputs are held to (tests/exactness.py); cached per arguments like the checkpoint."""
    made: dict = {}

    def make(family: str, **overrides) -> tuple[Path, torch.nn.Module]:
        from transformers import AutoModelForCausalLM

        path = checkpoint_factory(family, **overrides)
        if path not in made:
            made[path] = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        return path, made[path]

    return make


@pytest.fixture(scope="session")
def smollm2():
    """(our model, its checkpoint dir) for the embedded SmolLM2, float32 on CPU."""
    from reference.models import load_model

    return load_model("smollm2", progress=False)


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own load of the same GGUF file: an independent twin of our conversion."""
    import transformers
    from transformers import AutoModelForCausalLM

    from reference.models.loader import embedded_gguf_path

    path = embedded_gguf_path("smollm2")
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TQDM_DISABLE", "1")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()

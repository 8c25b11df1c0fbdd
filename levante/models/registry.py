"""Architecture name -> model class, and loading checkpoint tensors into a model."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from levante.config import ModelConfig
from levante.errors import ModelLoadError, UnsupportedArchitecture
from levante.models.gemma3 import Gemma3ForCausalLM
from levante.models.llama import LlamaForCausalLM
from levante.models.qwen2 import Qwen2ForCausalLM
from levante.models.qwen3 import Qwen3ForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}

# Checkpoint prefixes that wrap the text decoder in multimodal layouts.
_PREFIXES = [("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head.")]


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"unsupported architecture '{architecture}'; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[architecture]


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    cls = model_class(config.architecture)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(config)
    finally:
        torch.set_default_dtype(previous)


def _default_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    param.data.copy_(loaded)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into `model`, fusing q/k/v and gate/up as its mapping says."""
    params = dict(model.named_parameters())
    mapping = getattr(model, "packed_modules_mapping", {})
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    expected = {name: 1 for name in params}
    for name, shards in mapping.items():
        for pname in params:
            if f".{shards[0]}." in pname:
                expected[pname] = sum(1 for s in mapping.values() if s[0] == shards[0])
    loaded: dict[str, int] = {}
    for name, tensor in weights:
        for old, new in _PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
        if "rotary_emb." in name or (tied and name == "lm_head.weight"):
            continue
        target, shard_id = name, None
        for ckpt_name, (fused, shard) in mapping.items():
            if f".{ckpt_name}." in name:
                target, shard_id = name.replace(f".{ckpt_name}.", f".{fused}."), shard
                break
        param = params.get(target)
        if param is None:
            raise ModelLoadError(f"checkpoint tensor '{name}' has no place in {type(model).__name__}")
        try:
            getattr(param, "weight_loader", _default_loader)(param, tensor, shard_id)
        except RuntimeError as e:
            raise ModelLoadError(f"tensor '{name}' does not fit: shape {tuple(tensor.shape)} ({e})") from None
        loaded[target] = loaded.get(target, 0) + 1
    missing = [n for n, count in expected.items() if loaded.get(n, 0) < count]
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")

"""LoRA adapters saved by PEFT: `adapter_config.json` and `adapter_model.safetensors`.

Each adapted module brings A ``[r, in]`` and B ``[out, r]``; its update is ``scaling * B @ A``
with scaling ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` under rsLoRA, r and alpha taken per
module from `rank_pattern` / `alpha_pattern` when they name it (PEFT's rules). The scaling is
folded into B here. What levante cannot apply without changing the model's own weights
(DoRA, trained biases, embedding or head adapters, `modules_to_save`) is refused by name.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from levante.errors import ModelLoadError

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")


@dataclass
class LoraAdapter:
    path: Path
    rank: int  # the largest rank of its modules
    # checkpoint module name (``model.layers.0.self_attn.q_proj``) -> (A [r, in], B [out, r] * scaling)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    kind = str(config.get("peft_type", "LORA")).upper()
    unsupported = [
        (kind != "LORA", f"peft_type {kind} (only LORA adapters are served)"),
        (bool(config.get("use_dora")), "DoRA (use_dora)"),
        (config.get("bias", "none") != "none" or bool(config.get("lora_bias")), "trained biases (bias, lora_bias)"),
        (bool(config.get("modules_to_save")), f"modules_to_save {config.get('modules_to_save')}"),
        (bool(config.get("fan_in_fan_out")), "fan_in_fan_out weights"),
        (bool(config.get("target_parameters")), "target_parameters"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ModelLoadError(f"adapter {folder}: {what} is not supported")
    return config


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's `get_pattern_key`: the first pattern that matches the end of the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise ModelLoadError(f"{folder} has no adapter_model.safetensors"
                             + (" (only a pickled adapter_model.bin, which levante does not load)" if pickled else ""))
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None


def read_adapter(folder: str | Path, max_rank: int) -> LoraAdapter:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"LoRA adapter '{folder}' is not a folder")
    config = _config(folder)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _tensors(folder).items():
        match = _LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            raise ModelLoadError(f"adapter {folder}: tensor '{key}' is not a LoRA A/B weight of a linear layer "
                                 "(embedding adapters, DoRA and biases are not supported)")
        parts.setdefault(match["module"], {})[match["part"]] = tensor.float()
    if not parts:
        raise ModelLoadError(f"adapter {folder} has no LoRA weights")
    modules, top_rank = {}, 0
    for module, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise ModelLoadError(f"adapter {folder}: '{module}' lacks its lora_{'B' if 'A' in pair else 'A'} weight")
        lora_a, lora_b = pair["A"], pair["B"]
        rank = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", lora_a.size(0))))
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.size(0) != rank or lora_b.size(1) != rank:
            raise ModelLoadError(f"adapter {folder}: '{module}' has A {tuple(lora_a.shape)} and B "
                                 f"{tuple(lora_b.shape)}, not rank {rank}")
        if rank > max_rank:
            raise ModelLoadError(f"adapter {folder} has rank {rank} (at '{module}'), above the limit of {max_rank}: "
                                 "raise --max-lora-rank")
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
        scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        modules[module] = (lora_a, lora_b * scaling)
        top_rank = max(top_rank, rank)
    return LoraAdapter(folder, top_rank, modules)

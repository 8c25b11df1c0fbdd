"""LoRA adapters saved by PEFT: `adapter_config.json` and `adapter_model.safetensors`.

Each adapted module brings A ``[r, in]`` and B ``[out, r]``; its update is ``scaling * B @ A``
with scaling ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` under rsLoRA, r and alpha taken per
module from `rank_pattern` / `alpha_pattern` when they name it (PEFT's rules). The scaling is
folded into B here. What levante cannot apply without changing the model's own weights
(DoRA, trained biases, embedding or head adapters, `modules_to_save`) is refused by name.

Nothing is read before it is checked: the config's fields and patterns (user regexes, compiled
by RE2: user_regex.py), then every tensor's name, dtype and shape from the safetensors header
(the rank, the model's layer shapes when `shape_of` gives them), so the memory a load takes is
bounded by what the header declares, and a hostile adapter is refused before its data is paged
in. Reading then goes module by module out of a private mapping of the file.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from levante.errors import ModelLoadError
from levante.loader import bounds
from levante.loader.safetensors_header import map_safetensors
from levante.user_regex import compile_user_regex

PEFT_PREFIX = "base_model.model."
PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B"}
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_PATTERNS = 1024
MAX_CONFIG_BYTES = 1 << 20
# Without the model's shapes (shape_of), a layer no wider than a model may be.
MAX_FEATURES = bounds.MAXIMA["intermediate_size"]


@dataclass
class LoraAdapter:
    path: Path
    rank: int  # the largest rank of its modules
    # checkpoint module name (``model.layers.0.self_attn.q_proj``) -> (A [r, in], B [out, r] * scaling)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Module:
    """One adapted module as the header declares it: its A and B (views not yet read), rank, scaling."""
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    rank: int
    scaling: float


def read_adapter(folder: str | Path, max_rank: int,
                 shape_of: Callable[[str], tuple[int, int]] | None = None) -> LoraAdapter:
    """The adapter in `folder`, every module checked before any tensor is read; `shape_of` maps a module
    name to the (out, in) its B and A must have (models/registry.py's `lora_shapes`)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"LoRA adapter '{folder}' is not a folder")
    config = AdapterConfig(folder)
    declared = _declared_modules(folder, config, max_rank, shape_of)
    modules = {name: (m.lora_a.to(torch.float32, copy=True), m.lora_b.to(torch.float32) * m.scaling)
               for name, m in declared.items()}
    return LoraAdapter(folder, max(m.rank for m in declared.values()), modules)


class AdapterConfig:
    """adapter_config.json, checked: what levante cannot apply is refused by name; ranks, alphas and
    patterns are of the right types, the patterns compiled by RE2."""

    def __init__(self, folder: Path):
        self.folder = folder
        config = _json(folder / "adapter_config.json", folder)
        _refuse_unsupported(config, folder)
        self.rank = config.get("r")
        self.alpha = config.get("lora_alpha", 8)
        self.rslora = bool(config.get("use_rslora"))
        self.rank_pattern = self._patterns(config, "rank_pattern", int)
        self.alpha_pattern = self._patterns(config, "alpha_pattern", (int, float))
        self.targets = self._targets(config.get("target_modules"))
        if self.rank is not None and not _is_count(self.rank):
            raise ModelLoadError(f"adapter {folder}: r = {self.rank!r} is not a positive integer")
        if not _is_number(self.alpha):
            raise ModelLoadError(f"adapter {folder}: lora_alpha = {self.alpha!r} is not a number")

    def _patterns(self, config: dict, key: str, kind) -> list[tuple[object, int | float]]:
        """PEFT's `get_pattern_key`: a pattern names the modules whose name ends with it (after a dot)."""
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or len(patterns) > MAX_PATTERNS:
            raise ModelLoadError(f"adapter {self.folder}: {key} must be an object of at most {MAX_PATTERNS} patterns")
        compiled = []
        for pattern, value in patterns.items():
            if isinstance(value, bool) or not isinstance(value, kind) or not (_is_count(value) if kind is int
                                                                              else _is_number(value)):
                raise ModelLoadError(f"adapter {self.folder}: {key}[{pattern[:60]!r}] = {value!r} is not a "
                                     + ("positive integer" if kind is int else "number"))
            where = f"adapter {self.folder}: {key}"
            compiled.append((compile_user_regex(rf"(.*\.)?({pattern})$", where, ModelLoadError), value))
        return compiled

    def _targets(self, targets):
        """target_modules: a regex the whole module name matches, or names the module name ends with."""
        if targets is None or targets == "all-linear":
            return None
        if isinstance(targets, str):
            return compile_user_regex(targets, f"adapter {self.folder}: target_modules", ModelLoadError)
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ModelLoadError(f"adapter {self.folder}: target_modules must be a string or a list of names")
        return frozenset(targets)

    def targets_module(self, module: str) -> bool:
        if self.targets is None:
            return True
        if isinstance(self.targets, frozenset):
            return module in self.targets or module.rsplit(".", 1)[-1] in self.targets
        return self.targets.fullmatch(module) is not None

    def rank_of(self, module: str, default: int) -> int:
        return _first_match(self.rank_pattern, module, self.rank if self.rank is not None else default)

    def scaling_of(self, module: str, rank: int) -> float:
        alpha = _first_match(self.alpha_pattern, module, self.alpha)
        return alpha / (math.sqrt(rank) if self.rslora else rank)


def _first_match(patterns: list, module: str, default):
    return next((value for pattern, value in patterns if pattern.match(module)), default)


def _declared_modules(folder: Path, config: AdapterConfig, max_rank: int, shape_of) -> dict[str, _Module]:
    """Module name -> its declared A and B, rank and scaling, from the header alone."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _mapped(folder).items():
        module, part = _lora_part(key.removeprefix(PEFT_PREFIX))
        if module is None:
            raise ModelLoadError(f"adapter {folder}: tensor '{key[:100]}' is not a LoRA A/B weight of a linear layer "
                                 "(embedding adapters, DoRA and biases are not supported)")
        if tensor.dtype not in FLOATS or tensor.dim() != 2:
            raise ModelLoadError(f"adapter {folder}: tensor '{key[:100]}' is {tensor.dtype} {tuple(tensor.shape)}, "
                                 "not a 2-D floating-point matrix")
        pairs.setdefault(module, {})[part] = tensor
    if not pairs:
        raise ModelLoadError(f"adapter {folder} has no LoRA weights")
    return {module: _checked_module(folder, config, module, pair, max_rank, shape_of) for module, pair in pairs.items()}


def _checked_module(folder: Path, config: AdapterConfig, module: str, pair: dict, max_rank: int,
                    shape_of) -> _Module:
    if set(pair) != {"A", "B"}:
        raise ModelLoadError(f"adapter {folder}: '{module}' lacks its lora_{'B' if 'A' in pair else 'A'} weight")
    if not config.targets_module(module):
        raise ModelLoadError(f"adapter {folder}: '{module}' has weights, but its target_modules do not name it")
    lora_a, lora_b = pair["A"], pair["B"]
    rank = config.rank_of(module, lora_a.size(0))
    if lora_a.size(0) != rank or lora_b.size(1) != rank:
        raise ModelLoadError(f"adapter {folder}: '{module}' has A {tuple(lora_a.shape)} and B "
                             f"{tuple(lora_b.shape)}, not rank {rank}")
    if rank > max_rank:
        raise ModelLoadError(f"adapter {folder} has rank {rank} (at '{module}'), above the limit of {max_rank}: "
                             "raise --max-lora-rank")
    shape = (lora_b.size(0), lora_a.size(1))  # (out, in) of the matrix it adapts
    expected = tuple(shape_of(module)) if shape_of is not None else None
    if expected is not None and shape != expected:
        raise ModelLoadError(f"adapter {folder}: '{module}' adapts a {shape[0]} x {shape[1]} matrix (B rows x A "
                             f"columns); the model's is {expected[0]} x {expected[1]}")
    if max(shape) > MAX_FEATURES:
        raise ModelLoadError(f"adapter {folder}: '{module}' adapts a {shape[0]} x {shape[1]} matrix, wider than any "
                             "model's")
    return _Module(lora_a, lora_b, rank, config.scaling_of(module, rank))


def _lora_part(key: str) -> tuple[str | None, str | None]:
    for suffix, part in PARTS.items():
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[:-len(suffix)], part
    return None, None


def _mapped(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors as views of a private mapping of the file, its header checked (offsets,
    sizes, dtypes: loader/safetensors_header.py): nothing is read until a view is."""
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise ModelLoadError(f"{folder} has no adapter_model.safetensors"
                             + (" (only a pickled adapter_model.bin, which levante does not load)" if pickled else ""))
    return map_safetensors(path)[0]


def _json(path: Path, folder: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelLoadError(f"{path} is larger than an adapter config ({MAX_CONFIG_BYTES:,} bytes at most)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {' '.join(str(e).split())[:100]}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return config


def _refuse_unsupported(config: dict, folder: Path) -> None:
    kind = str(config.get("peft_type", "LORA")).upper()
    unsupported = [
        (kind != "LORA", f"peft_type {kind[:40]} (only LORA adapters are served)"),
        (bool(config.get("use_dora")), "DoRA (use_dora)"),
        (config.get("bias", "none") != "none" or bool(config.get("lora_bias")), "trained biases (bias, lora_bias)"),
        (bool(config.get("modules_to_save")), f"modules_to_save {str(config.get('modules_to_save'))[:100]}"),
        (bool(config.get("fan_in_fan_out")), "fan_in_fan_out weights"),
        (bool(config.get("target_parameters")), "target_parameters"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ModelLoadError(f"adapter {folder}: {what} is not supported")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

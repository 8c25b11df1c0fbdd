"""A sentence-transformers folder, read as a plain description of its pipeline.

`modules.json` lists the stages: the transformer (token vectors), pooling (one
vector per text), optional dense projections, and normalisation. We read each
stage's small config file and the dense weights; nothing of sentence-transformers
is imported. Both the legacy module names (`sentence_transformers.models.Pooling`)
and the 5.x/6.x ones (`...sentence_transformer.modules.pooling.Pooling`) are accepted.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from levante.errors import ModelLoadError
from levante.loader import hf

# Families whose published checkpoints are trained for Matryoshka truncation
# (EmbeddingGemma: 768/512/256/128; Qwen3-Embedding: 32..full).
MATRYOSHKA_MODEL_TYPES = {"gemma3_text", "qwen3"}
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}
POOLING_MODES = tuple(_POOLING_FLAGS.values())


@dataclass
class DenseSpec:
    """One `Dense` stage: `activation(linear(x))`, weights in `<path>/model.safetensors`."""

    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # the torch class path sentence-transformers saved, e.g. "torch.nn.modules.linear.Identity"


@dataclass
class EmbeddingPipeline:
    pooling: tuple[str, ...] = ("mean",)
    include_prompt: bool = True  # False (INSTRUCTOR): prompt tokens are left out of pooling; not supported
    dense: list[DenseSpec] = field(default_factory=list)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    matryoshka: bool = False  # output may be truncated to fewer dimensions (then renormalised)

    def prompt_for(self, prompt_name: str | None) -> str:
        """The text prefix for a named prompt ("query", "document", ...), or the default one."""
        name = prompt_name or self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise KeyError(f"unknown prompt name '{name}' (this model's prompts: {known})")
        return self.prompts[name]


def read_pipeline(folder: Path, config: dict) -> EmbeddingPipeline:
    """The pipeline of a sentence-transformers folder; `config` is its config.json."""
    settings = _read_json(folder / "config_sentence_transformers.json")
    pipeline = EmbeddingPipeline(prompts=dict(settings.get("prompts") or {}),
                                 default_prompt_name=settings.get("default_prompt_name"))
    # Without modules.json, sentence-transformers runs the transformer and mean pooling.
    modules = _read_json(folder / "modules.json", default=[]) or [{"type": "Transformer", "path": ""}]
    for module in modules:
        kind, path = str(module.get("type", "")).rsplit(".", 1)[-1], folder / module.get("path", "")
        if kind == "Transformer":
            _read_transformer(pipeline, path, folder, config)
        elif kind == "Pooling":
            settings = _read_json(path / "config.json")
            pipeline.pooling = _pooling_modes(settings)
            pipeline.include_prompt = bool(settings.get("include_prompt", True))
        elif kind == "Dense":
            pipeline.dense.append(_dense_spec(path))
        elif kind == "Normalize":
            pipeline.normalize = True
        elif kind != "Dropout":  # identity at inference
            raise ModelLoadError(f"{folder}: sentence-transformers module '{module.get('type')}' is not supported"
                                 " (supported: Transformer, Pooling, Dense, Normalize)")
    pipeline.matryoshka = config.get("model_type") in MATRYOSHKA_MODEL_TYPES or _card_mentions_matryoshka(folder)
    return pipeline


def _read_transformer(pipeline: EmbeddingPipeline, path: Path, folder: Path, config: dict) -> None:
    settings = _read_json(path / "sentence_bert_config.json")
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    limit = settings.get("max_seq_length") or tokenizer_config.get("model_max_length")
    limit = int(limit) if isinstance(limit, (int, float)) and limit < 1e9 else None
    positions = config.get("max_position_embeddings")
    if positions:
        limit = min(limit or positions, positions)
    pipeline.max_seq_length = limit
    pipeline.do_lower_case = bool(settings.get("do_lower_case", False))


def _pooling_modes(settings: dict) -> tuple[str, ...]:
    mode = settings.get("pooling_mode")
    if mode is None:  # the legacy layout: one boolean per mode
        modes = tuple(name for flag, name in _POOLING_FLAGS.items() if settings.get(flag))
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    for name in modes:
        if name not in POOLING_MODES:
            raise ModelLoadError(f"unsupported pooling mode '{name}' (supported: {', '.join(POOLING_MODES)})")
    return modes or ("mean",)


def _dense_spec(path: Path) -> DenseSpec:
    settings = _read_json(path / "config.json")
    if settings.get("use_residual"):
        raise ModelLoadError(f"{path}: Dense with use_residual is not supported")
    try:
        return DenseSpec(path, int(settings["in_features"]), int(settings["out_features"]),
                         bool(settings.get("bias", True)),
                         settings.get("activation_function", "torch.nn.modules.activation.Tanh"))
    except KeyError as e:
        raise ModelLoadError(f"{path / 'config.json'} lacks {e}") from None


def dense_weights(spec: DenseSpec, index: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The stage's tensors, named `dense.<index>.linear.weight` / `.bias` (safetensors only)."""
    for name, tensor in hf.named_tensors(spec.path):
        yield f"dense.{index}.{name}", tensor


def _card_mentions_matryoshka(folder: Path) -> bool:
    readme = folder / "README.md"
    try:
        return readme.is_file() and "matryoshka" in readme.read_text(errors="ignore").lower()
    except OSError:
        return False


def _read_json(path: Path, default=None):
    if not path.is_file():
        return {} if default is None else default
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None

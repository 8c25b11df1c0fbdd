"""MatFormer slices of Gemma 3n: a smaller model cut out of a larger checkpoint, as mistral.rs's `matformer`
option does from Google's slicing table (a CSV: `Name`, `FFN Hidden Dims` such as "[2_048 * 4, ...]" for
each kept layer, `Layers Skipped` such as "[20, 21]").

    config = sliced_config(config, "gemma3n.csv", "Config for E2.49B (block-level)")

The sliced config keeps only the named layers (renumbered), each with its FFN width, and the number of
KV-sharing layers less those skipped among them; `matformer_kept_layers` (the kept layers' indices in the
checkpoint) tells the model how to take its tensors (models/gemma3n.py `adapt_checkpoint_tensor`).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from levante.config import ModelConfig
from levante.errors import ModelLoadError


@dataclass(frozen=True)
class MatformerSlice:
    name: str
    ffn_dims: list[int]
    layers_skipped: list[int]


def _numbers(text: str, what: str) -> list[int]:
    text = (text or "").strip()
    if not text:
        return []
    if not (text.startswith("[") and text.endswith("]")):
        raise ModelLoadError(f"matformer table: {what} must be a bracketed list, got {text!r}")
    out = []
    for item in filter(None, (part.strip() for part in text[1:-1].split(","))):
        factors = [f.strip().replace("_", "") for f in item.split("*")]
        if not all(re.fullmatch(r"\d+", f) for f in factors):
            raise ModelLoadError(f"matformer table: {what}: cannot read {item!r}")
        value = 1
        for factor in factors:
            value *= int(factor)
        out.append(value)
    return out


def read_slice(path: str | Path, name: str) -> MatformerSlice:
    """The row `name` of a slicing table."""
    try:
        with open(path, newline="") as stream:
            rows = list(csv.DictReader(stream))
    except OSError as e:
        raise ModelLoadError(f"matformer table {path}: cannot read ({e.strerror})") from None
    names = [(row.get("name") or row.get("Name") or "").strip() for row in rows]
    if name not in names:
        raise ModelLoadError(f"matformer table {path}: no slice named {name!r} (slices: {', '.join(names)})")
    row = rows[names.index(name)]
    return MatformerSlice(name, _numbers(row.get("FFN Hidden Dims", ""), "FFN Hidden Dims"),
                          _numbers(row.get("Layers Skipped", ""), "Layers Skipped"))


def sliced_config(config: ModelConfig, path: str | Path, name: str) -> ModelConfig:
    if not config.model_type.startswith("gemma3n"):
        raise ModelLoadError(f"MatFormer slices are for Gemma 3n models, not {config.model_type or config.architecture}")
    return apply_slice(config, read_slice(path, name))


def apply_slice(config: ModelConfig, piece: MatformerSlice) -> ModelConfig:
    from levante.models.gemma3n import kv_producers

    raw, n = dict(config.raw), config.num_layers
    skipped = sorted(set(piece.layers_skipped))
    if any(not 0 <= i < n for i in skipped):
        raise ModelLoadError(f"matformer slice {piece.name!r} skips layers outside 0..{n - 1}")
    shared = int(raw.get("num_kv_shared_layers", 0))
    producers = {p for p in kv_producers(config.layer_types, shared) if p is not None}
    if producers & set(skipped):
        raise ModelLoadError(f"matformer slice {piece.name!r} skips layer(s) {sorted(producers & set(skipped))}, "
                             "whose KV cache later layers read")
    kept = [i for i in range(n) if i not in skipped]
    if len(piece.ffn_dims) != len(kept):
        raise ModelLoadError(f"matformer slice {piece.name!r} gives {len(piece.ffn_dims)} FFN widths "
                             f"for {len(kept)} layers")
    widths = raw.get("intermediate_size")
    widths = widths if isinstance(widths, list) else [int(widths)] * n
    if any(d > widths[i] for d, i in zip(piece.ffn_dims, kept)):
        raise ModelLoadError(f"matformer slice {piece.name!r} asks for a wider FFN than the checkpoint has")
    sparsity = raw.get("activation_sparsity_pattern")
    if isinstance(sparsity, list):
        raw["activation_sparsity_pattern"] = [sparsity[i] for i in kept]
    elif sparsity is None:  # transformers' default: the first 10 layers of the checkpoint are sparse
        raw["activation_sparsity_pattern"] = [0.95 if i < 10 and n > 10 else 0.0 for i in kept]
    raw.update(num_hidden_layers=len(kept), intermediate_size=list(piece.ffn_dims),
               layer_types=[config.layer_types[i] for i in kept],
               num_kv_shared_layers=shared - sum(1 for i in skipped if i >= n - shared),
               matformer_kept_layers=kept)
    raw.pop("text_config", None)
    return ModelConfig.from_hf_dict(raw)

"""Hugging Face folders: config.json and safetensors weights (never pickles)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from levante.errors import ModelLoadError


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors: those its index names when it has one (a folder may hold other
    copies, e.g. consolidated.safetensors), else every one at the top level."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index} is not a safetensors index: {e}") from None
        if any(Path(n).is_absolute() or ".." in Path(n).parts for n in names):
            raise ModelLoadError(f"{index} names a shard outside its folder")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelLoadError(f"{folder} lacks {len(missing)} of the shards its index names, e.g. {missing[0]}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ModelLoadError(f"{folder} has only pickled weights (.bin/.pt); levante loads safetensors only")
    raise ModelLoadError(f"{folder} has no .safetensors weights")


def named_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"cannot read {path.name}: {e}") from None

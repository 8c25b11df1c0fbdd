"""Hugging Face folders: config.json and safetensors weights (never pickles)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from levante.config import ModelConfig
from levante.errors import ModelLoadError
from levante.loader import bounds
from levante.loader.safetensors_header import read_shapes


MAX_CONFIG_BYTES = 16 << 20  # the largest config.json seen is ~100 KB


def read_config(folder: Path) -> dict:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json")
    return read_json(folder / "config.json")


def read_json(path: Path) -> dict:
    """A JSON object file of a model folder, bounded in size before it is read; ModelLoadError when it is
    not one."""
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelLoadError(f"{path} is {path.stat().st_size:,} bytes, more than a config.json holds "
                             f"({MAX_CONFIG_BYTES:,} at most)")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {' '.join(str(e).split())[:100]}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return value


def checked_config(folder: Path) -> dict:
    """config.json, its sizes checked against the safetensors headers (loader/bounds.py) before
    anything is built from it."""
    config = read_config(folder)
    bounds.check_model(ModelConfig.text_fields(config), held(folder), str(folder / "config.json"))
    return config


def held(folder: Path) -> bounds.Held:
    """What the checkpoint's weights hold, read from the safetensors headers alone."""
    shapes: dict[str, list[int]] = {}
    for path, names in shards(folder):
        in_file = read_shapes(path)
        shapes.update(in_file if names is None else {name: in_file[name] for name in names if name in in_file})
    return bounds.Held.of(shapes)


INDEX_FILE = "model.safetensors.index.json"


def weight_map(folder: Path) -> dict[str, list[str]] | None:
    """Shard file name -> the tensor names the checkpoint's index puts there, in the index's order;
    None when the folder has no index. A sharded checkpoint is exactly what its index names: other
    `.safetensors` files beside the shards (a leftover `model.safetensors` after a conversion) are
    not part of it."""
    path = folder / INDEX_FILE
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path} is not a safetensors index (a JSON object with a 'weight_map'): {e}") from None
    if not isinstance(entries, dict) or not entries:
        raise ModelLoadError(f"{path}: 'weight_map' must map tensor names to shard files")
    shards: dict[str, list[str]] = {}
    for name, file_name in entries.items():
        if not isinstance(file_name, str) or Path(file_name).name != file_name or not file_name.endswith(".safetensors"):
            raise ModelLoadError(f"{path}: tensor {name!r} maps to {file_name!r}, not a .safetensors file in the folder")
        shards.setdefault(file_name, []).append(name)
    return shards


def shards(folder: Path) -> list[tuple[Path, list[str] | None]]:
    """The checkpoint's weight files, each with the tensor names to take from it (None: all of them)."""
    index = weight_map(folder)
    if index is not None:
        missing = [name for name in index if not (folder / name).is_file()]
        if missing:
            raise ModelLoadError(f"{folder} lacks shard(s) its {INDEX_FILE} names: {', '.join(missing)}")
        return [(folder / name, names) for name, names in index.items()]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return [(path, None) for path in files]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ModelLoadError(f"{folder} has only pickled weights (.bin/.pt); levante loads safetensors only")
    raise ModelLoadError(f"{folder} has no .safetensors weights")


def named_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of the checkpoint once: with an index, the tensors it maps to each shard."""
    for path, names in shards(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys() if names is None else names:
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"cannot read {path.name}: {e}") from None

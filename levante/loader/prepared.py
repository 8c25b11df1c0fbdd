"""Prepared weights: a model's packed tensors saved after the first load, memory-mapped after.

Turning a GGUF file into packed int8/int4 weights (quant/packed.py) costs seconds of
requantising and repacking on every start. After the first load the engine saves what the
layers ended up holding, packed weights and dense parameters alike, in one safetensors
file under ``<cache>/prepared/``; the next start maps that file and hands its tensors to
the layers as they are (no copy: pages are read as the first forward touches them).

The file's name is a hash of what its content depends on: the checkpoint file (resolved
path, size, modification time), the quantisation mode, the dtype, the levante version, this
format's version and the source of the modules that decide the packed form (so a changed
packing or name mapping in a development checkout never meets an old entry). A changed
checkpoint or levante gets a new entry; a file that does not read back as expected is
ignored (and the model loads from the checkpoint, then saves a new entry).

Native kernels read these tensors through raw pointers, so an entry is trusted in nothing:
its SHA-256, written in a stamp beside it when levante saved it, is checked (once, then while
the file is unchanged; loader/integrity.py), its header is read strictly
(loader/safetensors_header.py), and every packed weight's tensors are checked against the
sizes its kernels read (`check` in quant/packed.py) and its shape against the model's, dense
parameters by shape and dtype, all before anything reads the data.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from levante.layers.embedding import VocabParallelEmbedding
from levante.errors import LevanteError
from levante.layers.linear import LinearBase
from levante.loader.integrity import sha256_file, stamp, stamped_digest, verified
from levante.loader.safetensors_header import map_safetensors
from levante.loader.sources import derived_key, remove_superseded
from levante.kernels import native
from levante.quant.gguf_blocks import GGUFTensor
from levante.quant.packed import GGUFRows, Int4Weight, Int8Weight, Q5Weight, int4_layout, int4_supported

logger = logging.getLogger("levante")

FORMAT_VERSION = 2  # 2: entries carry a SHA-256 stamp and every shape is checked on load
# The modules whose code decides what a prepared file holds, relative to the package.
_PACKING_SOURCES = ("quant/packed.py", "kernels/native.py", "quant/gguf_blocks.py", "loader/gguf.py",
                    "loader/prepared.py", "models/registry.py", "layers/linear.py", "layers/embedding.py")


def prepared_path(folder: Path, checkpoint: Path, quantization: str | None, dtype: torch.dtype) -> Path | None:
    """Where the prepared weights of this checkpoint, loaded this way, live; None when there is
    nothing to prepare (dense loads are plain copies already) or the checkpoint is not a file."""
    if quantization is None or not checkpoint.is_file():
        return None
    key = derived_key(checkpoint, quantization, dtype, FORMAT_VERSION, sources=_PACKING_SOURCES)
    # The layouts differ with the kernels that run (native or PyTorch's, with or without int4): one file each.
    packs = "native" if native.available() else ("aten4" if int4_supported() else "int8")
    kind = f"{checkpoint.stem}-{quantization}-{str(dtype).removeprefix('torch.')}-{packs}"
    return folder / f"{kind}-{key}.safetensors"


# -- saving ----------------------------------------------------------------------------------------

def _packed_entries(name: str, packed, tensors: dict, seen: dict, dtype: torch.dtype) -> dict:
    """The description of one packed weight; its tensors go into ``tensors`` (once, if shared)."""
    if id(packed) in seen:
        return {"kind": "same", "as": seen[id(packed)]}
    seen[id(packed)] = name
    if isinstance(packed, Int8Weight):
        tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = packed.qweight, packed.scales
        return {"kind": "int8", "layout": packed.layout, "shape": list(packed.shape)}
    if isinstance(packed, Int4Weight):
        tensors[f"{name}.packed"] = packed.packed
        if packed.layout == "q4t16":
            tensors[f"{name}.qscale"], tensors[f"{name}.qoffset"] = packed.qscale, packed.qoffset
        else:
            tensors[f"{name}.scales_and_zeros"] = packed.scales_and_zeros
        return {"kind": "int4", "group_size": packed.group_size, "cols": packed.shape[1], "layout": packed.layout,
                "rows": packed.shape[0]}
    if isinstance(packed, Q5Weight):
        tensors[f"{name}.packed"] = packed.packed
        return {"kind": "q5", "shape": list(packed.shape), "dtype": str(dtype).removeprefix("torch.")}
    if isinstance(packed, GGUFRows):
        tensors[f"{name}.raw"] = packed.tensor.raw
        return {"kind": "gguf_rows", "qtype": int(packed.tensor.qtype), "shape": list(packed.tensor.shape)}
    raise TypeError(f"cannot save a packed weight of type {type(packed).__name__}")


def save_prepared(model: nn.Module, path: Path) -> None:
    """Write the model's weights as its layers hold them (atomically: a temporary file, renamed)."""
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, dict] = {}
    seen: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, (LinearBase, VocabParallelEmbedding)) and module.packed is not None:
            packed[name] = _packed_entries(f"packed.{name}", module.packed, tensors, seen, module.weight.dtype)
    shared: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.numel() and id(param) not in shared:
            shared[id(param)] = name
            tensors[f"param.{name}"] = param.data
    tensors = {key: t.contiguous() for key, t in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(temporary), metadata={"levante_packed": json.dumps(packed)})
        os.replace(temporary, path)
        stamp(path, sha256_file(path), _stamp_path(path))
        remove_superseded(path)  # and its stamp
    except OSError as error:  # a read-only or full cache: the model still runs, it just is not saved
        logger.warning("could not save prepared weights to %s: %s", path, error)
        temporary.unlink(missing_ok=True)


# -- loading ---------------------------------------------------------------------------------------

def _saved_weight(name: str, entry: dict, tensors: dict):
    """The packed weight as the file describes it, its tensors checked against its shape
    (`check`: what the kernels will read through raw pointers) before anything reads them."""
    kind = entry["kind"]
    if kind == "int8":
        saved = Int8Weight(tensors[f"{name}.qweight"], tensors[f"{name}.scales"], entry.get("layout", "rows"),
                           _shape(entry["shape"]))
    elif kind == "int4":
        saved = Int4Weight(tensors[f"{name}.packed"], tensors.get(f"{name}.scales_and_zeros"), int(entry["group_size"]),
                           int(entry["cols"]), entry.get("layout", "aten"), tensors.get(f"{name}.qscale"),
                           tensors.get(f"{name}.qoffset"), int(entry["rows"]))
    elif kind == "q5":
        saved = Q5Weight(tensors[f"{name}.packed"], _shape(entry["shape"]))
    elif kind == "gguf_rows":
        from gguf import GGMLQuantizationType

        saved = GGUFRows(GGUFTensor(GGMLQuantizationType(entry["qtype"]), tensors[f"{name}.raw"],
                                    _shape(entry["shape"])))
    else:
        raise ValueError(f"unknown packed weight kind {kind!r}")
    saved.check()
    return saved


def _shape(value) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2 or not all(type(d) is int and d > 0 for d in value):
        raise ValueError(f"bad packed weight shape {value!r}")
    return tuple(value)


def _packed_weight(name: str, entry: dict, tensors: dict, built: dict, expected_shape: tuple[int, ...]):
    if entry["kind"] == "same":
        return built[entry["as"]]
    saved = _saved_weight(name, entry, tensors)
    if tuple(saved.shape) != tuple(expected_shape):
        raise ValueError(f"{name}: shape {tuple(saved.shape)} where the model has {tuple(expected_shape)}")
    if isinstance(saved, Int8Weight):  # in the layout this process runs (the native kernels may be off now)
        return saved.in_layout("t16" if native.available() else "rows")
    if isinstance(saved, Int4Weight):
        layout = int4_layout(saved.group_size, saved.shape[1])
        if layout == "aten" and not int4_supported():  # packed for kernels that do not run now: pack afresh
            raise ValueError(f"{name}: 4-bit weights in a layout no kernel here reads")
        return saved.in_layout(layout)
    if isinstance(saved, Q5Weight):  # without the native kernels now: requantised to int8, as pack() would
        return saved if native.available() else saved.to_int8(getattr(torch, entry["dtype"]))
    return saved


def load_prepared(model: nn.Module, path: Path, quantization: str) -> bool:
    """Give the model's layers the prepared weights at ``path``; False (model untouched) when
    the file is missing or does not describe this model."""
    if not path.is_file():
        return False
    expected = stamped_digest(_stamp_path(path))
    if expected is None or not verified(path, expected, _stamp_path(path)):
        logger.warning("ignoring prepared weights %s: not the file levante wrote (no stamp, or another SHA-256)", path)
        return False
    try:
        return _load(model, path, quantization)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, LevanteError) as error:
        logger.warning("ignoring prepared weights %s: %s", path, error)
        return False


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _describes(model: nn.Module, packed: dict, tensors: dict) -> bool:
    """Every packed entry names a layer that packs, and every parameter has a tensor of its shape
    (or belongs to a packed layer, or is tied to one that has)."""
    modules = dict(model.named_modules())
    if any(not isinstance(modules.get(name), (LinearBase, VocabParallelEmbedding)) for name in packed):
        return False
    covered = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        saved = tensors.get(f"param.{name}")
        if saved is not None:
            if tuple(saved.shape) != tuple(param.shape) or saved.dtype != param.dtype:
                return False
            covered.add(id(param))
        elif name.endswith(".weight") and name.removesuffix(".weight") in packed:
            covered.add(id(param))
    return all(id(param) in covered for param in model.parameters())


def _load(model: nn.Module, path: Path, quantization: str) -> bool:
    tensors, metadata = map_safetensors(path)
    packed = json.loads(metadata["levante_packed"])
    if not _describes(model, packed, tensors):
        return False
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    built: dict[str, object] = {}
    shapes = {name: tuple(modules[name].weight.shape) for name in packed}  # before tied weights are emptied
    for name, entry in packed.items():
        key = f"packed.{name}"
        module = modules[name]
        built[key] = weight = _packed_weight(key, entry, tensors, built, shapes[name])
        module.quantization = quantization
        module.packed = weight
        module.weight.data = torch.empty(0, dtype=module.weight.dtype)
    for name, param in params.items():
        t = tensors.get(f"param.{name}")
        if t is not None:
            param.data = t
    return True

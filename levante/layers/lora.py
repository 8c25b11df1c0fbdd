"""LoRA: each token row adds its adapter's low-rank update to a linear layer's output.

An adapter's update of a layer is ``(x @ A^T) @ B^T`` with A ``[rank, in]`` and B ``[out, rank]``
(its scaling, lora_alpha / r or lora_alpha / sqrt(r) for rsLoRA, already folded into B). The base
weight is never touched, so a packed int4/int8 layer stays packed and every adapter shares it.
Layers keep A^T and B^T contiguous, in float32 on the CPU whatever the model's dtype: PyTorch's
CPU matmuls of these thin shapes are ~3x slower in bfloat16 than in float32 (and less exact).

A fused layer (q/k/v, gate/up) keeps one pair per adapter: the shards' A stacked, B block-diagonal
(each shard's rows read only its own A rows), so one pair of matmuls serves all its shards.

The runner sets a `LoraBatch` for each step that has adapters (as it sets the attention metadata):
which rows use which adapter, grouped so that each adapter present costs one pair of matmuls, rows
without an adapter none. Layers never import the engine.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# adapter id -> (A^T [in, rank], B^T [rank, out]) of one layer
LoraPairs = dict[int, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LoraBatch:
    """One step's rows per adapter: (adapter id, row indices, or None when every row of the step uses it)."""

    groups: list[tuple[int, torch.Tensor | None]]
    _copies: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_rows(cls, row_adapters: list[int | None]) -> "LoraBatch | None":
        """The batch for per-row adapter ids (None: the base model); None when no row has one."""
        present = set(row_adapters)
        if present == {None}:
            return None
        if len(present) == 1:
            return cls([(row_adapters[0], None)])
        groups = [(adapter, torch.tensor([i for i, a in enumerate(row_adapters) if a == adapter]))
                  for adapter in sorted(a for a in present if a is not None)]
        return cls(groups)

    def rows_on(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        if rows.device == device:
            return rows
        key = (id(rows), device)
        if key not in self._copies:
            self._copies[key] = rows.to(device)
        return self._copies[key]


def apply_lora(pairs: LoraPairs, x: torch.Tensor, out: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
    """`out` (the base layer's output for `x`) plus each row's adapter update."""
    for adapter, rows in batch.groups:
        pair = pairs.get(adapter)
        if pair is None:  # this adapter leaves the layer alone
            continue
        lora_a, lora_b = pair
        if rows is None and x.dtype == lora_a.dtype and x.dim() == 2:
            out = torch.addmm(out, x @ lora_a, lora_b)
        elif rows is None:
            out = out + ((x.to(lora_a.dtype) @ lora_a) @ lora_b).to(out.dtype)
        else:
            rows = batch.rows_on(rows, x.device)
            update = (x.index_select(0, rows).to(lora_a.dtype) @ lora_a) @ lora_b
            out = out.index_add(0, rows, update.to(out.dtype))
    return out


# Per thread, as the attention metadata: the engine loop and an embedding batcher may run forwards at once.
_local = threading.local()


def current_lora_batch() -> LoraBatch | None:
    return getattr(_local, "batch", None)


@contextmanager
def lora_batch(batch: LoraBatch | None):
    previous, _local.batch = getattr(_local, "batch", None), batch
    try:
        yield batch
    finally:
        _local.batch = previous

"""Linear layers that know how to load (and, under tensor parallelism, shard) their weights.

As in nano-vllm: each parameter carries a `weight_loader(param, loaded, shard_id)`
so a checkpoint's separate q/k/v or gate/up tensors land in one fused matrix,
and a column/row-parallel rank keeps only its slice. A checkpoint that stores the
fused matrix itself (Phi-3's qkv_proj, gate_up_proj) passes no shard id: the loader
cuts it into its shards, which then go the same way (so each rank still keeps its
rows of q, k and v).

Quantised (``quantization`` set before loading, see models/registry.py): the loader
keeps each shard as it comes (a dense tensor or GGUF blocks) and, once the last shard
of the fused matrix has arrived, packs them all into one int8/int4 weight
(quant/packed.py); the dense parameter is never filled and is released. Packing the
assembled rows, rather than packing shards and joining packed blocks, lets shards of
different GGUF types settle on one form, and the int4 layout interleaves rows in
blocks of 64 that shard boundaries need not respect.

LoRA adapters (layers/lora.py) add their low-rank update after the base matmul, before a
row-parallel layer's all-reduce; their B matrices are split across ranks as the weight rows
are (column-parallel), their A matrices as the weight columns (row-parallel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from levante.distributed import all_reduce, tp_rank, tp_size
from levante.layers.lora import LoraPairs, apply_lora, current_lora_batch
from levante.quant.packed import PackedWeight, pack


class LinearBase(nn.Module):
    # The checkpoint tensors fused into this weight, in row order (None: stored whole).
    shard_ids: tuple = (None,)
    # False: stays dense whatever quantization the model loads with (models/registry.py).
    quantizable: bool = True

    def __init__(self, in_features: int, out_features: int, bias: bool, shard_dim: int | None):
        super().__init__()
        self.shard_dim = shard_dim
        self.in_features, self.out_features = in_features, out_features  # this rank's share
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.quantization: str | None = None  # "auto" | "int8" | "int4", set before loading
        self.packed: PackedWeight | None = None
        self._pending: dict = {}
        self.lora: LoraPairs = {}  # adapter id -> (A, B): see set_lora

    def _shard(self, loaded: torch.Tensor, dim: int | None) -> torch.Tensor:
        if dim is None or self.tp_size == 1 or loaded.dim() <= dim:
            return loaded
        size = loaded.size(dim) // self.tp_size
        return loaded.narrow(dim, self.tp_rank * size, size)

    def _place(self, loaded: torch.Tensor, shard_id) -> tuple[torch.Tensor, int | None]:
        """This rank's part of checkpoint tensor `loaded` (shard `shard_id` of a fused weight) and the row
        where it starts in the fused weight (None: it is the whole weight)."""
        return self._shard(loaded, self.shard_dim), None

    def _fused_sizes(self, loaded: torch.Tensor) -> list[int]:
        """The rows of each shard in a checkpoint tensor that holds them all (a fused layer only)."""
        raise NotImplementedError

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        if shard_id is None and self.shard_ids != (None,):
            return self._load_fused(param, loaded, self._fused_sizes(loaded))
        shard, offset = self._place(loaded, shard_id)
        if self._collects(param):
            return self._collect(shard, shard_id)
        (param.data if offset is None else param.data.narrow(0, offset, shard.size(0))).copy_(shard)

    def _load_fused(self, param: nn.Parameter, loaded: torch.Tensor, sizes: list[int]) -> None:
        """Load a checkpoint tensor that holds every shard stacked by rows, `sizes` rows each."""
        start = 0
        for shard_id, size in zip(self.shard_ids, sizes):
            self.weight_loader(param, loaded.narrow(0, start, size), shard_id)
            start += size

    def _collects(self, param: nn.Parameter) -> bool:
        return self.quantization is not None and param is self.weight

    def _collect(self, shard, shard_id) -> None:
        """Keep one shard of the weight; pack them all when the last one arrives."""
        self._pending[shard_id] = shard
        ids = [None] if None in self._pending else self.shard_ids
        if all(i in self._pending for i in ids):
            shards, self._pending = [self._pending[i] for i in ids], {}
            self._adopt(pack(shards, self.quantization, self.weight.dtype, self._packed_columns()))

    def _packed_columns(self) -> tuple[int, int] | None:
        """(start, length) of the input columns this rank keeps of the whole weights it collects, or None:
        it collects its own share."""
        return None

    def _adopt(self, weight: PackedWeight | torch.Tensor) -> None:
        expected = tuple(self.weight.shape)
        if tuple(weight.shape) != expected:
            raise RuntimeError(f"assembled weight {tuple(weight.shape)} != expected {expected}")
        if isinstance(weight, torch.Tensor):  # "auto" met float tensors: stays dense
            self.weight.data = weight
        else:
            self.packed = weight
            self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, bias)
        out = self.packed.matmul(x)
        return out if bias is None else out + bias

    def set_lora(self, adapter_id: int, shards: dict) -> None:
        """Add an adapter's update: `shards` maps each checkpoint shard it adapts (a `shard_ids` entry)
        to (A [rank, in], B [out, rank]) in full size, scaling folded into B; this rank keeps its part."""
        if self.shard_dim == 1:  # row-parallel: the input is split, so A's columns are
            parts = [(self._shard(lora_a, 1), lora_b, None) for lora_a, lora_b in shards.values()]
        else:
            parts = [(lora_a, *self._place(lora_b, shard_id)) for shard_id, (lora_a, lora_b) in shards.items()]
        lora_a = torch.cat([a for a, _, _ in parts])
        lora_b = torch.zeros(self.out_features, lora_a.size(0), dtype=lora_a.dtype)
        column = 0
        for a, b, offset in parts:  # block-diagonal: each shard's rows read only its own A rows
            rows = lora_b if offset is None else lora_b.narrow(0, offset, b.size(0))
            rows.narrow(1, column, a.size(0)).copy_(b)
            column += a.size(0)
        if lora_a.size(1) != self.in_features:
            raise RuntimeError(f"A has {lora_a.size(1)} input features, the layer {self.in_features}")
        device = self.weight.device  # a packed layer keeps an empty weight there
        dtype = torch.float32 if device.type == "cpu" else self.weight.dtype  # see layers/lora.py
        self.lora[adapter_id] = (lora_a.t().to(device, dtype).contiguous(), lora_b.t().to(device, dtype).contiguous())

    def lora_shape(self, shard_id=None) -> tuple[int, int]:
        """(out, in) of checkpoint matrix `shard_id` whole (before tensor parallelism splits it): the
        rows of an adapter's B and the columns of its A for it (checked before an adapter is read)."""
        out = self.out_features * (self.tp_size if self.shard_dim == 0 else 1)
        return out, self.in_features * (self.tp_size if self.shard_dim == 1 else 1)

    def remove_lora(self, adapter_id: int) -> None:
        self.lora.pop(adapter_id, None)

    def _with_lora(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.lora:
            return out
        batch = current_lora_batch()
        return out if batch is None else apply_lora(self.lora, x, out, batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._with_lora(x, self._matmul(x, self.bias))


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias, shard_dim=None)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features // tp_size(), bias, shard_dim=0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs (gate and up) stored as one matrix."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(in_features, sum(output_sizes), bias)

    def _fused_sizes(self, loaded: torch.Tensor) -> list[int]:
        return self.output_sizes

    def lora_shape(self, shard_id=None) -> tuple[int, int]:
        return self.output_sizes[shard_id], self.in_features

    def _place(self, loaded: torch.Tensor, shard_id: int) -> tuple[torch.Tensor, int]:
        return self._shard(loaded, 0), sum(self.output_sizes[:shard_id]) // self.tp_size


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused. q heads are split across ranks; kv heads too when the
    rank count divides them, otherwise (fewer kv heads than ranks) each rank keeps a copy of
    the one kv head its q heads read, as vLLM does."""

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = tp_size()
        self.head_dim, self.total_kv_heads = head_dim, num_kv_heads
        self.q_size = num_heads // tp * head_dim
        self.kv_size = max(1, num_kv_heads // tp) * head_dim
        super().__init__(hidden_size, tp * (self.q_size + 2 * self.kv_size), bias)

    def _kv_shard(self, loaded):
        if self.tp_size == 1 or self.total_kv_heads >= self.tp_size:
            return self._shard(loaded, 0)
        head = self.tp_rank * self.total_kv_heads // self.tp_size
        return loaded.narrow(0, head * self.head_dim, self.head_dim)

    def _fused_sizes(self, loaded: torch.Tensor) -> list[int]:
        kv_rows = self.total_kv_heads * self.head_dim
        return [loaded.size(0) - 2 * kv_rows, kv_rows, kv_rows]

    def lora_shape(self, shard_id=None) -> tuple[int, int]:
        rows = self.q_size * self.tp_size if shard_id == "q" else self.total_kv_heads * self.head_dim
        return rows, self.in_features

    def _place(self, loaded: torch.Tensor, shard_id: str) -> tuple[torch.Tensor, int]:
        shard = self._shard(loaded, 0) if shard_id == "q" else self._kv_shard(loaded)
        return shard, {"q": 0, "k": self.q_size, "v": self.q_size + self.kv_size}[shard_id]


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs summed with all-reduce (unless
    `reduce_results` is False: the caller sums several layers' partial outputs first, as the
    experts of a mixture do)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce_results: bool = True):
        super().__init__(in_features // tp_size(), out_features, bias, shard_dim=1)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        if self.tp_size > 1 and self._collects(param):
            # Whole rows to `pack`, which quantises them as a single rank does and keeps this rank's
            # columns: per-row int8 scales read the whole row, so every rank has the one-rank codes.
            return self._collect(loaded, shard_id)
        return super().weight_loader(param, loaded, shard_id)

    def _packed_columns(self) -> tuple[int, int] | None:
        return (self.tp_rank * self.in_features, self.in_features) if self.tp_size > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        out = self._with_lora(x, self._matmul(x, bias))  # each rank adds its partial update
        # The split is fixed when the layer is built: a single-rank model never communicates,
        # even while another engine of this process holds a tensor-parallel group.
        return all_reduce(out) if self.tp_size > 1 and self.reduce_results else out

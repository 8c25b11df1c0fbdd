"""Token embedding and LM head, vocabulary-parallel under tensor parallelism.

Quantised (``quantization`` set before loading): the embedding keeps a table it looks
rows up in without a dense copy (GGUF blocks as stored, or int8 rows), and the head a
packed weight for its matmul (quant/packed.py). A tied head packs the same checkpoint
tensor for itself (models/registry.py hands it over), since lookup and matmul want
different forms.
"""
import torch
import torch.nn.functional as F
from torch import nn

from levante.distributed import all_gather, all_reduce, tp_rank, tp_size
from levante.quant.packed import GGUFRows, Int8Weight, pack, pack_embedding


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.shard_size = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.shard_size
        # Rows of the vocabulary this rank holds (the last shard may be short; its table is padded).
        self.num_rows = max(0, min(self.shard_size, vocab_size - self.vocab_start))
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.dtype = self.weight.dtype
        self.quantization: str | None = None  # "auto" | "int8" | "int4", set before loading
        self.packed = None  # a table with .rows(ids, dtype), or for the head a weight with .matmul

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        if self.quantization is not None:
            return self._adopt(self._pack(self._vocab_shard(loaded)))
        shard = loaded[self.vocab_start:self.vocab_start + self.shard_size]
        param.data.zero_()
        param.data[: shard.size(0)].copy_(shard)

    def _pack(self, loaded):
        return pack_embedding(loaded, self.quantization, self.dtype)

    def _vocab_shard(self, loaded):
        """This rank's rows of a checkpoint table (GGUF blocks stay blocks)."""
        if self.tp_size == 1:
            return loaded
        if loaded.size(0) != self.vocab_size:
            raise RuntimeError(f"table has {loaded.size(0)} rows, expected {self.vocab_size}")
        return loaded.narrow(0, self.vocab_start, self.num_rows)

    def _adopt(self, weight) -> None:
        if tuple(weight.shape) != (self.num_rows, self.hidden_size):
            raise RuntimeError(f"table {tuple(weight.shape)} != expected {(self.num_rows, self.hidden_size)}")
        if isinstance(weight, torch.Tensor):
            self.weight.data = F.pad(weight, (0, 0, 0, self.shard_size - self.num_rows))
        else:
            self.packed = weight
            self.weight.data = torch.empty(0, dtype=self.dtype)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.rows(ids, self.dtype)
        return F.embedding(ids, self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.vocab_start
        in_shard = (local >= 0) & (local < self.num_rows)
        out = self._lookup(local.clamp(0, max(0, self.num_rows - 1))) * in_shard.unsqueeze(-1)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to float32 logits over the whole vocabulary."""

    def _pack(self, loaded):
        return pack([loaded], self.quantization, self.dtype)

    def load_tied(self, embedding: VocabParallelEmbedding, loaded) -> None:
        """Quantised and tied to ``embedding``: pack ``loaded`` (the shared matrix) for the
        matmul; the embedding then looks rows up in this packed weight too, unless it keeps
        the checkpoint's GGUF blocks (exact, and no memory of their own)."""
        self._adopt(self._pack(self._vocab_shard(loaded)))
        if self.packed is not None and not isinstance(embedding.packed, GGUFRows):
            embedding.packed = self.packed

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            if isinstance(self.packed, Int8Weight):
                logits = self.packed.matmul(hidden, float_out=True).float()
            else:
                logits = self.packed.matmul(hidden).float()
            if logits.size(-1) < self.shard_size:
                logits = F.pad(logits, (0, self.shard_size - logits.size(-1)))
        else:
            logits = F.linear(hidden, self.weight).float()
        if self.tp_size > 1:
            logits = all_gather(logits, dim=-1)
        return logits[..., : self.vocab_size]

"""Mixture of experts (Mixtral, Qwen3-MoE): a router scores the experts for each token, the
top k run, and their outputs are summed, weighted by the router.

Each expert is a gated MLP of its own (2-D weights, dense or packed like any linear layer:
GGUF's stacked ``ffn_*_exps`` tensors arrive cut into experts, loader/gguf.py, so quantised
experts stay quantised). A step groups its (token, expert) assignments by expert and runs
each chosen expert once over all its tokens: a decode step of one sequence reads the weights
of its k experts, never the others'.

Tensor parallelism splits every expert's intermediate width across ranks, as vLLM does: the
router is replicated, every rank runs the same assignments on its slices, and one all-reduce
sums the experts' partial outputs.

Choosing the experts happens on the host (which experts a step runs decides which layers are
called), so CUDA graphs do not capture these models (engine/runner.py).
"""
from __future__ import annotations

import torch
from torch import nn

from levante.distributed import all_reduce, tp_size
from levante.layers.linear import ReplicatedLinear
from levante.layers.mlp import GatedMLP


class Router(ReplicatedLinear):
    """Expert scores per token. Stays dense under any quantization: it is small, and its
    choices steer everything after it."""

    quantizable = False


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k experts of each token and their float32 weights: softmax over all experts,
    then (Mixtral; Qwen3-MoE's norm_topk_prob) rescaled so each token's k weights sum to 1,
    which equals a softmax over the k chosen logits."""
    weights, experts = logits.float().softmax(dim=-1).topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 hidden_act: str, renormalize: bool):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = Router(hidden_size, num_experts)
        self.experts = nn.ModuleList(
            GatedMLP(hidden_size, intermediate_size, hidden_act, reduce_results=False) for _ in range(num_experts))
        self.tp_size = tp_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = route(self.gate(x), self.top_k, self.renormalize)  # [tokens, top_k] each
        out = torch.zeros_like(x)
        order = experts.flatten().argsort(stable=True)  # assignments grouped by expert, in token order
        chosen, counts = experts.flatten()[order].unique_consecutive(return_counts=True)
        weights = weights.flatten()
        start = 0
        for expert, count in zip(chosen.tolist(), counts.tolist()):
            picks = order[start:start + count]
            start += count
            tokens = picks // self.top_k
            partial = self.experts[expert](x[tokens])
            # Not index_add_: on the CPU it takes ~100 ms for one row (a parallel region that waits
            # for busy threads); index_put_ accumulates the same sums in microseconds.
            out.index_put_((tokens,), (partial * weights[picks].unsqueeze(1)).to(out.dtype), accumulate=True)
        return all_reduce(out) if self.tp_size > 1 else out

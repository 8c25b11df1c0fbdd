"""Qwen3-MoE: Qwen3 whose MLPs are mixtures of experts (layers/moe.py), top-k routing with
the chosen weights renormalised when the config says `norm_topk_prob`; `mlp_only_layers`
and `decoder_sparse_step` may keep some blocks dense (config.py)."""
from levante.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    pass

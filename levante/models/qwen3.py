"""Qwen3: Llama with a per-head RMSNorm on queries and keys before RoPE."""
from levante.models.llama import CausalLM


class Qwen3ForCausalLM(CausalLM):
    attention_options = {"qk_norm": True}

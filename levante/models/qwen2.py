"""Qwen2 / Qwen2.5: Llama with biases on the q, k and v projections."""
from levante.models.llama import CausalLM


class Qwen2ForCausalLM(CausalLM):
    attention_options = {"qkv_bias": True}

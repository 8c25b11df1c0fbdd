"""Mistral: Llama with a sliding window on every layer when its config sets one (7B v0.1;
later versions set none). The window lives in the config's layer types (config.py)."""
from levante.models.llama import CausalLM


class MistralForCausalLM(CausalLM):
    pass

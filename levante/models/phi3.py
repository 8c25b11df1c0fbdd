"""Phi-3 / Phi-3.5 (and Phi-4-mini): Llama whose checkpoint stores q/k/v and gate/up already
fused (our layers hold them fused too: the loaders cut them per rank, layers/linear.py), with
LongRoPE scaling (layers/rotary.py) and, in Phi-4-mini, RoPE on part of each head."""
from levante.models.llama import CausalLM


class Phi3ForCausalLM(CausalLM):
    pass

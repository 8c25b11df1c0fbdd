"""Mixtral: Mistral whose every MLP is a mixture of experts (layers/moe.py): each token
goes to 2 of 8 experts, weighted by a softmax over the two chosen router logits."""
from levante.models.llama import CausalLM


class MixtralForCausalLM(CausalLM):
    # Checkpoints name the experts' matrices w1 (gate), w3 (up) and w2 (down)...
    packed_modules_mapping = CausalLM.packed_modules_mapping | {
        "w1": ("gate_up_proj", 0),
        "w3": ("gate_up_proj", 1),
        "w2": ("down_proj", None),
    }

    def adapt_checkpoint_tensor(self, name: str, tensor):
        """... and their block `block_sparse_moe`."""
        return name.replace(".block_sparse_moe.", ".mlp."), tensor

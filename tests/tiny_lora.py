"""Tiny random LoRA adapters for the tiny models, made and merged by PEFT (the reference)."""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import load_reference

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def build_adapter(base: Path, folder: Path, seed: int, **lora_options) -> Path:
    """Save a PEFT LoRA adapter of `base` with random A and B (B is zero in a fresh adapter) into `folder`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_reference(base), LoraConfig(init_lora_weights=False, **lora_options))
    with torch.no_grad():  # PEFT's random init is small: make each update clearly visible in the logits
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder


def merged_reference(base: Path, adapter: Path):
    """The base model with the adapter merged into its weights by PEFT, float32."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_reference(base), adapter).merge_and_unload().eval()

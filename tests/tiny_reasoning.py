"""A tiny random Qwen3 that speaks Qwen3's chat format, for reasoning tests.

The weights are tests/tiny_models.py's qwen3; the tokenizer gains the tokens Qwen3's templates write,
as Qwen3's own tokenizer has them (`<|im_start|>`, `<|im_end|>` special; `<think>`, `</think>` plain
text tokens), and the chat template is a real one from tests/chat_templates/ (public templates, as
Qwen ships them: Qwen3-0.6B's, where the model writes `<think>` itself, and QwQ-32B's, which opens
`<think>` in the generation prompt).
"""
from __future__ import annotations

from pathlib import Path

import tiny_models

TEMPLATES = Path(__file__).parent / "chat_templates"
QWEN3, QWQ = "Qwen3-0.6B", "QwQ-32B"


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def build(folder: Path, template_name: str = QWEN3) -> Path:
    from transformers import AutoTokenizer

    tiny_models.build("qwen3", folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<think>", "</think>"])
    assert len(tokenizer) <= tiny_models.VOCAB, "the added tokens must fit the model's vocabulary"
    tokenizer.chat_template = template(template_name)
    tokenizer.save_pretrained(folder)
    return folder

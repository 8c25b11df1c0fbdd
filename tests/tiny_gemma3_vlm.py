"""A tiny random Gemma3ForConditionalGeneration (SigLIP tower + projector + 2-layer text model), saved
with transformers, with a byte-level tokenizer that knows Gemma 3's image tokens and a Gemma-style chat template."""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 320
SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
            "<image_soft_token>"]
PAD, EOS, BOS, SOT, EOT, BOI, EOI, IMG = range(len(SPECIALS))

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def byte_level_bpe(vocab_size: int, specials: list[str], texts: list[str]):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`, the special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(VOCAB, SPECIALS, [
        "Here is the original image \n\n and here are some crops to help you see better \n\n \n\n" * 3,
        "user\nDescribe this picture.\n\n\nWhat is in it?\n\n\n\nmodel\nA cat on a mat.\n" * 3,
        "The quick brown fox jumps over the lazy dog. " * 3])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})


def config(image_size=56, mm_tokens_per_image=4, sliding_window=3, text_options: dict | None = None,
           vision_options: dict | None = None):
    """`text_options` / `vision_options` override the text and SigLIP settings below."""
    import transformers as tf

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=sliding_window,
                query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"], initializer_range=0.1,
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=14, vision_use_head=False)
    text = tf.Gemma3TextConfig(**{**text, **(text_options or {})})
    vision = tf.SiglipVisionConfig(**{**vision, **(vision_options or {})})
    return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens_per_image,
                           boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMG,
                           architectures=["Gemma3ForConditionalGeneration"], initializer_range=0.1)


def build(folder: Path, seed: int = 0, processor_options: dict | None = None, **options) -> Path:
    """Save the tiny model (float32, weights drawn from `seed`), tokenizer (with chat template) and
    preprocessor config (`processor_options` override image_processor's) into `folder`."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.Gemma3ForConditionalGeneration(config(**options))
    with torch.no_grad():  # random norms and projector so they are tested (init leaves zeros/ones)
        for name, p in model.named_parameters():
            if "norm" in name or "mm_input_projection" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "layernorm" in name or "layer_norm" in name else 0.0))
    model.to(torch.float32).save_pretrained(folder)
    tok = hf_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    image_processor(model.config, **(processor_options or {})).save_pretrained(folder)
    return folder


def image_processor(model_config, **overrides):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    side = model_config.vision_config.image_size
    return Gemma3ImageProcessorPil(size={"height": side, "width": side}, **overrides)


def hf_processor(folder: Path, **image_options):
    import transformers as tf
    from transformers import Gemma3Processor

    model_config = tf.AutoConfig.from_pretrained(folder)
    return Gemma3Processor(image_processor(model_config, **image_options), hf_tokenizer(),
                           image_seq_length=model_config.mm_tokens_per_image)


def load_reference(folder: Path):
    import transformers as tf

    return tf.Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())

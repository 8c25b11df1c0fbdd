"""Tiny random vision-language checkpoints (Qwen2.5-VL, Qwen3-VL), saved with transformers.

Each folder holds config.json + safetensors, a byte-level BPE tokenizer whose special
tokens include the Qwen vision tokens, a Qwen-VL-style chat template, and a
preprocessor_config.json written by transformers' `Qwen2VLImageProcessorPil`.
"""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384
SPECIALS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
PAD, EOS, IM_START, IM_END, VISION_START, VISION_END, IMAGE, VIDEO = range(len(SPECIALS))

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small limits keep images at a few dozen patches.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 48


def _tokenizer(folder: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog. " * 4, "Describe this image. What is in it?",
            "def add(a, b):\n    return a + b\n"]
    tok.train_from_iterator(text, trainer)
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    assert [tok.token_to_id(t) for t in SPECIALS] == list(range(len(SPECIALS)))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def _config(arch: str, text_options: dict | None = None, vision_options: dict | None = None):
    """`text_options` / `vision_options` override the text and vision settings below."""
    import transformers as tf

    tokens = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
                  vision_end_token_id=VISION_END)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=IM_END, pad_token_id=PAD)
    if arch == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, hidden_act="silu")
        text, vision = {**text, **(text_options or {})}, {**vision, **(vision_options or {})}
        return tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                   tie_word_embeddings=text.get("tie_word_embeddings", False),
                                   architectures=["Qwen2_5_VLForConditionalGeneration"], **tokens)
    if arch == "qwen3_vl":
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                  "mrope_interleaved": True, "rope_theta": 10000.0},
                    tie_word_embeddings=True)
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=36,
                      deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh")
        text, vision = {**text, **(text_options or {})}, {**vision, **(vision_options or {})}
        return tf.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                                architectures=["Qwen3VLForConditionalGeneration"], **tokens)
    raise ValueError(arch)


def image_processor(arch: str, **options):
    """transformers' reference processor (the PIL backend: torchvision is unusable here); `options`
    override the settings below (min_pixels, max_pixels, patch_size, merge_size, ...)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if arch == "qwen3_vl":
        defaults = dict(min_pixels=64 * 64, max_pixels=32 * 32 * 48, patch_size=16, image_mean=[0.5, 0.5, 0.5],
                        image_std=[0.5, 0.5, 0.5])
    else:
        defaults = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return Qwen2VLImageProcessorPil(**{**defaults, **options})


def build(arch: str, folder: Path, text_options: dict | None = None, vision_options: dict | None = None,
          processor_options: dict | None = None, seed: int = 0) -> Path:
    """`processor_options`: the saved preprocessor's settings (image_processor's); `seed`: the weights'."""
    import transformers as tf

    config = _config(arch, text_options, vision_options)
    torch.manual_seed(seed)
    cls = {"qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration, "qwen3_vl": tf.Qwen3VLForConditionalGeneration}[arch]
    model = cls(config)
    with torch.no_grad():  # norms start at 1 (biases at 0): make them random so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif "pos_embed" in name:
                p.normal_(0, 0.5)
    model.to(torch.float32).save_pretrained(folder)
    _tokenizer(folder)
    image_processor(arch, **(processor_options or {})).save_pretrained(folder)
    return folder


def load_reference(arch: str, folder: Path):
    import transformers as tf

    cls = {"qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration, "qwen3_vl": tf.Qwen3VLForConditionalGeneration}[arch]
    return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def reference_inputs(arch, ids, images, processor=None, image_token: int = IMAGE):
    """transformers' own preprocessing and placeholder expansion, independent of ours (`processor`:
    an `image_processor`, default the one `build` saves without options)."""
    if not images:
        ids = torch.tensor([ids])
        return {"input_ids": ids, "mm_token_type_ids": torch.zeros_like(ids, dtype=torch.int32)}
    processor = processor or image_processor(arch)
    features = processor(images, return_tensors="pt")
    counts = (features["image_grid_thw"].prod(-1) // processor.merge_size ** 2).tolist()
    expanded, it = [], iter(counts)
    for token in ids:
        expanded.extend([image_token] * next(it) if token == image_token else [token])
    ids = torch.tensor([expanded])
    return {"input_ids": ids, "mm_token_type_ids": (ids == image_token).int(),
            "pixel_values": features["pixel_values"], "image_grid_thw": features["image_grid_thw"]}


def random_image(width: int, height: int, seed: int, mode: str = "RGB"):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)

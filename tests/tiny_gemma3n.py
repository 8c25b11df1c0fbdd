"""Tiny random Gemma 3n checkpoints saved with transformers: the text model (Gemma3nForCausalLM) and the
whole model (Gemma3nForConditionalGeneration: MobileNet-v5 tower, USM audio encoder, text decoder), with a
byte-level tokenizer laid out like Gemma 3n's (text ids, then the vision ids, then the audio ids) and a
Gemma-style chat template that renders image and audio parts as their soft tokens.

The vision tower is timm's `mobilenetv5_300m_enc` (transformers builds it through timm) with its channels
cut by `channel_multiplier`; timm imports torchvision, which does not import beside this torch, so
`tests/timm_import.py` imports timm with stand-ins for the torchvision names it only mentions.
"""
from __future__ import annotations

from pathlib import Path

import torch

TEXT_VOCAB = 300  # vocab_size_per_layer_input; the vision ids start here
VISION_VOCAB = AUDIO_VOCAB = 8
VOCAB = TEXT_VOCAB + VISION_VOCAB + AUDIO_VOCAB
SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<start_of_audio>"]
PAD, EOS, BOS, SOT, EOT, BOI, BOA = range(len(SPECIALS))
EOI, IMG = TEXT_VOCAB, TEXT_VOCAB + 1
EOA, AUD = TEXT_VOCAB + VISION_VOCAB, TEXT_VOCAB + VISION_VOCAB + 1
IMAGE_TOKENS, AUDIO_TOKENS = 4, 12
IMAGE_SIDE, SAMPLING_RATE, MEL_BINS = 64, 16000, 16
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2
NUM_KV_SHARED = 2

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image_soft_token>' }}"
    "{% elif item['type'] == 'audio' %}{{ '<audio_soft_token>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def hf_tokenizer():
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from tiny_gemma3_vlm import byte_level_bpe

    tok = byte_level_bpe(TEXT_VOCAB - 8, SPECIALS, [
        "user\nDescribe this picture.\n\n\nWhat is said in the clip?\n\n\n\nmodel\nA cat on a mat.\n" * 3,
        "The quick brown fox jumps over the lazy dog. " * 3])

    def fill(upto: int) -> None:
        tok.add_special_tokens([AddedToken(f"<unused{i}>", special=True)
                                for i in range(tok.get_vocab_size(), upto)])

    fill(TEXT_VOCAB)
    tok.add_special_tokens([AddedToken("<end_of_image>", special=True), AddedToken("<image_soft_token>", special=True)])
    fill(TEXT_VOCAB + VISION_VOCAB)
    tok.add_special_tokens([AddedToken("<end_of_audio>", special=True), AddedToken("<audio_soft_token>", special=True)])
    fill(VOCAB)
    assert tok.token_to_id("<image_soft_token>") == IMG and tok.token_to_id("<audio_soft_token>") == AUD
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>", "boa_token": "<start_of_audio>",
                              "eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>"})


def text_config(**overrides):
    import transformers as tf

    options = dict(vocab_size=VOCAB, vocab_size_per_layer_input=TEXT_VOCAB, hidden_size=64,
                   hidden_size_per_layer_input=16, intermediate_size=[96, 128, 96, 128, 96, 96],
                   num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   layer_types=LAYER_TYPES, sliding_window=5, num_kv_shared_layers=NUM_KV_SHARED, laurel_rank=8,
                   altup_num_inputs=4, activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0],
                   max_position_embeddings=512, initializer_range=0.1, final_logit_softcapping=30.0,
                   bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    options.update(overrides)
    return tf.Gemma3nTextConfig(**options)


def config(text_options: dict | None = None, image_tokens: int = IMAGE_TOKENS, channel_multiplier: float = 0.0625):
    """`text_options` override text_config's settings; `image_tokens` (a square) per image, the side of the
    tower's output; `channel_multiplier` cuts the tower's channels."""
    import transformers as tf

    vision = {"architecture": "mobilenetv5_300m_enc", "hidden_size": 2048, "vocab_size": VISION_VOCAB,
              "vocab_offset": TEXT_VOCAB, "model_args": {"channel_multiplier": channel_multiplier,
                                                         "msfa_output_resolution": round(image_tokens ** 0.5)}}
    audio = tf.Gemma3nAudioConfig(vocab_size=AUDIO_VOCAB, vocab_offset=TEXT_VOCAB + VISION_VOCAB,
                                  input_feat_size=MEL_BINS, hidden_size=32, conf_num_attention_heads=2,
                                  conf_num_hidden_layers=2, sscp_conv_channel_size=[8, 4])
    return tf.Gemma3nConfig(text_config=text_config(**(text_options or {})), vision_config=vision, audio_config=audio,
                            audio_soft_tokens_per_image=AUDIO_TOKENS, vision_soft_tokens_per_image=image_tokens,
                            boi_token_id=BOI, eoi_token_id=EOI, image_token_id=IMG, boa_token_id=BOA,
                            eoa_token_id=EOA, audio_token_id=AUD, initializer_range=0.1,
                            architectures=["Gemma3nForConditionalGeneration"])


def _randomize(model) -> None:
    """Norm scales and the zero-initialised AltUp output scale made random, so every path is tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "correct_output_scale" in name or "per_dim_scale" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
            elif "layer_scale" in name or "gamma" in name:
                p.copy_(torch.randn_like(p) * 0.3)


def _save(model, folder: Path) -> Path:
    model.to(torch.float32).save_pretrained(folder)
    tok = hf_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


def build_text(folder: Path, **overrides) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    cfg = text_config(**overrides)
    cfg.architectures = ["Gemma3nForCausalLM"]
    model = tf.Gemma3nForCausalLM(cfg)
    _randomize(model)
    return _save(model, folder)


def build(folder: Path, seed: int = 0, image_tokens: int = IMAGE_TOKENS, **options) -> Path:
    """The whole model (weights drawn from `seed`; `options`: config's), with its image and audio
    preprocessor config."""
    import timm_import  # noqa: F401 - timm, for transformers' vision tower
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.Gemma3nForConditionalGeneration(config(image_tokens=image_tokens, **options))
    _randomize(model)
    _save(model, folder)
    hf_processor(image_tokens=image_tokens).save_pretrained(folder)
    return folder


def feature_extractor():
    from transformers import Gemma3nAudioFeatureExtractor

    return Gemma3nAudioFeatureExtractor(feature_size=MEL_BINS, sampling_rate=SAMPLING_RATE)


def image_processor():
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}, do_normalize=False,
                                resample=2, rescale_factor=1 / 255)


def hf_processor(folder: Path | None = None, image_tokens: int = IMAGE_TOKENS):
    from transformers import Gemma3nProcessor

    return Gemma3nProcessor(feature_extractor(), image_processor(), hf_tokenizer(), chat_template=CHAT_TEMPLATE,
                            audio_seq_length=AUDIO_TOKENS, image_seq_length=image_tokens)


def load_reference(folder: Path, text_only: bool = False):
    import transformers as tf

    if text_only:
        return tf.Gemma3nForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    import timm_import  # noqa: F401
    return tf.Gemma3nForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager").eval()


def write_gguf(folder: Path, path: Path, qtype=None) -> Path:
    """The text model of `folder` (`build_text`) as llama.cpp's converter writes a Gemma 3n GGUF: gguf's names for its tensors,
    AltUp projections stacked, norms as they are (Gemma 3n's have no +1), the sparsity pattern as std multipliers,
    a plain token list. `qtype` (a GGMLQuantizationType) quantises the 2-D matrices."""
    import gguf
    import json

    import numpy as np
    from safetensors.torch import load_file
    from tiny_gguf import add_transformer_sizes, save

    cfg = json.loads((folder / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    layers = cfg["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3N, layers)
    writer = gguf.GGUFWriter(path, "gemma3n")
    add_transformer_sizes(writer, cfg, cfg["rope_parameters"]["full_attention"]["rope_theta"])
    writer.add_sliding_window(cfg["sliding_window"])
    writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    writer.add_altup_active_idx(cfg["altup_active_idx"])
    writer.add_altup_num_inputs(cfg["altup_num_inputs"])
    writer.add_embedding_length_per_layer_input(cfg["hidden_size_per_layer_input"])
    writer.add_shared_kv_layers(cfg["num_kv_shared_layers"])
    normal = torch.distributions.Normal(0, 1)
    writer.add_activation_sparsity_scale([normal.icdf(torch.tensor(s, dtype=torch.float32)).item()
                                          for s in cfg["activation_sparsity_pattern"]])
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(cfg["vocab_size"])])
    writer.add_token_scores([0.0] * cfg["vocab_size"])
    writer.add_token_types([1] * cfg["vocab_size"])
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    tensors = {k.removeprefix("model."): v for k, v in load_file(folder / "model.safetensors").items()}
    out = {}
    for stacked, key in (("altup_projections", "altup_proj"), ("altup_unembed_projections", "altup_unembd_proj")):
        parts = sorted((k for k in tensors if k.startswith(stacked + ".")), key=lambda k: int(k.split(".")[1]))
        out[f"{key}.weight"] = torch.stack([tensors.pop(k) for k in parts])
    for name, value in tensors.items():
        name = "model." + name
        if name.endswith("_scale"):
            name += ".weight"
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        out[gguf_name] = value
    arrays = {}
    for name, value in out.items():
        array = np.ascontiguousarray(value.float().numpy())
        quantized = qtype is not None and array.ndim == 2 and array.shape[-1] % 32 == 0 and "norm" not in name \
            and not name.startswith(("token_embd", "per_layer_token_embd"))
        arrays[name] = (array, qtype) if quantized else array
    save(writer, arrays)
    return path

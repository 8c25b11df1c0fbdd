"""Qwen2.5-VL and Qwen3-VL against transformers: preprocessing, logits and greedy text for
prompts with 0, 1 and 3 images of different sizes in one ragged batch, chunked prefill
across image spans, the encoder cache, and prefix caching that tells images apart.

Tolerance as in test_models.py: float32 both sides, same weights; only the order of
floating-point operations differs (observed max |diff| ~1e-6).
"""
import base64
import io

import numpy as np
import pytest
import torch

from levante import LLM, SamplingParams
from tiny_vlm_models import (IMAGE, VISION_END, VISION_START, build, image_processor, load_reference,
                              random_image, reference_inputs)

ARCHS = ["qwen2_5_vl", "qwen3_vl"]
ATOL = 1e-4
PLACEHOLDER = [VISION_START, IMAGE, VISION_END]


@pytest.fixture(scope="module", params=ARCHS)
def arch_folder(request, tmp_path_factory):
    return request.param, build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def reference(arch_folder):
    return load_reference(*arch_folder)


def _llm(folder, **options):
    return LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=256, warmup=False, **options)


def _images():
    return [random_image(56, 84, 1), random_image(120, 60, 2), random_image(40, 150, 3)]


def _prompts():
    """(token ids with one placeholder per image, images): 0, 1 and 3 images."""
    images = _images()
    no_image = [20, 21, 22, 23, 24, 25, 26]
    one = [30, 31] + PLACEHOLDER + [32, 33, 34]
    three = [40] + PLACEHOLDER + [41, 42] + PLACEHOLDER + PLACEHOLDER + [43, 44, 45, 46]
    return [(no_image, []), (one, images[:1]), (three, images)]


def _multimodal(llm, prompts):
    return [llm.engine.processor.process(ids, images) for ids, images in prompts]


@pytest.mark.parametrize("size,mode", [((56, 84), "RGB"), ((120, 60), "RGB"), ((30, 200), "RGB"),
                                       ((640, 480), "RGB"), ((77, 91), "RGBA"), ((64, 64), "L")])
def test_preprocessing_matches_transformers(arch_folder, size, mode):
    from levante.multimodal.processor import load_processor
    from levante.loader import hf

    arch, folder = arch_folder
    image = random_image(*size, seed=7, mode=mode)
    processor = load_processor(folder, hf.read_config(folder))
    patches, grid = processor.preprocess(image)
    expected = image_processor(arch)([image], return_tensors="pt")
    assert list(grid) == expected["image_grid_thw"][0].tolist()
    torch.testing.assert_close(patches, expected["pixel_values"], atol=1e-6, rtol=0)


def test_ragged_batch_logits_match_transformers(arch_folder, reference):
    arch, folder = arch_folder
    llm = _llm(folder, enable_prefix_caching=False)
    prompts = _prompts()
    outputs = llm.generate(_multimodal(llm, prompts),
                           SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True))
    for (ids, images), output in zip(prompts, outputs):
        inputs = reference_inputs(arch, ids, images)
        assert output.prompt_token_ids == inputs["input_ids"][0].tolist()
        with torch.no_grad():
            expected = reference(**inputs).logits[0]
        torch.testing.assert_close(output.metrics["prompt_logits"], expected, atol=ATOL, rtol=0)


def test_chunked_prefill_across_images_matches(arch_folder, reference):
    arch, folder = arch_folder
    llm = _llm(folder, enable_prefix_caching=False, max_num_batched_tokens=5)
    ids, images = _prompts()[2]
    (output,) = llm.generate(_multimodal(llm, [(ids, images)]),
                             SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True))
    with torch.no_grad():
        expected = reference(**reference_inputs(arch, ids, images)).logits[0]
    torch.testing.assert_close(output.metrics["prompt_logits"], expected, atol=ATOL, rtol=0)


GREEDY_TOKENS = 24  # decode steps past the image, each compared (issue 13: one went wrong at the third)


def _greedy_matches(llm, reference, arch, prompts):
    outputs = llm.generate(_multimodal(llm, prompts),
                           SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True))
    for (ids, images), output in zip(prompts, outputs):
        inputs = reference_inputs(arch, ids, images)
        with torch.no_grad():
            generated = reference.generate(**inputs, do_sample=False, max_new_tokens=GREEDY_TOKENS,
                                           min_new_tokens=GREEDY_TOKENS, pad_token_id=0)
        assert output.outputs[0].token_ids == generated[0, inputs["input_ids"].size(1):].tolist()
    return [output.outputs[0].token_ids for output in outputs]


def test_greedy_continuation_matches_transformers(arch_folder, reference):
    arch, folder = arch_folder
    _greedy_matches(_llm(folder), reference, arch, _prompts())


@pytest.fixture(scope="module")
def real_vocabulary_qwen2_5_vl(tmp_path_factory):
    """Issue 13's model: Qwen2.5's real vocabulary size (151,936) with tied embeddings, mrope_section
    [4, 2, 2], a 2-block vision tower whose 56-pixel windows are smaller than the images."""
    text = dict(vocab_size=151936, tie_word_embeddings=True, initializer_range=0.3,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 1000000.0})
    folder = build("qwen2_5_vl", tmp_path_factory.mktemp("qwen2_5_vl_vocab"), text, dict(depth=2))
    return folder, load_reference("qwen2_5_vl", folder)


@pytest.mark.slow  # transformers' generate over 151,936 logits a step takes its time
def test_real_vocabulary_greedy_matches_transformers(real_vocabulary_qwen2_5_vl):
    folder, reference = real_vocabulary_qwen2_5_vl
    assert reference.config.text_config.vocab_size == 151936 and reference.config.tie_word_embeddings
    images = [random_image(112, 84, 5), random_image(84, 168, 6), random_image(200, 56, 7)]
    prompts = [([30, 31] + PLACEHOLDER + [32, 33, 34], images[:1]), (PLACEHOLDER + [40, 41] + PLACEHOLDER, images[1:])]
    answers = _greedy_matches(_llm(folder), reference, "qwen2_5_vl", prompts)
    assert all(len(set(tokens)) > GREEDY_TOKENS // 2 for tokens in answers)  # no degenerate repetition


def test_repeated_image_is_encoded_once(arch_folder):
    _, folder = arch_folder
    llm = _llm(folder)
    model, calls = llm.engine.model, []
    encode = model.encode_images
    model.encode_images = lambda images: calls.append(len(images)) or encode(images)
    image = random_image(56, 84, 11)
    twice = [50] + PLACEHOLDER + [51] + PLACEHOLDER + [52]
    once = [60, 61] + PLACEHOLDER + [62]
    params = SamplingParams(temperature=0, max_tokens=2)
    first = llm.generate(_multimodal(llm, [(twice, [image, image]), (once, [image])]), params)
    again = llm.generate(_multimodal(llm, [(once, [image.copy()])]), params)
    assert calls == [1]
    assert llm.engine.runner.encoder_cache.num_encoded == 1
    assert again[0].outputs[0].token_ids == first[1].outputs[0].token_ids


def test_prefix_cache_tells_images_apart(arch_folder, reference):
    """Same tokens, different pictures: the second prompt must not reuse the first's KV blocks."""
    arch, folder = arch_folder
    llm = _llm(folder)  # prefix caching on
    ids = [70, 71, 72, 73, 74, 75, 76, 77] + PLACEHOLDER + [78, 79]
    params = SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True)
    for seed in (21, 22):
        image = random_image(84, 56, seed)
        (output,) = llm.generate(_multimodal(llm, [(ids, [image])]), params)
        cached = output.num_cached_tokens
        assert cached <= 8  # at most the text before the image
        with torch.no_grad():
            expected = reference(**reference_inputs(arch, ids, [image])).logits[0]
        torch.testing.assert_close(output.metrics["prompt_logits"], expected[cached:], atol=ATOL, rtol=0)
    assert cached == 8  # the shared text before the image was reused


def test_chat_with_image_url(arch_folder):
    _, folder = arch_folder
    llm = _llm(folder)
    image = random_image(70, 50, 31)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    by_url = llm.chat([{"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                                     {"type": "image_url", "image_url": {"url": url}}]}], params)
    by_pil = llm.chat([{"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                                     {"type": "image", "image": image}]}], params)
    by_generate = llm.generate("<|im_start|>user\nDescribe this image.<|vision_start|><|image_pad|><|vision_end|>"
                               "<|im_end|>\n<|im_start|>assistant\n", params, images=[image])
    assert by_url[0].outputs[0].token_ids == by_pil[0].outputs[0].token_ids == by_generate[0].outputs[0].token_ids
    assert by_url[0].prompt_token_ids.count(IMAGE) == np.prod(
        llm.engine.processor.preprocess(image)[1]) // 4


def test_bad_images_are_invalid_requests(arch_folder):
    from levante.errors import InvalidRequest

    _, folder = arch_folder
    llm = _llm(folder)
    with pytest.raises(InvalidRequest, match="not an image"):
        llm.chat([{"role": "user", "content": [{"type": "image_url",
                                                "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    with pytest.raises(InvalidRequest, match="placeholders"):
        llm.generate([1, 2, 3], images=[random_image(56, 56, 1)])
    with pytest.raises(InvalidRequest, match="no images"):
        llm.generate([1] + PLACEHOLDER + [2])


def test_bfloat16_model_keeps_float32_patch_embedding(arch_folder):
    """Convolutions run in float32 on CPU whatever the model dtype (#1650); bf16 stays near float32."""
    _, folder = arch_folder
    ids, images = _prompts()[1]
    params = SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True)
    logits = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(str(folder), dtype=dtype, block_size=4, num_kv_blocks=64, warmup=False)
        model = llm.engine.model
        assert model.visual.patch_embed.proj.weight.dtype == torch.float32
        assert model.model.embed_tokens.weight.dtype == getattr(torch, dtype)
        (output,) = llm.generate(_multimodal(llm, [(ids, images)]), params)
        logits[dtype] = output.metrics["prompt_logits"]
    torch.testing.assert_close(logits["bfloat16"], logits["float32"], atol=0.05, rtol=0)


def test_hub_config_layouts():
    """Configs as published: Qwen2.5-VL's flat text fields with rope_scaling {type: mrope}; Qwen3-VL's
    nested text_config whose tie_word_embeddings is the only one (#1682)."""
    from levante.config import FULL, ModelConfig
    from levante.layers.rotary import RotaryEmbedding

    qwen25 = ModelConfig.from_hf_dict({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_size": 2048,
        "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
        "vocab_size": 151936, "rope_theta": 1000000.0, "tie_word_embeddings": True, "image_token_id": 151655,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 2048, "in_chans": 3}})
    rope = qwen25.rope[FULL]
    assert (rope.rope_type, rope.theta, rope.extra["mrope_section"]) == ("mrope", 1e6, [16, 24, 24])
    assert qwen25.tie_word_embeddings and qwen25.raw["vision_config"]["depth"] == 32
    rotary = RotaryEmbedding(128, rope, 4096)
    assert rotary.mrope_axis[:64].tolist() == [0] * 16 + [1] * 24 + [2] * 24

    qwen3 = ModelConfig.from_hf_dict({
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "image_token_id": 151655,
        "text_config": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "head_dim": 128,
                        "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 151936,
                        "rope_theta": 5000000, "tie_word_embeddings": True,
                        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                         "rope_type": "default"}},
        "vision_config": {"depth": 24, "deepstack_visual_indexes": [5, 11, 17]}})
    assert qwen3.tie_word_embeddings and qwen3.head_dim == 128 and qwen3.rope[FULL].theta == 5e6
    axes = RotaryEmbedding(128, qwen3.rope[FULL], 4096).mrope_axis[:64].tolist()
    assert axes[:9] == [0, 1, 2] * 3 and axes[60:] == [0] * 4 and axes.count(1) == 20 and axes.count(2) == 20

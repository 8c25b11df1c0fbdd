"""Gemma 3 with images against transformers: processor (pixels, pan-and-scan, expanded prompt),
vision tower + projector, logits of a ragged batch with 0, 1 and 3 images, greedy continuations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_gemma3_vlm as tiny
from levante.errors import InvalidRequest
from levante.loader.tokenizer import Tokenizer
from levante.multimodal.gemma3 import Gemma3Processor, pan_and_scan_crops

PAS = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=4,
           pan_and_scan_min_ratio_to_activate=1.2)


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build(tmp_path_factory.mktemp("gemma3-vlm"))


@pytest.fixture(scope="module")
def processor(folder):
    return Gemma3Processor.from_pretrained(folder, tiny.read_json(folder / "config.json"))


def ours(processor, text, images, pas):
    settings = processor.image_processor.settings
    saved = dict(settings.__dict__)
    if pas:
        settings.__dict__.update(PAS)
    try:
        ids = processor.tokenizer.encode(text, add_special_tokens=False)
        return processor.process(ids, images)
    finally:
        settings.__dict__.update(saved)


def theirs(folder, text, images, pas):
    hf = tiny.hf_processor(folder, **(PAS if pas else {}))
    return hf(text=[text], images=[images] if images else None, add_special_tokens=False, return_tensors="pt",
              **(PAS if pas else {}))


PROMPTS = [
    ("<bos><start_of_turn>user\n<start_of_image>Describe this picture.<end_of_turn>\n<start_of_turn>model\n",
     [(40, 30)]),
    ("<start_of_turn>user\nWhat is in it?\n<start_of_image>\n\n<start_of_image> and <start_of_image><end_of_turn>\n",
     [(70, 30), (20, 64), (33, 33)]),
    ("<start_of_image><start_of_image>", [(90, 20), (56, 56)]),
    ("no images here\n", []),
]


@pytest.mark.parametrize("pas", [False, True])
@pytest.mark.parametrize("text, sizes", PROMPTS)
def test_processor_matches_transformers(folder, processor, text, sizes, pas):
    images = [picture(w, h, i) for i, (w, h) in enumerate(sizes)]
    mine, ref = ours(processor, text, images, pas), theirs(folder, text, images, pas)
    assert mine.token_ids == ref["input_ids"][0].tolist()
    if images:
        pixels = torch.stack([image.tensors["pixel_values"] for image in mine.images])
        assert torch.equal(pixels, ref["pixel_values"])
    types = ref["token_type_ids"][0].tolist()
    covered = [0] * len(types)
    for (start, end), image in zip(mine.bidirectional_spans, mine.images):
        assert (image.offset, image.offset + image.length) == (start, end)
        covered[start:end] = [1] * (end - start)
    assert covered == types


def test_pan_and_scan_rules():
    landscape = np.zeros((100, 260, 3), np.uint8)
    # 2.6 rounds to 3 crops of ceil(260 / 3) columns, the last one narrower
    assert [c.shape[:2] for c in pan_and_scan_crops(landscape, 50, 4, 1.2)] == [(100, 87), (100, 87), (100, 86)]
    assert len(pan_and_scan_crops(landscape, 100, 4, 1.2)) == 2  # at least 2, at most width // min_crop_size
    assert pan_and_scan_crops(landscape, 200, 4, 1.2) == []  # crops would be under the minimum
    assert pan_and_scan_crops(np.zeros((100, 110, 3), np.uint8), 10, 4, 1.2) == []  # not elongated enough
    assert len(pan_and_scan_crops(np.zeros((10, 1000, 3), np.uint8), 2, 4, 1.2)) == 4  # capped
    assert [c.shape[:2] for c in pan_and_scan_crops(np.zeros((301, 100, 3), np.uint8), 10, 4, 1.2)] == [(101, 100)] * 2 + [(99, 100)]


def test_keys_follow_pixels(processor):
    a, b = picture(30, 30, 1), picture(30, 30, 2)
    first = ours(processor, "<start_of_image><start_of_image><start_of_image>", [a, b, a.copy()], False)
    keys = [image.key for image in first.images]
    assert keys[0] == keys[2] != keys[1]


def test_placeholder_count_must_match(processor):
    with pytest.raises(InvalidRequest, match="2 images"):
        ours(processor, "<start_of_image> only one", [picture(9, 9, 0), picture(9, 9, 1)], False)


@pytest.fixture(scope="module")
def reference(folder):
    return tiny.load_reference(folder)


@pytest.fixture(scope="module")
def levante_model(folder):
    from levante.config import ModelConfig
    from levante.loader import hf
    from levante.models.registry import build_model, load_weights

    config = ModelConfig.from_hf_dict(hf.read_config(folder))
    model = build_model(config, torch.float32, torch.device("cpu"))
    load_weights(model, hf.named_tensors(folder))
    return model.eval()


def test_vision_tower_and_projector_match(levante_model, reference, processor):
    images = [picture(70, 30, 0), picture(20, 64, 1), picture(56, 56, 2)]
    prompt = ours(processor, "<start_of_image>" * 3, images, pas=True)
    pixels = torch.stack([image.tensors["pixel_values"] for image in prompt.images])
    with torch.no_grad():
        expected = reference.get_image_features(pixels).pooler_output
    got = torch.stack(levante_model.encode_images(prompt.images))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_patch_convolution_stays_float32(folder):
    from levante.config import ModelConfig
    from levante.loader import hf
    from levante.models.registry import build_model, load_weights

    config = ModelConfig.from_hf_dict(hf.read_config(folder))
    model = build_model(config, torch.bfloat16, torch.device("cpu"))
    load_weights(model, hf.named_tensors(folder))
    conv = model.vision_tower.embeddings.patch_embedding
    assert conv.weight.dtype == torch.float32 and model.vision_tower.post_layernorm.weight.dtype == torch.bfloat16
    from levante.multimodal.inputs import ImageInput

    rows = model.encode_images([ImageInput("k", 0, 4, {"pixel_values": torch.randn(3, 56, 56)})])
    assert rows[0].dtype == torch.bfloat16 and rows[0].shape == (4, 64)

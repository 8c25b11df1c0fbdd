"""Qwen2.5-VL and Qwen3-VL against transformers over random configs and images (tests/vlm_fidelity.py):
cases per family (2 in make test, 20 in make vlm-fidelity), each a tiny model drawn from its seed
(widths, heads, layers, initializer range, tied embeddings, rope theta, M-RoPE sections; tower depth,
width, heads, window size and full-attention blocks, patch and merge sizes, activation, DeepStack
layers; the processor's pixel bounds) and prompts with one to three images of random sizes, in the first
turn or a later one. Case 0 of Qwen2.5-VL is issue 28's model (the real 151,936-token vocabulary, tied,
initializer range 0.2, M-RoPE [4, 2, 2]; 2 tower blocks of width 32, 56-pixel windows, block 1 full; its
processor and images)."""
from __future__ import annotations

import random

import pytest

import tiny_vlm_models as tiny
from levante import LLM, SamplingParams
from vlm_fidelity import (GREEDY_TOKENS, Prompt, assert_matches, case_params, random_image, random_turns,
                          reference_answer)

PLACEHOLDER = [tiny.VISION_START, tiny.IMAGE, tiny.VISION_END]
TURN = ([tiny.IM_START, 30], [tiny.IM_END])  # a turn's opening (role) and closing ids
TEXT_IDS = range(tiny.VIDEO + 12, tiny.VOCAB)


def _sections(rng: random.Random, half: int, interleaved: bool) -> list[int]:
    """M-RoPE sections (t, h, w) that add up to `half`; interleaved ones leave t at least a third."""
    if interleaved:
        h = w = rng.randint(1, half // 3)
        return [half - h - w, h, w]
    h = rng.randint(1, half - 2)
    w = rng.randint(1, half - 1 - h)
    return [half - h - w, h, w]


def _text(rng: random.Random, interleaved: bool) -> dict:
    heads, kv_heads = rng.choice([(4, 2), (4, 1), (2, 2), (4, 4), (8, 2)])
    head_dim = rng.choice([8, 16, 24])
    rope = {"rope_type": "default", "mrope_section": _sections(rng, head_dim // 2, interleaved),
            "rope_theta": rng.choice([10000.0, 1000000.0])}
    if interleaved:
        rope["mrope_interleaved"] = True
    return dict(hidden_size=heads * head_dim, head_dim=head_dim, intermediate_size=rng.choice([32, 64, 128]),
                num_hidden_layers=rng.randint(1, 3), num_attention_heads=heads, num_key_value_heads=kv_heads,
                initializer_range=rng.choice([0.02, 0.1, 0.2, 0.3]), tie_word_embeddings=rng.random() < 0.5,
                rope_parameters=rope)


def qwen2_5_vl_case(seed: int) -> dict:
    rng = random.Random(seed)
    if seed == 0:
        return _issue_case()
    text = _text(rng, interleaved=False)
    text.pop("head_dim")  # Qwen2.5-VL's text model takes hidden / heads
    patch, merge = rng.choice([(14, 2), (14, 2), (16, 2), (14, 1)])
    depth, heads = rng.randint(1, 4), rng.choice([1, 2, 4])
    vision = dict(depth=depth, hidden_size=heads * rng.choice([8, 16]), num_heads=heads,
                  intermediate_size=rng.choice([24, 48, 64]), out_hidden_size=text["hidden_size"],
                  patch_size=patch, spatial_merge_size=merge, window_size=patch * merge * rng.randint(1, 4),
                  fullatt_block_indexes=sorted(rng.sample(range(depth), rng.randint(0, depth))),
                  hidden_act=rng.choice(["silu", "gelu_pytorch_tanh", "quick_gelu"]))
    unit = (patch * merge) ** 2
    processor = dict(patch_size=patch, merge_size=merge, min_pixels=unit * rng.choice([1, 2, 4]),
                     max_pixels=unit * rng.choice([8, 16, 32, 64]))
    return dict(text=text, vision=vision, processor=processor, prompts=_prompts(rng), seed=seed)


def _issue_case() -> dict:
    text = dict(vocab_size=151936, tie_word_embeddings=True, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 1000000.0})
    vision = dict(depth=2, hidden_size=32, num_heads=2, window_size=56, fullatt_block_indexes=[1])
    processor = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    rng = random.Random(0)
    first, second = (tiny.random_image(112, 84, 5), tiny.random_image(70, 140, 6))
    prompts = [Prompt(random_turns(rng, PLACEHOLDER, TEXT_IDS, TURN, 1), [first]),
               Prompt(random_turns(rng, PLACEHOLDER, TEXT_IDS, TURN, 1), [second]),
               Prompt(random_turns(rng, PLACEHOLDER, TEXT_IDS, TURN, 2), [first, second])]
    return dict(text=text, vision=vision, processor=processor, prompts=prompts, seed=0)


def qwen3_vl_case(seed: int) -> dict:
    rng = random.Random(1000 + seed)
    text = _text(rng, interleaved=True)
    text["tie_word_embeddings"] = True  # Qwen3-VL checkpoints tie (text_config says so)
    depth, heads, side = rng.randint(1, 4), rng.choice([1, 2, 4]), rng.choice([4, 6, 8])
    vision = dict(depth=depth, hidden_size=heads * rng.choice([8, 16]), num_heads=heads,
                  intermediate_size=rng.choice([24, 48, 64]), out_hidden_size=text["hidden_size"], patch_size=16,
                  spatial_merge_size=2, num_position_embeddings=side * side,
                  deepstack_visual_indexes=sorted(rng.sample(range(depth), rng.randint(0, depth))),
                  hidden_act=rng.choice(["gelu_pytorch_tanh", "silu"]))
    processor = dict(min_pixels=32 * 32 * rng.choice([1, 2, 4]), max_pixels=32 * 32 * rng.choice([8, 16, 32, 48]))
    return dict(text=text, vision=vision, processor=processor, prompts=_prompts(rng), seed=seed)


def _prompts(rng: random.Random) -> list[Prompt]:
    """Three prompts: one image, two or three (some in a later turn), and one or two more."""
    prompts = []
    for count in (1, rng.randint(2, 3), rng.randint(1, 2)):
        prompts.append(Prompt(random_turns(rng, PLACEHOLDER, TEXT_IDS, TURN, count),
                              [random_image(rng) for _ in range(count)]))
    return prompts


CASE_BUILDERS = {"qwen2_5_vl": qwen2_5_vl_case, "qwen3_vl": qwen3_vl_case}


@pytest.mark.parametrize("seed", case_params())
@pytest.mark.parametrize("arch", list(CASE_BUILDERS))
def test_random_models_and_images_match_transformers(arch, seed, tmp_path):
    case = CASE_BUILDERS[arch](seed)
    folder = tiny.build(arch, tmp_path, case["text"], case["vision"], case["processor"], seed=seed)
    rng = random.Random(seed)
    llm = LLM(str(folder), dtype="float32", warmup=False, block_size=rng.choice([4, 16]), num_kv_blocks=512,
              max_num_batched_tokens=rng.choice([None, None, 5, 64]))
    prompts = [llm.engine.processor.process(p.ids, p.images) for p in case["prompts"]]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True,
                                                   return_prompt_logits=True))
    reference = tiny.load_reference(arch, folder)
    processor = tiny.image_processor(arch, **case["processor"])
    answers = []
    for prompt, ours in zip(case["prompts"], prompts):
        inputs = tiny.reference_inputs(arch, prompt.ids, prompt.images, processor)
        assert ours.token_ids == inputs["input_ids"][0].tolist()
        answers.append(reference_answer(reference, inputs, tiny.PAD))
    assert_matches(outputs, answers, f"{arch} case {seed}")

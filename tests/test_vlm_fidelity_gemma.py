"""Gemma 3 and Gemma 3n against transformers over random configs and images (tests/vlm_fidelity.py):
cases per family (2 in make test, 20 in make vlm-fidelity), each a tiny model drawn from its seed and
prompts with one to three images of random sizes, in the first turn or a later one, through each
family's own processor as saved in the model folder. Gemma 3: text widths, heads, layers and their
sliding or full attention, the window, the query scale, logit soft-capping; SigLIP width, depth, heads,
image size and tokens per image; pan-and-scan on or off and its settings. Gemma 3n: text layers and
their kinds, the window, KV-shared layers, AltUp and LAuReL sizes, activation sparsity; the MobileNet-v5
tower's width and the tokens per image."""
from __future__ import annotations

import random

import pytest
import torch

import tiny_gemma3_vlm as gemma3
from levante import LLM, SamplingParams
from vlm_fidelity import GREEDY_TOKENS, assert_matches, case_params, random_image, reference_answer

WORDS = ["Describe this picture.", "What is in it?", "The quick brown fox", "and here", "A cat on a mat."]


def conversation(rng: random.Random, image_mark: str, images: int, bos: str = "<bos>") -> str:
    """A Gemma chat of 1-3 user turns (model turns between) holding `images` image marks, some in a later turn."""
    turns = rng.randint(1, 3)
    where = sorted(rng.randrange(turns) for _ in range(images))
    text = bos
    for turn in range(turns):
        parts = [rng.choice(WORDS) for _ in range(rng.randint(0, 2))] + [image_mark] * where.count(turn)
        rng.shuffle(parts)
        text += "<start_of_turn>user\n" + "".join(parts) + "<end_of_turn>\n"
        if turn < turns - 1:
            text += f"<start_of_turn>model\n{rng.choice(WORDS)}<end_of_turn>\n"
    return text + "<start_of_turn>model\n"


def _prompts(rng: random.Random, image_mark: str) -> list[tuple[str, list]]:
    return [(conversation(rng, image_mark, count), [random_image(rng) for _ in range(count)])
            for count in (1, rng.randint(2, 3), rng.randint(1, 2))]


def gemma3_case(seed: int) -> dict:
    rng = random.Random(2000 + seed)
    heads, kv_heads = rng.choice([(4, 2), (2, 1), (4, 4), (2, 2), (4, 1)])
    head_dim, layers = rng.choice([8, 16]), rng.randint(1, 3)
    text = dict(hidden_size=rng.choice([32, 64]), num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=head_dim, intermediate_size=rng.choice([48, 96]), num_hidden_layers=layers,
                layer_types=[rng.choice(["sliding_attention", "full_attention"]) for _ in range(layers)],
                sliding_window=rng.randint(2, 9), query_pre_attn_scalar=rng.choice([head_dim, 24]),
                initializer_range=rng.choice([0.02, 0.1, 0.2]), final_logit_softcapping=rng.choice([None, 30.0]))
    patches = rng.choice([4, 6, 8])
    per_side = rng.choice([d for d in range(1, patches + 1) if patches % d == 0 and d <= 4])
    vision_heads = rng.choice([2, 4])
    vision = dict(hidden_size=vision_heads * rng.choice([4, 8]), num_attention_heads=vision_heads,
                  num_hidden_layers=rng.randint(1, 2), intermediate_size=rng.choice([24, 48]))
    processor = {}
    if rng.random() < 0.5:
        processor = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=rng.randint(8, 40),
                         pan_and_scan_max_num_crops=rng.randint(2, 4), pan_and_scan_min_ratio_to_activate=1.2)
    return dict(options=dict(image_size=14 * patches, mm_tokens_per_image=per_side ** 2, text_options=text,
                             vision_options=vision),
                processor=processor, prompts=_prompts(rng, "<start_of_image>"))


@pytest.mark.parametrize("seed", case_params())
def test_gemma3_random_models_and_images_match_transformers(seed, tmp_path):
    case = gemma3_case(seed)
    folder = gemma3.build(tmp_path, seed=seed, processor_options=case["processor"], **case["options"])
    rng = random.Random(seed)
    llm = LLM(str(folder), dtype="float32", warmup=False, block_size=rng.choice([4, 16]), num_kv_blocks=1024,
              max_num_batched_tokens=rng.choice([None, None, 7, 64]))
    processor = llm.engine.processor
    prompts = [processor.process(processor.tokenizer.encode(text, add_special_tokens=False), images)
               for text, images in case["prompts"]]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True,
                                                   return_prompt_logits=True))
    reference, hf = gemma3.load_reference(folder), gemma3.hf_processor(folder, **case["processor"])
    answers = []
    for (text, images), ours in zip(case["prompts"], prompts):
        inputs = dict(hf(text=[text], images=[images], add_special_tokens=False, return_tensors="pt",
                         **case["processor"]))
        assert ours.token_ids == inputs["input_ids"][0].tolist()
        answers.append(reference_answer(reference, inputs, gemma3.PAD))
    assert_matches(outputs, answers, f"gemma3 case {seed}")


def gemma3n_case(seed: int) -> dict:
    rng = random.Random(3000 + seed)
    layers = rng.randint(2, 6)
    kinds = [rng.choice(["sliding_attention", "full_attention"]) for _ in range(layers - 1)] + ["full_attention"]
    shared = rng.randint(0, layers - 1)  # the last `shared` layers read the caches of earlier layers of their kind
    while shared and not set(kinds[layers - shared:]) <= set(kinds[:layers - shared]):
        shared -= 1
    heads, kv_heads = rng.choice([(4, 2), (2, 1), (4, 4)])
    text = dict(num_hidden_layers=layers, layer_types=kinds, num_attention_heads=heads, num_key_value_heads=kv_heads,
                intermediate_size=[rng.choice([64, 96, 128]) for _ in range(layers)],
                activation_sparsity_pattern=[rng.choice([0.0, 0.95]) for _ in range(layers)],
                sliding_window=rng.randint(2, 9), num_kv_shared_layers=shared,
                laurel_rank=rng.choice([4, 8]), altup_num_inputs=rng.choice([2, 4]),
                hidden_size_per_layer_input=rng.choice([8, 16]), initializer_range=rng.choice([0.02, 0.1]))
    resolution = rng.choice([1, 2])
    return dict(text=text, resolution=resolution, channels=rng.choice([0.0625, 0.125]),
                prompts=_prompts(rng, "<image_soft_token>"))


@pytest.mark.parametrize("seed", case_params())
def test_gemma3n_random_models_and_images_match_transformers(seed, tmp_path):
    import tiny_gemma3n as gemma3n

    case = gemma3n_case(seed)
    folder = gemma3n.build(tmp_path, seed=seed, text_options=case["text"], image_tokens=case["resolution"] ** 2,
                           channel_multiplier=case["channels"])
    rng = random.Random(seed)
    llm = LLM(str(folder), dtype="float32", warmup=False, block_size=rng.choice([4, 16]), num_kv_blocks=1024,
              max_num_batched_tokens=rng.choice([None, None, 16, 64]))
    processor = llm.engine.processor
    prompts = [processor.process(processor.tokenizer.encode(text, add_special_tokens=False), images)
               for text, images in case["prompts"]]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True,
                                                   return_prompt_logits=True))
    reference = gemma3n.load_reference(folder)
    hf = gemma3n.hf_processor(image_tokens=case["resolution"] ** 2)
    answers = []
    for (text, images), ours in zip(case["prompts"], prompts):
        inputs = dict(hf(text=text, images=images, return_tensors="pt"))
        assert ours.token_ids == inputs["input_ids"][0].tolist()
        answers.append(reference_answer(reference, inputs, gemma3n.PAD))
    assert_matches(outputs, answers, f"gemma3n case {seed}")
    assert all(torch.isfinite(o.metrics["prompt_logits"]).all() for o in outputs)

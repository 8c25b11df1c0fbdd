"""Shared by the randomized vision-language tests (tests/test_vlm_fidelity_*.py): random images and
prompts, and the comparison with transformers that every family's cases make.

A case is a tiny random model (config drawn from a seed), saved once, and a few prompts with images:
several images in one prompt, images in a later turn, non-square and odd sizes. levante runs the
prompts as one batch; for each, transformers' float32 reference (eager attention) gives the
log-probabilities of the first generated token and 24 greedy tokens, which levante must match:
log-probabilities within ATOL, every token equal.

`make test` runs DEFAULT_CASES cases per family (case 0 first: for Qwen2.5-VL, issue 28's model);
`make vlm-fidelity` runs the whole sweep, CASES (VLM_FIDELITY_CASES, default 20) per family.
"""
from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

ATOL = 1e-4
GREEDY_TOKENS = 24
SWEEP_CASES = 20  # random cases per family in the whole sweep
DEFAULT_CASES = 2  # of them in make test (each case builds, loads and runs two models: seconds apiece)
CASES = int(os.environ.get("VLM_FIDELITY_CASES", DEFAULT_CASES))


def case_params(seeds: int = CASES) -> list:
    """The cases' seeds as pytest parameters: those past DEFAULT_CASES marked slow."""
    import pytest

    return [pytest.param(seed, marks=[pytest.mark.slow] if seed >= DEFAULT_CASES else []) for seed in range(seeds)]


@dataclass
class Prompt:
    ids: list[int]  # token ids with one placeholder per image
    images: list = field(default_factory=list)


def random_image(rng: random.Random, smallest: int = 12, largest: int = 260):
    """Random pixels, a random non-square size (odd sizes included), RGB, RGBA or grey."""
    from PIL import Image

    width, height = rng.randint(smallest, largest), rng.randint(smallest, largest)
    mode = rng.choice(["RGB", "RGB", "RGBA", "L"])
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def random_turns(rng: random.Random, placeholder: list[int], text_ids: range, turn: tuple[list[int], list[int]],
                 images: int) -> list[int]:
    """Token ids of a conversation of 1-3 user turns (with assistant turns between) holding `images`
    placeholders, some in a later turn; `turn` is (the ids that open a user turn, those that close a turn)."""
    opening, closing = turn
    turns = rng.randint(1, 3)
    where = sorted(rng.randrange(turns) for _ in range(images))
    ids: list[int] = []
    for t in range(turns):
        ids += opening + [rng.choice(text_ids) for _ in range(rng.randint(0, 4))]
        for _ in range(where.count(t)):
            ids += placeholder + [rng.choice(text_ids) for _ in range(rng.randint(0, 3))]
        ids += closing
        if t < turns - 1:
            ids += opening + [rng.choice(text_ids) for _ in range(rng.randint(1, 5))] + closing
    return ids + opening[:1]


def assert_matches(outputs, references, label: str) -> None:
    """levante's outputs (max_tokens=GREEDY_TOKENS, return_prompt_logits) against transformers' for the
    same prompts: `references` yields (expected first-token log-probabilities, expected greedy ids)."""
    for number, (output, (logprobs, greedy)) in enumerate(zip(outputs, references)):
        got = output.metrics["prompt_logits"][-1].log_softmax(-1)
        delta = (got - logprobs).abs().max().item()
        assert delta <= ATOL, f"{label} prompt {number}: first-token log-probabilities differ by {delta:.2e}"
        assert output.outputs[0].token_ids == greedy, f"{label} prompt {number}: greedy tokens differ"


@torch.no_grad()
def reference_answer(model, inputs: dict, pad_token_id: int) -> tuple[torch.Tensor, list[int]]:
    """transformers' first-token log-probabilities (no cache) and its GREEDY_TOKENS greedy ids. No
    end-of-sequence token stops it, and none is banned either (`min_new_tokens` would ban them, where
    levante's `ignore_eos` only goes on past them)."""
    logprobs = model(**inputs).logits[0, -1].float().log_softmax(-1)
    config = copy.deepcopy(model.generation_config)
    config.update(eos_token_id=[], do_sample=False, max_new_tokens=GREEDY_TOKENS, pad_token_id=pad_token_id)
    generated = model.generate(**inputs, generation_config=config)
    return logprobs, generated[0, inputs["input_ids"].shape[1]:].tolist()

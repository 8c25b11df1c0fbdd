"""Sampling parameters: each one does what it says, checked on crafted logits and end to end."""
import math

import pytest
import torch

from levante import LLM, SamplingParams
from levante.engine.sampler import Sampler
from levante.engine.sequence import Sequence


def _seq(params, prompt=(1, 2, 3), output=()):
    seq = Sequence("r", 0, list(prompt), params, seed=params.seed)
    seq.token_ids.extend(output)
    return seq


def _sample(logits, params, trials=1, **kw):
    sampler = Sampler(eos_token_ids={0})
    seq = _seq(params, **kw)
    return [sampler(torch.tensor([logits], dtype=torch.float32), [seq])[0][0] for _ in range(trials)]


def test_top_k_top_p_min_p_limit_the_candidates():
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    assert set(_sample(logits, SamplingParams(top_k=2, seed=0), trials=200)) == {0, 1}
    assert set(_sample(logits, SamplingParams(top_p=0.7, seed=0), trials=200)) == {0, 1}
    assert set(_sample(logits, SamplingParams(min_p=0.4, seed=0), trials=200)) == {0, 1}
    assert set(_sample(logits, SamplingParams(seed=0), trials=400)) == {0, 1, 2, 3}


def test_penalties_and_bias_move_logits():
    logits = [2.0, 1.9, 0.0, 0.0]
    assert _sample(logits, SamplingParams(temperature=0)) == [0]
    assert _sample(logits, SamplingParams(temperature=0, logit_bias={3: 5.0})) == [3]
    assert _sample(logits, SamplingParams(temperature=0, repetition_penalty=1.2), prompt=(0,)) == [1]
    assert _sample(logits, SamplingParams(temperature=0, presence_penalty=0.5), output=(0,)) == [1]
    assert _sample(logits, SamplingParams(temperature=0, frequency_penalty=0.06), output=(0, 0)) == [1]
    assert _sample(logits, SamplingParams(temperature=0, frequency_penalty=0.06), output=(0,)) == [0]


def test_min_tokens_blocks_eos():
    logits = [5.0, 1.0, 0.0, 0.0]  # token 0 is EOS here
    assert _sample(logits, SamplingParams(temperature=0, min_tokens=2), output=(2,)) == [1]
    assert _sample(logits, SamplingParams(temperature=0, min_tokens=2), output=(2, 2)) == [0]


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("llama")), dtype="float32")


PROMPT = [11, 42, 99, 7, 250, 31]


def test_seed_reproducible_and_independent_of_the_batch(llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate(PROMPT, params)[0].outputs[0].token_ids
    crowd = llm.generate([[5, 6, 7], PROMPT, [8, 9]], [params][0])[1].outputs[0].token_ids
    other = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True))
    assert alone == crowd
    assert alone != other[0].outputs[0].token_ids


def test_top_k_1_is_greedy(llm):
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    top1 = llm.generate(PROMPT, SamplingParams(temperature=1.0, top_k=1, seed=3, max_tokens=16, ignore_eos=True))
    assert greedy[0].outputs[0].token_ids == top1[0].outputs[0].token_ids


def test_n_outputs(llm):
    out = llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_strings_and_tokens(llm):
    base = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    stop = base.text[6:9]
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    first = base.text.find(stop)
    assert out.outputs[0].text == base.text[:first]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    kept = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == base.text[:first + len(stop)]
    token = base.token_ids[4]
    by_token = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                   stop_token_ids=[token]))[0].outputs[0]
    assert by_token.token_ids == base.token_ids[: base.token_ids.index(token) + 1]
    assert by_token.stop_reason == token


def test_logprobs_and_prompt_logprobs(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3,
                                              prompt_logprobs=2, return_prompt_logits=True))[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 5
    for token, position in zip(completion.token_ids, completion.logprobs):
        assert token in position and position[token].rank == 1
        assert 3 <= len(position) <= 4
    assert completion.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in
                                                              zip(completion.token_ids, completion.logprobs)))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    expected = out.metrics["prompt_logits"].log_softmax(-1)
    for i in range(1, len(PROMPT)):
        position = out.prompt_logprobs[i]
        assert PROMPT[i] in position and len(position) <= 3
        assert position[PROMPT[i]].logprob == pytest.approx(float(expected[i - 1, PROMPT[i]]), abs=1e-5)

"""The mixture-of-experts block (layers/moe.py) beyond matching transformers (test_models,
test_gguf_families, test_tensor_parallel): a step runs each chosen expert once over exactly
the tokens routed to it and never touches the others; quantised experts (in-situ, and kept
from GGUF through the prepared-weights cache) stay packed while the router stays dense."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from levante import LLM, SamplingParams
from levante.layers.moe import route
from levante.quant.packed import Int8Weight
from tiny_gguf import convert

OPTIONS = dict(dtype="float32", block_size=4, num_kv_blocks=128)


def _prompt(length: int = 40) -> list[int]:
    return torch.randint(3, 384, (length,), generator=torch.Generator().manual_seed(1)).tolist()


def _record_experts(moe):
    """Per forward of `moe`: the router's choices and, in call order, (expert, rows) of each expert run."""
    steps = []
    moe.gate.register_forward_hook(
        lambda module, args, logits: steps.append({"chosen": route(logits, moe.top_k, moe.renormalize)[1],
                                                    "runs": []}))
    for index, expert in enumerate(moe.experts):
        expert.register_forward_hook(
            lambda module, args, out, index=index: steps[-1]["runs"].append((index, args[0].shape[0])))
    return steps


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_each_chosen_expert_runs_once_over_its_tokens(tiny_model, arch):
    llm = LLM(str(tiny_model(arch)), **OPTIONS, warmup=False)
    moe = llm.engine.model.model.layers[0].mlp
    steps = _record_experts(moe)
    llm.generate([_prompt()], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(steps) == 3  # the 40-token prefill, then two decode steps
    for step in steps:
        chosen = step["chosen"].flatten()
        expected = [(expert, int((chosen == expert).sum())) for expert in sorted(set(chosen.tolist()))]
        assert step["runs"] == expected  # once per chosen expert, over all its tokens, none other
    for decode in steps[1:]:  # one token: only its top-k experts' weights are read
        assert len(decode["runs"]) == moe.top_k < len(moe.experts)


def test_isq_packs_every_expert_and_keeps_the_router_dense(tiny_model):
    folder = str(tiny_model("mixtral"))
    dense = LLM(folder, **OPTIONS, quantization="none", warmup=False)
    isq = LLM(folder, **OPTIONS, quantization="int8", warmup=False)
    moe = isq.engine.model.model.layers[0].mlp
    assert moe.gate.packed is None and moe.gate.weight.numel()
    assert all(isinstance(linear.packed, Int8Weight) for expert in moe.experts
               for linear in (expert.gate_up_proj, expert.down_proj))
    params = SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True)
    want = dense.generate([_prompt()], params)[0].metrics["prompt_logits"]
    got = isq.generate([_prompt()], params)[0].metrics["prompt_logits"]
    # Per position, relative error: measured 2-5% (int8 rows of a 64-wide random model), more (up to 30%)
    # where two experts' scores lie within the quantisation noise and the routing flips. The top token
    # agrees at 90%+ where the prompt's rows take a dense matmul (AVX-512), at 80% where every row count
    # takes the W8A8 kernel with 8-bit activations (AVX2, NEON): near-ties of a random model flip.
    per_position = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert per_position.median() < 0.05
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75


def test_quantized_gguf_experts_survive_the_prepared_cache(tiny_model, tmp_path, monkeypatch):
    """The second load maps the packed experts saved by the first (loader/prepared.py)."""
    monkeypatch.setenv("LEVANTE_CACHE", str(tmp_path / "cache"))
    path = convert(tiny_model("mixtral"), tmp_path / "mixtral-q4_0.gguf", T.Q4_0)
    params = SamplingParams(temperature=0, max_tokens=8, return_prompt_logits=True, ignore_eos=True)
    first = LLM(str(path), **OPTIONS, warmup=False)
    assert first.engine.loaded_from == path
    want = first.generate([_prompt()], params)[0]
    second = LLM(str(path), **OPTIONS, warmup=False)
    assert second.engine.loaded_from != path  # the prepared file
    experts = second.engine.model.model.layers[0].mlp.experts
    assert all(expert.down_proj.packed is not None for expert in experts)
    got = second.generate([_prompt()], params)[0]
    assert torch.equal(got.metrics["prompt_logits"], want.metrics["prompt_logits"])
    assert got.outputs[0].token_ids == want.outputs[0].token_ids

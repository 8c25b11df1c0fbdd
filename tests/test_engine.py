"""Continuous batching, prefix caching, chunked prefill and preemption never change greedy output."""
import pytest
import torch

from levante import LLM, SamplingParams
from levante.errors import InvalidRequest

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _prompts(count=6, shared_prefix=0):
    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(3, 384, (shared_prefix,), generator=g).tolist()
    return [prefix + torch.randint(3, 384, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


@pytest.fixture(scope="module")
def folder(tiny_model):
    return str(tiny_model("qwen2"))


@pytest.fixture(scope="module")
def reference(folder):
    """One request at a time, no prefix cache: the ground truth for everything else."""
    llm = LLM(folder, dtype="float32", enable_prefix_caching=False)
    prompts = _prompts(shared_prefix=20)
    return prompts, [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts]


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_batched_equals_one_at_a_time(folder, reference):
    prompts, expected = reference
    llm = LLM(folder, dtype="float32", enable_prefix_caching=False)
    assert _tokens(llm.generate(prompts, GREEDY)) == expected


def test_prefix_cache_hits_keep_outputs(folder, reference):
    prompts, expected = reference
    llm = LLM(folder, dtype="float32", block_size=4)
    llm.generate(prompts[0], GREEDY)  # fills the cache with the shared 20-token prefix
    outputs = llm.generate(prompts, GREEDY)
    assert _tokens(outputs) == expected
    assert all(o.num_cached_tokens >= 16 for o in outputs[1:])


def test_chunked_prefill_keeps_outputs(folder, reference):
    prompts, expected = reference
    llm = LLM(folder, dtype="float32", max_num_batched_tokens=7, block_size=4)
    assert _tokens(llm.generate(prompts, GREEDY)) == expected


def test_preemption_under_a_tiny_kv_budget(folder, reference):
    prompts, expected = reference
    # 24 blocks of 4 = 96 slots: the six sequences need ~330, so some must be preempted and recomputed.
    llm = LLM(folder, dtype="float32", block_size=4, num_kv_blocks=24, max_model_len=96)
    outputs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert _tokens(outputs) == expected
    assert llm.engine.block_manager.num_free_blocks == 24


def test_errors_name_the_problem(folder):
    llm = LLM(folder, dtype="float32", max_model_len=64, warmup=False)
    with pytest.raises(InvalidRequest, match="64"):
        llm.generate([5] * 64, GREEDY)
    with pytest.raises(InvalidRequest, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(InvalidRequest, match="token ids"):
        llm.generate([[10**6]], GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_max_tokens_capped_by_context(folder):
    llm = LLM(folder, dtype="float32", max_model_len=32, warmup=False)
    out = llm.generate([5] * 28, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"


def test_prompt_logits_are_the_rows_computed_after_a_prefix_cache_hit(tiny_model):
    """Prompt logits (a testing aid) cover the rows this request computed: after a prefix-cache hit,
    the uncached tail, equal to the same rows computed from scratch."""
    llm = LLM(str(tiny_model("qwen2")), dtype="float32", block_size=4, num_kv_blocks=64)
    prompt = list(range(5, 30))
    params = SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True)
    first = llm.generate([prompt], params)[0].metrics["prompt_logits"]
    second = llm.generate([prompt], params)[0].metrics["prompt_logits"]
    assert first.shape[0] == len(prompt) and 0 < second.shape[0] < len(prompt)
    torch.testing.assert_close(second, first[-second.shape[0]:])


def test_device_defaults_and_cuda_kv_cache_size(monkeypatch):
    """CPU keeps small batches and a 2 GiB cache; CUDA batches 256 sequences and sizes the cache from the
    card's free memory (what gpu_memory_utilization leaves past the weights and one step's reserve)."""
    from types import SimpleNamespace

    from levante.config import EngineConfig, ModelConfig
    from levante.engine.engine import Engine

    cpu = EngineConfig().with_device_defaults(torch.device("cpu"))
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == (64, 1024)
    cuda = EngineConfig(max_num_seqs=32).with_device_defaults(torch.device("cuda"))
    assert (cuda.max_num_seqs, cuda.max_num_batched_tokens) == (32, 8192)  # what was given stays

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * gib, 80 * gib))
    mc = ModelConfig(architecture="x", model_type="x", vocab_size=1000, hidden_size=64, intermediate_size=128,
                     num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32)
    fake = SimpleNamespace(device=torch.device("cuda"), config=cuda, model_config=mc, dtype=torch.bfloat16)
    size = Engine._kv_cache_bytes(fake, per_token=256)
    reserve = 8192 * (4 * 128 + 8 * 64) * 2 + 2 * 32 * 1000 * 4 + gib
    assert size == int(80 * gib * 0.9 - 10 * gib - reserve)
    fake.config.cache.gpu_memory_utilization = 0.1  # less than what is in use: a floor of 64 blocks, warned
    assert Engine._kv_cache_bytes(fake, per_token=256) == 256 * 16 * 64
    fake.device = torch.device("cpu")
    assert Engine._kv_cache_bytes(fake, per_token=256) == 2 * gib


def test_final_only_outputs_are_the_cumulative_runs_last(folder):
    """output_kind="final_only" (what LLM.generate asks for): no output while a request runs, and the
    one at the end equals the last output of the same request run with cumulative outputs."""
    llm = LLM(folder, dtype="float32")
    engine = llm.engine
    prompts = _prompts(count=4)
    last = {}
    for kind in ("cumulative", "final_only"):
        for i, prompt in enumerate(prompts):
            params = SamplingParams(temperature=0, max_tokens=6 + 3 * i, ignore_eos=True, stop=["zz"],
                                    logprobs=2, output_kind=kind)
            engine.add_request(f"{kind}-{i}", prompt, params)
        seen = []
        while engine.has_unfinished_requests():
            seen += engine.step()
        if kind == "final_only":
            assert all(o.finished for o in seen) and len(seen) == len(prompts)
        else:
            assert len(seen) > len(prompts)
        for o in seen:
            last[o.request_id] = o
    for i in range(len(prompts)):
        a, b = last[f"cumulative-{i}"], last[f"final_only-{i}"]
        assert a.finished and b.finished
        assert a.outputs[0].token_ids == b.outputs[0].token_ids and a.outputs[0].text == b.outputs[0].text
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
    with pytest.raises(InvalidRequest, match="output_kind"):
        SamplingParams(output_kind="delta")


def test_padded_tables_match_nested_lists():
    from levante.engine.runner import padded_tables

    g = torch.Generator().manual_seed(3)
    for rows in (1, 5, 9, 64):  # row by row up to 8, one masked assignment above
        tables = [torch.randint(0, 1000, (int(torch.randint(0 if r else 1, 9, (1,), generator=g)),),
                                generator=g).tolist() for r in range(rows)]
        width = max(map(len, tables))
        expected = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        got = padded_tables(tables)
        assert got.dtype == torch.long and torch.equal(got, expected)


def test_prefix_cache_keys_survive_forced_python_hash_collisions(folder, reference, monkeypatch):
    """Block keys are SHA-256 digests: with every Python `hash` forced equal, different prompts
    still get separate blocks (and the outputs of a cache-less run), the same prompt still shares."""
    import builtins

    from levante.engine.kv_cache import block_key

    prompts, expected = reference
    llm = LLM(folder, dtype="float32", block_size=4)
    monkeypatch.setattr(builtins, "hash", lambda value: 0)
    assert block_key(None, [1, 2, 3, 4]) != block_key(None, [1, 2, 3, 5])
    assert block_key(block_key(None, [1, 2, 3, 4]), [9, 9, 9, 9]) != block_key(block_key(None, [5, 2, 3, 4]),
                                                                                 [9, 9, 9, 9])
    assert block_key(None, [1, 2, 3, 4], (("image-a", 0),)) != block_key(None, [1, 2, 3, 4], (("image-b", 0),))
    # Same block tokens after different first blocks: the old key, hash((parent, tokens)), was one number.
    first, second = [5, 6, 7, 8] + prompts[0], [9, 10, 11, 12] + prompts[0]
    outputs = [llm.generate(prompt, GREEDY)[0] for prompt in (first, second, first)]
    assert outputs[1].num_cached_tokens == 0
    assert outputs[2].num_cached_tokens >= len(first) - 4  # the same prompt still shares
    uncached = LLM(folder, dtype="float32", enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in outputs] == _tokens(uncached.generate([first, second, first], GREEDY))

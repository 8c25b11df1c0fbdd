"""A step that raises fails only the request that makes it raise; the others finish as if it had never come.

Fault injection: the model's forward raises whenever a marked token is among its inputs past a given
position. The marked request is pushed (logit bias) to generate that token, so it streams a few tokens
and then every step it takes part in raises. The reference for the others is the same engine without it.
"""
import threading

import pytest
import torch

from levante import LLM, SamplingParams
from levante.engine.loop import EngineLoop
from levante.errors import RequestFailed

MARKER = 301  # a token id of the tiny vocabulary (384)
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 300, (int(torch.randint(4, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(5)]


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("qwen2")), dtype="float32", enable_prefix_caching=False, warmup=False)


@pytest.fixture(scope="module")
def reference(llm):
    outputs = llm.generate(prompts(), GREEDY)
    tokens = [o.outputs[0].token_ids for o in outputs]
    assert not any(MARKER in t for t in tokens)  # the others never meet the marker by themselves
    return tokens


def marked_params() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logit_bias={MARKER: 100.0})


@pytest.fixture
def faulty_forward(llm):
    """The model's forward raises for a step that has the marker among its inputs at position >= start."""
    model = llm.engine.model
    original = model.forward
    calls = {"raised": 0}

    def forward(input_ids, positions, *args, **kwargs):
        hit = (input_ids == MARKER) & (positions >= calls["start"])
        if bool(hit.any()):
            calls["raised"] += 1
            raise RuntimeError("injected fault")
        return original(input_ids, positions, *args, **kwargs)

    model.forward = forward
    yield calls
    del model.forward


def test_a_failing_request_does_not_fail_its_batch(llm, reference, faulty_forward):
    engine = llm.engine
    marked_prompt = [5, 6, 7, 8]
    faulty_forward["start"] = len(marked_prompt) + 3  # it streams three tokens, then its steps raise
    for i, prompt in enumerate(prompts()):
        engine.add_request(f"good-{i}", prompt, GREEDY)
        if i == 1:
            engine.add_request("marked", marked_prompt, marked_params())
    finished, marked_outputs = {}, []
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == "marked":
                marked_outputs.append(output)
            elif output.finished:
                finished[output.request_id] = output
    assert faulty_forward["raised"] >= 2  # the whole batch first, then the marked request alone
    assert [finished[f"good-{i}"].outputs[0].token_ids for i in range(5)] == reference
    assert all(o.error is None for o in finished.values())
    last = marked_outputs[-1]
    assert last.finished and "injected fault" in last.error and last.outputs[0].finish_reason == "error"
    assert 3 <= len(last.outputs[0].token_ids) < 24
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # nothing leaked


def test_generate_raises_for_the_failed_request_only(llm, faulty_forward):
    faulty_forward["start"] = 0
    with pytest.raises(RequestFailed, match="prompt 1.*injected fault"):
        llm.generate([[5, 6, 7], [8, MARKER, 9]], GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_the_loop_reports_the_failure_to_that_caller_only(llm, reference, faulty_forward):
    faulty_forward["start"] = 7
    loop = EngineLoop(llm.engine)
    try:
        results, done = {}, threading.Event()

        def collect(name):
            def callback(item):
                if isinstance(item, BaseException) or item.finished:
                    results[name] = item
                    if len(results) == 6:
                        done.set()
            return callback

        for i, prompt in enumerate(prompts()):
            loop.submit(f"good-{i}", prompt, GREEDY, collect(i))
        loop.submit("marked", [5, 6, 7, 8], marked_params(), collect("marked"))
        assert done.wait(60)
        assert isinstance(results["marked"], RequestFailed) and "injected fault" in str(results["marked"])
        assert [results[i].outputs[0].token_ids for i in range(5)] == reference
        assert loop.healthy
    finally:
        loop.stop()


def test_streams_beside_a_failing_one_finish_byte_identical(tiny_model):
    """Over HTTP: the failing stream gets an error event and [DONE]; the others stream what they would alone."""
    import asyncio
    import json

    import httpx

    from live_server import live_server

    llm = LLM(str(tiny_model("qwen2")), dtype="float32", enable_prefix_caching=False, warmup=False)
    good = [{"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True} for p in prompts()]
    marked = {"prompt": [5, 6, 7, 8], "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True,
              "logit_bias": {str(MARKER): 100}}

    async def stream(client, body):
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            return [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]

    async def run(base, bodies):
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            return await asyncio.gather(*(stream(client, b) for b in bodies))

    def text(lines):
        chunks = [json.loads(line) for line in lines[:-1]]
        assert lines[-1] == "[DONE]" and all("error" not in c for c in chunks)
        return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]

    model, original = llm.engine.model, llm.engine.model.forward

    def forward(input_ids, positions, *args, **kwargs):
        if bool(((input_ids == MARKER) & (positions >= 7)).any()):
            raise RuntimeError("injected fault")
        return original(input_ids, positions, *args, **kwargs)

    with live_server(llm, "tiny") as (base, state):
        alone = [text(lines) for lines in asyncio.run(run(base, good))]
        model.forward = forward
        try:
            *beside, failed = asyncio.run(run(base, good + [marked]))
        finally:
            del model.forward
        assert [text(lines) for lines in beside] == alone
        assert failed[-1] == "[DONE]"
        error = json.loads(failed[-2])["error"]
        assert error["code"] == 500 and "injected fault" in error["message"]
        assert any("choices" in json.loads(line) for line in failed[:-2])  # it had streamed tokens first
        assert state.llm.engine.block_manager.num_free_blocks == state.llm.engine.block_manager.num_blocks

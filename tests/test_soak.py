"""A bounded soak: many clients at once, good requests mixed with invalid and abandoned ones.

At the end no request runs, no KV block is held, nothing is admitted, and the server answers.
`LEVANTE_SOAK_SECONDS` (default 10, which `make test` can afford; set more for a longer soak) sets how
long it runs; it prints what it did and the RSS.
"""
import asyncio
import collections
import json
import os
import random
import time

import httpx
import pytest

from levante import LLM
from levante.serve.limits import RequestLimits
from live_server import live_server

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("LEVANTE_SOAK_SECONDS", "10"))
CLIENTS = 24
MSG = [{"role": "user", "content": "Tell me a story."}]


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def good_chat(client, rng):
    r = await client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": rng.randint(1, 40),
                                                        "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 9)})
    return r.status_code


async def good_stream(client, rng):
    body = {"prompt": "Once upon a time", "max_tokens": rng.randint(1, 60), "n": rng.choice([1, 2]), "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    if r.status_code == 200:
        assert lines[-1] == "data: [DONE]" and "usage" in json.loads(lines[-2][6:])
    return r.status_code


async def abandoned(client, rng):
    body = {"messages": MSG, "max_tokens": 200, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code == 200:
            read = 0
            async for _ in r.aiter_lines():
                read += 1
                if read > rng.randint(1, 8):
                    break  # the client goes away mid-stream
    return "abandoned" if r.status_code == 200 else r.status_code


INVALID = [
    {"messages": MSG, "stop_token_ids": [10 ** 6], "min_tokens": 3},
    {"messages": MSG, "logit_bias": {"999999": 5}},
    {"messages": MSG, "top_k": -7},
    {"messages": MSG, "n": 99},
    {"messages": [], "max_tokens": 3},
    {"messages": MSG, "model": "not-this-one"},
    {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
]


async def invalid(client, rng):
    kind = rng.randrange(len(INVALID) + 3)
    if kind < len(INVALID):
        r = await client.post("/v1/chat/completions", json=INVALID[kind])
    elif kind == len(INVALID):
        r = await client.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
                              headers={"content-type": "application/json"})
    elif kind == len(INVALID) + 1:
        r = await client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    else:
        r = await client.post("/v1/completions", json={"prompt": "x" * (300 << 10)})  # past --max-body-bytes
    assert 400 <= r.status_code < 500, r.text
    return r.status_code


async def soak(base: str) -> collections.Counter:
    outcomes = collections.Counter()
    deadline = time.monotonic() + SECONDS
    kinds = [good_chat, good_stream, abandoned, invalid]

    async def client_loop(number):
        rng = random.Random(number)
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            while time.monotonic() < deadline:
                kind = rng.choice(kinds)
                status = await kind(client, rng)
                assert status in (200, "abandoned", 429) or kind is invalid, (kind.__name__, status)
                outcomes[(kind.__name__, status)] += 1
                if status == 429:
                    await asyncio.sleep(1)  # as Retry-After says

    await asyncio.gather(*(client_loop(i) for i in range(CLIENTS)))
    return outcomes


def test_soak_ends_clean(tiny_model):
    llm = LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=256, max_num_seqs=8, warmup=False)
    limits = RequestLimits(max_body_bytes=256 << 10, max_waiting_requests=8)
    with live_server(llm, "tiny", limits=limits) as (base, state):
        asyncio.run(soak_warmup(base))
        before = rss_mib()
        started = time.monotonic()
        outcomes = asyncio.run(soak(base))
        minutes = (time.monotonic() - started) / 60
        engine = state.router.default.llm.engine
        deadline = time.monotonic() + 30
        while engine.has_unfinished_requests() or state.pipeline.in_flight:
            assert time.monotonic() < deadline, "requests still held after the soak"
            time.sleep(0.05)
        assert not engine.scheduler.running and not engine.scheduler.waiting
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 3}).status_code == 200
        after = rss_mib()
        total = sum(outcomes.values())
        print(f"\nsoak: {total} requests in {minutes:.1f} min, {CLIENTS} clients; "
              + ", ".join(f"{kind} {status}: {count}" for (kind, status), count in sorted(outcomes.items(), key=str))
              + f"; RSS {before:.0f} MiB before, {after:.0f} MiB after")
        assert outcomes[("good_chat", 200)] and outcomes[("good_stream", 200)] and outcomes[("abandoned", "abandoned")]


async def soak_warmup(base):
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        rng = random.Random(0)
        for kind in (good_chat, good_stream, abandoned, invalid):
            await kind(client, rng)

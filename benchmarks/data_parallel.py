"""Data-parallel serving on this host: prefix-aware against round-robin routing, 1 against 2 replicas,
and what the replica path (a local process, a Ray actor) costs against direct serving.

    python benchmarks/data_parallel.py [--model FOLDER] [--part routing|throughput|overhead|all]

Every configuration is a real `levante serve` on a loopback port (the cores split between the
replicas: --threads = cores / replicas), measured in the same run.
  routing:    C conversations of T turns; each turn appends to its conversation, so every prompt
              shares the prefix of the turns before. Prefix-cache hit rate (cached / prompt tokens,
              from /metrics) and time to first token, for 1 replica, 2 prefix-aware, 2 round-robin.
  throughput: R requests arriving at a fixed rate (Poisson): aggregate tokens/s and p50/p99 TTFT,
              1 replica against 2 (the scaling factor).
  overhead:   one request at a time: mean latency of direct serving, 1 local-process replica and
              1 Ray actor (the replica path's cost per request).
Without --model a random Llama of ~25M parameters (float32) is built in a temporary folder.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _random_model(folder: Path) -> Path:
    import torch
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=384, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                            architectures=["LlamaForCausalLM"], bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import _tokenizer

    _tokenizer(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, replicas: int, backend: str | None = None, routing: str = "prefix"):
        cores = os.cpu_count() or 1
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        flags = ["--data-parallel-size", str(replicas), "--data-parallel-routing", routing,
                 "--threads", str(max(1, cores // replicas))]
        if backend:
            flags += ["--distributed-executor-backend", backend]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "levante", "serve", "-m", model, "--dtype", "float32", "--port", str(self.port),
             "--served-model-name", "m", "--no-webui", "--max-num-seqs", "16", "--kv-cache-gb", "0.5", *flags],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"levante serve {' '.join(flags)} did not start")
            time.sleep(0.5)

    def hit_rate(self) -> float | None:
        from prometheus_client.parser import text_string_to_metric_families

        totals = {"levante_replica_cached_tokens_total": 0.0, "levante_replica_prompt_tokens_total": 0.0}
        for family in text_string_to_metric_families(httpx.get(f"{self.base}/metrics").text):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
        prompt = totals["levante_replica_prompt_tokens_total"]
        return totals["levante_replica_cached_tokens_total"] / prompt if prompt else None

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


async def _request(client: httpx.AsyncClient, base: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """(time to first token, tokens) of one streamed completion."""
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    started, first, tokens = time.monotonic(), None, 0
    async with client.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.monotonic() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first or 0.0, tokens


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 380) for _ in range(n)]


async def _conversations(base: str, conversations: int, turns: int, prefix: int, turn_tokens: int) -> list[float]:
    """Conversations in parallel, each turn after the last: every prompt extends its conversation's."""
    async def one(index: int) -> list[float]:
        rng = random.Random(index)
        prompt, ttfts = _ids(rng, prefix), []
        async with httpx.AsyncClient() as client:
            for _ in range(turns):
                prompt = prompt + _ids(rng, turn_tokens)
                ttft, _ = await _request(client, base, prompt, 4)
                ttfts.append(ttft)
        return ttfts

    results = await asyncio.gather(*(one(i) for i in range(conversations)))
    return [t for ttfts in results for t in ttfts]


async def _arrivals(base: str, requests: int, rate: float, prompt_len: int, max_tokens: int):
    rng = random.Random(7)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=requests)) as client:
        tasks, started = [], time.monotonic()
        for i in range(requests):
            tasks.append(asyncio.create_task(_request(client, base, _ids(random.Random(1000 + i), prompt_len),
                                                      max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        seconds = time.monotonic() - started
    ttfts = sorted(r[0] for r in results)
    return sum(r[1] for r in results) / seconds, ttfts[len(ttfts) // 2], ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))]


def routing(model: str, args) -> None:
    print(f"routing: {args.conversations} conversations x {args.turns} turns, {args.prefix}-token start, "
          f"+{args.turn_tokens} tokens a turn")
    rows = []
    for label, replicas, policy in (("1 replica", 1, "prefix"), ("2 prefix-aware", 2, "prefix"),
                                    ("2 round-robin", 2, "round-robin")):
        server = Server(model, replicas, "mp", policy)
        try:
            ttfts = asyncio.run(_conversations(server.base, args.conversations, args.turns, args.prefix,
                                               args.turn_tokens))
            rows.append((label, server.hit_rate(), statistics.median(ttfts)))
        finally:
            server.close()
    base_ttft = rows[0][2]
    for label, hit, ttft in rows:
        print(f"  {label:16s} hit rate {hit:6.1%}   TTFT p50 {ttft * 1000:7.1f} ms  ({ttft / base_ttft:.2f}x 1 replica)")


def throughput(model: str, args) -> None:
    print(f"throughput: {args.requests} requests at {args.rate}/s, {args.prompt_len}-token prompts, "
          f"{args.max_tokens} tokens each")
    rows = []
    for replicas in (1, 2):
        server = Server(model, replicas, "mp")
        try:
            rows.append((replicas, *asyncio.run(_arrivals(server.base, args.requests, args.rate, args.prompt_len,
                                                          args.max_tokens))))
        finally:
            server.close()
    for replicas, tps, p50, p99 in rows:
        print(f"  {replicas} replica(s): {tps:7.1f} tokens/s  TTFT p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms")
    print(f"  scaling factor (2 vs 1 replica): {rows[1][1] / rows[0][1]:.2f}x tokens/s")


def overhead(model: str, args) -> None:
    print(f"overhead: {args.sequential} requests one at a time, {args.prompt_len}-token prompts, 8 tokens each")
    rows = []
    for label, backend in (("direct", None), ("1 local-process replica", "mp"), ("1 Ray actor", "ray")):
        server = Server(model, 1, backend)
        try:
            async def run():
                async with httpx.AsyncClient() as client:
                    times = []
                    for i in range(args.sequential + 2):
                        started = time.monotonic()
                        await _request(client, server.base, _ids(random.Random(i), args.prompt_len), 8)
                        times.append(time.monotonic() - started)
                    return times[2:]  # the first two warm the path
            rows.append((label, statistics.mean(asyncio.run(run()))))
        finally:
            server.close()
    direct = rows[0][1]
    for label, seconds in rows:
        print(f"  {label:24s} {seconds * 1000:7.1f} ms/request  ({(seconds - direct) * 1000:+6.1f} ms against direct)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--part", default="all", choices=["routing", "throughput", "overhead", "all"])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--turn-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(_random_model(Path(tmp) / "llama-25m"))
        for part, run in (("routing", routing), ("throughput", throughput), ("overhead", overhead)):
            if args.part in (part, "all"):
                run(model, args)


if __name__ == "__main__":
    main()

"""`levante serve` beside llama-cpp-python's server on the same GGUF, same threads, same load.

    python benchmarks/serve_vs_llamacpp.py [--model ALIAS_OR_GGUF] [--threads 2] [--clients 16]
                                           [--tokens 128] [--runs 3] [--startup-only]

Each run starts each server in turn (never both at once: they would share the cores) and
measures process start -> ready (levante: /health 200; llama.cpp: /v1/models 200), in wall time
and in the CPU time the server process spent until then (less sensitive to other load on the
machine). Then it sends `--clients` concurrent streaming /v1/completions requests of `--tokens`
tokens each (temperature 0, end-of-text banned through logit_bias, so every request runs to the
end) and stops the server; `--startup-only` stops it once ready. Prints, per engine, min / median /
max over the runs of: ready time and CPU, aggregate generated tokens/s (all clients' tokens over
the wall time of the whole load), mean time to first token, and the server's peak RSS; then
levante's ratio on the medians.

The peer needs `pip install 'llama-cpp-python[server]'` (sse-starlette, starlette-context,
pydantic-settings); `make bench-deps` installs them. Start levante once first (or pass
--prepare) so the cold start measures a prepared model, as a user sees it from the second start on.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil


def wait_ready(url: str, process: subprocess.Popen, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return time.perf_counter()
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout} s")


class PeakRSS(threading.Thread):
    """Polls the resident set of a process and its children."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process, self.peak, self.done = psutil.Process(pid), 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            self.done.wait(0.1)


async def one_client(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, float | None]:
    """Generated tokens (the usage the server reports, else one per streamed chunk) and time to first."""
    chunks, reported, first, start = 0, None, None, time.perf_counter()
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                reported = chunk["usage"].get("completion_tokens", reported)
            if chunk.get("choices"):
                chunks += 1
                first = first or time.perf_counter() - start
    return (reported if reported is not None else chunks), first


async def load(base: str, model: str, clients: int, tokens: int, ban: dict[str, float], extra: dict):
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=clients)) as c:
        bodies = [{"model": model, "prompt": f"# Task {i}: write a Python function that parses a CSV file\n",
                   "max_tokens": tokens, "temperature": 0, "stream": True, "logit_bias": ban, **extra}
                  for i in range(clients)]
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(c, f"{base}/v1/completions", b) for b in bodies))
        wall = time.perf_counter() - start
    generated = sum(r[0] for r in results)
    firsts = [r[1] for r in results if r[1] is not None]
    return generated / wall, statistics.mean(firsts) if firsts else float("nan"), generated


def run_server(engine: str, path: Path, threads: int, port: int, args) -> dict:
    env = dict(os.environ)
    if engine == "levante":
        command = [sys.executable, "-m", "levante", "serve", "-m", str(path), "--threads", str(threads),
                   "--port", str(port), "--max-num-seqs", str(max(args.clients, 16))]
        ready_url, extra = f"http://127.0.0.1:{port}/health", {"ignore_eos": True,
                                                                 "stream_options": {"include_usage": True}}
    else:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--n_threads", str(threads),
                   "--n_threads_batch", str(threads), "--n_ctx", "4096", "--port", str(port),
                   "--interrupt_requests", "False"]  # its default drops a stream when the next request comes
        ready_url, extra = f"http://127.0.0.1:{port}/v1/models", {}
    log = open(Path(args.log_dir) / f"{engine}-server.log", "w")  # a pipe left unread would block the server
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rss = PeakRSS(process.pid)
    rss.start()
    try:
        ready = wait_ready(ready_url, process, args.ready_timeout) - start
        times = psutil.Process(process.pid).cpu_times()
        ready_cpu = times.user + times.system  # less sensitive than ready_s to what else loads the machine
        if args.startup_only:
            return {"ready_s": ready, "ready_cpu_s": ready_cpu}
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["data"]
        tok_s, ttft, generated = asyncio.run(load(f"http://127.0.0.1:{port}", models[0]["id"], args.clients,
                                                  args.tokens, args.ban, extra))
    finally:
        rss.done.set()
        rss.join()
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
    expected = args.clients * args.tokens
    if generated < expected:
        print(f"  note: {engine} generated {generated} of {expected} tokens", file=sys.stderr)
    return {"ready_s": ready, "ready_cpu_s": ready_cpu, "agg_tok_s": tok_s, "ttft_s": ttft,
            "peak_rss_mib": rss.peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder:0.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--engines", default="llama.cpp,levante")
    parser.add_argument("--log-dir", default=".", help="where the servers' logs go")
    parser.add_argument("--prepare", action="store_true", help="load levante once first (prepared weights)")
    parser.add_argument("--startup-only", action="store_true", help="measure process start -> ready only")
    args = parser.parse_args()

    from levante.loader.auto import resolve_path
    from levante.loader.tokenizer import Tokenizer

    _, path = resolve_path(args.model)
    eos = Tokenizer.from_gguf_metadata(path).eos_token_ids
    args.ban = {str(t): -100.0 for t in sorted(eos)}
    if args.prepare:
        from levante import LLM

        LLM(str(path), num_threads=args.threads, warmup=False)
    engines = args.engines.split(",")
    results = {engine: [] for engine in engines}
    for run in range(args.runs):
        for engine in engines:
            result = run_server(engine, path, args.threads, args.port, args)
            results[engine].append(result)
            print(f"run {run + 1} {engine:10} " + "  ".join(f"{k} {v:.2f}" for k, v in result.items()), flush=True)
    workload = "start-up only" if args.startup_only else f"{args.clients} concurrent streams x {args.tokens} tokens"
    print(f"\nmodel {path.name}, {args.threads} threads, {workload}, {args.runs} runs")
    print(f"{'metric':14}{'engine':12}{'min':>10}{'median':>10}{'max':>10}")
    lower_better = {"ready_s", "ready_cpu_s", "ttft_s", "peak_rss_mib"}
    metrics = ["ready_s", "ready_cpu_s"] + ([] if args.startup_only else ["agg_tok_s", "ttft_s", "peak_rss_mib"])
    for metric in metrics:
        for engine in engines:
            v = [r[metric] for r in results[engine]]
            print(f"{metric:14}{engine:12}{min(v):10.2f}{statistics.median(v):10.2f}{max(v):10.2f}")
        if len(engines) == 2:
            a, b = (statistics.median(r[metric] for r in results[e]) for e in engines)
            print(f"{metric:14}{'ratio':12}{b / a:10.2f}x  ({engines[1]} / {engines[0]}, "
                  f"{'lower' if metric in lower_better else 'higher'} is better)")


if __name__ == "__main__":
    main()

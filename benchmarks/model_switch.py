"""What switching between two models costs one `levante serve`, with and without both kept loaded.

    python benchmarks/model_switch.py                      # smollm2:135m and qwen2.5-coder:0.5b
    python benchmarks/model_switch.py --models A B --rounds 5 --threads 2

Two servers in turn, each `levante serve -m A -m B` on a loopback port: one keeps both models loaded
(no limit), the other runs with `--max-loaded-models 1`, so that every request to the other model
unloads the one loaded and loads its own. Each round sends A, A, B, B, A, A, B, B (max_tokens 8,
greedy) and times every request end to end; reported per server: the median time of the first
request after a switch and of the second (no switch), with the ratio of the two. The
models' load times (the server's `levante_model_load_seconds`) are printed beside.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(models: list[str], threads: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "levante", "serve", "--port", str(port), "--api-key", KEY,
            "--threads", str(threads), "--kv-cache-gb", "0.25", *extra]
    for model in models:
        argv += ["-m", model]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"levante serve exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("levante serve did not become ready")


def request(base: str, model: str) -> float:
    started = time.perf_counter()
    answer = httpx.post(f"{base}/v1/completions", timeout=600, headers={"authorization": f"Bearer {KEY}"},
                        json={"model": model, "prompt": "def fib(n):", "max_tokens": 8, "temperature": 0})
    answer.raise_for_status()
    return time.perf_counter() - started


def load_seconds(base: str) -> dict[str, str]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    sums, counts = {}, {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "levante_model_load_seconds_sum":
                sums[sample.labels["model_name"]] = sample.value
            elif sample.name == "levante_model_load_seconds_count":
                counts[sample.labels["model_name"]] = sample.value
    return {name: f"{sums[name] / counts[name]:.2f} s x{counts[name]:.0f}" for name in sums if counts.get(name)}


def measure(models: list[str], threads: int, rounds: int, extra: list[str]) -> tuple[list[float], list[float], dict]:
    process, base = start(models, threads, extra)
    try:
        for model in models:  # both loaded once (the limited server then holds the last), first requests done
            request(base, model)
        same, switched = [], []
        for _ in range(rounds):
            for model in [*models, *models]:  # each request names the other model than the one before
                switched.append(request(base, model))
                same.append(request(base, model))  # the same model again: no switch
        return same, switched, load_seconds(base)
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs=2, default=["smollm2:135m", "qwen2.5-coder:0.5b"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"models {args.models[0]} and {args.models[1]}, {args.threads} threads, {args.rounds} rounds; "
          f"load average {os.getloadavg()[0]:.2f}")
    for label, extra in [("both loaded", []), ("--max-loaded-models 1", ["--max-loaded-models", "1"])]:
        same, switched, loads = measure(args.models, args.threads, args.rounds, extra)
        print(f"{label:22} same model: median {statistics.median(same) * 1000:7.0f} ms   after a switch: median "
              f"{statistics.median(switched) * 1000:7.0f} ms (x{statistics.median(switched) / statistics.median(same):.1f})"
              f"   loads: {loads}")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What sleeping saves and what waking costs, against a cold start, on one `levante serve`.

    python benchmarks/sleep_wake.py                       # the default model (qwen2.5-coder:0.5b, Q4_K_M)
    python benchmarks/sleep_wake.py -m smollm2:135m --rounds 3 --threads 2

A server starts on a loopback port (`--api-key`, so that /sleep answers); per round:
  cold   the process started, to /health 200, to the first answer (greedy, max_tokens 8)
  level  POST /sleep?level=L, the server's resident set (VmRSS) asleep, then one request: its time and
         the server's own wake time (levante_model_wake_seconds), then a request awake for comparison
for L = 1 and 2. Medians over the rounds; the wake times are printed as a fraction of the cold start.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from model_switch import KEY, free_port  # noqa: E402

AUTH = {"authorization": f"Bearer {KEY}"}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ask(base: str, model: str) -> float:
    started = time.monotonic()
    reply = httpx.post(f"{base}/v1/completions", headers=AUTH, timeout=600,
                       json={"model": model, "prompt": "def fib(n):", "max_tokens": 8, "temperature": 0})
    reply.raise_for_status()
    return time.monotonic() - started


def wake_seconds(base: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", headers=AUTH).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "levante_model_wake_seconds_sum":
                return sample.value
    return 0.0


def one_round(model: str, threads: int) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "levante", "serve", "-m", model, "--port", str(port),
                                "--api-key", KEY, "--threads", str(threads), "--kv-cache-gb", "0.5", "--no-webui"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"levante serve exited: {process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        ready = time.monotonic() - started
        ask(base, model)
        result = {"ready": ready, "cold": time.monotonic() - started, "rss_awake": rss_mib(process.pid),
                  "request_awake": ask(base, model)}
        woken_before = 0.0
        for level in (1, 2):
            httpx.post(f"{base}/sleep", params={"level": level}, headers=AUTH, timeout=600).raise_for_status()
            time.sleep(0.5)
            result[f"rss_level{level}"] = rss_mib(process.pid)
            result[f"request_level{level}"] = ask(base, model)
            woken = wake_seconds(base)
            result[f"wake_level{level}"], woken_before = woken - woken_before, woken
        return result
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default="qwen2.5-coder:0.5b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rounds = [one_round(args.model, args.threads) for _ in range(args.rounds)]
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(f"{args.model}, {args.rounds} rounds, {args.threads} threads (medians)")
    print(f"  cold start: /health 200 after {median['ready']:.2f} s, first answer after {median['cold']:.2f} s; "
          f"RSS {median['rss_awake']:.0f} MiB; a request awake {median['request_awake']:.2f} s")
    for level in (1, 2):
        print(f"  sleep level {level}: RSS {median[f'rss_level{level}']:.0f} MiB; the request that wakes it "
              f"{median[f'request_level{level}']:.2f} s (wake {median[f'wake_level{level}']:.2f} s, "
              f"{median[f'wake_level{level}'] / median['cold']:.2f}x the cold start)")


if __name__ == "__main__":
    main()

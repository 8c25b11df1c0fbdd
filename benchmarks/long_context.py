"""Decode speed as the context grows: levante beside llama.cpp (llama-cpp-python), same GGUF,
same threads, same process, same run.

    python benchmarks/long_context.py [--model ALIAS_OR_GGUF] [--threads 2] [--runs 3]
                                      [--lengths 512,2048,4096,8192,16384] [--gen-tokens 64]
                                      [--engines levante,llama.cpp] [--clock wall|cpu]

For each context length, each engine gets a fresh prompt of that many tokens (the first token
differs per run and length, so neither prefix cache serves it), then decodes `--gen-tokens`
greedy tokens, timed from the first streamed token to the last (prefill excluded). Runs and
engines are interleaved (run 1: levante 512, llama.cpp 512, levante 2k, ...) so that load
from other jobs on a shared machine falls on both. Prints min / median / max per length and
engine, each levante engine's ratio to llama.cpp on the medians, and its own ratio of 4k to 512.

Engines: `levante` (the default CPU attention: the native paged kernel where it runs),
`levante-sdpa` (the SDPA path, LEVANTE_PAGED_ATTENTION=0: the attention before the kernel),
`levante-modules` (each decode token through the model's modules, not the one-call native step of
layers/decode_step.py: the step before it), `levante-kv8` (the 8-bit KV cache,
--kv-cache-dtype int8), `llama.cpp`. `--clock cpu` counts the process's CPU
time instead of wall time: with `--threads 1` (no thread waits spinning for another) it measures
the work per token whatever else loads the machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

CLOCK = time.perf_counter


def prompt(length: int, salt: int) -> list[int]:
    """A token-id prompt of `length` tokens whose first token is unique to `salt`."""
    return [1000 + salt] + [(i * 7919 + salt * 31) % 20000 + 100 for i in range(1, length)]


class Levante:
    name = "levante"
    paged = None  # LEVANTE_PAGED_ATTENTION while the engine is built (None: the default)
    kv_cache_dtype = "auto"

    def __init__(self, path: str, threads: int, max_len: int):
        from levante import LLM, SamplingParams
        from levante.engine.runner import PAGED_ENV

        saved = os.environ.pop(PAGED_ENV, None)
        if self.paged is not None:
            os.environ[PAGED_ENV] = self.paged
        try:
            self.llm = LLM(path, num_threads=threads, max_model_len=max_len, warmup=True,
                           kv_cache_dtype=self.kv_cache_dtype)
        finally:
            os.environ.pop(PAGED_ENV, None)
            if saved is not None:
                os.environ[PAGED_ENV] = saved
        self.params = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def decode(self, ids: list[int], tokens: int) -> float:
        stamps = [CLOCK() for _ in self.llm.stream(ids, self.params(tokens))]
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])


class LevanteSdpa(Levante):
    name = "levante-sdpa"
    paged = "0"


class LevanteKv8(Levante):
    name = "levante-kv8"
    kv_cache_dtype = "int8"


class LevanteModules(Levante):
    """levante with each decode token run through the model's modules (one kernel call per op), not
    the one-call native step (layers/decode_step.py): the step before it, in the same run."""
    name = "levante-modules"

    def decode(self, ids: list[int], tokens: int) -> float:
        from levante.layers import decode_step

        decode_step.enabled = False
        try:
            return super().decode(ids, tokens)
        finally:
            decode_step.enabled = True


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path: str, threads: int, max_len: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=max_len,
                         n_batch=512, verbose=False)

    def decode(self, ids: list[int], tokens: int) -> float:
        self.llm.reset()
        stamps = []
        for _token in self.llm.generate(ids, temp=0.0, reset=True):
            stamps.append(CLOCK())
            if len(stamps) == tokens:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder:0.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lengths", default="512,2048,4096,8192,16384")
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--engines", default="levante,llama.cpp")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    import torch

    from levante.loader.auto import resolve_path

    torch.set_num_threads(args.threads)
    _, path = resolve_path(args.model)
    lengths = [int(n) for n in args.lengths.split(",")]
    max_len = max(lengths) + args.gen_tokens + 16
    kinds = {"levante": Levante, "levante-sdpa": LevanteSdpa, "levante-modules": LevanteModules,
             "levante-kv8": LevanteKv8, "llama.cpp": LlamaCpp}
    engines = [kinds[name](str(path), args.threads, max_len) for name in args.engines.split(",")]
    results = {(e.name, n): [] for e in engines for n in lengths}
    for run in range(args.runs):
        for n in lengths:
            for e in engines:
                tok_s = e.decode(prompt(n, run * 97 + n % 89), args.gen_tokens)
                results[e.name, n].append(tok_s)
                print(f"run {run + 1} {n:6d} tokens  {e.name:10} {tok_s:7.2f} tok/s", flush=True)
    print(f"\nmodel {path.name}, {args.threads} threads, {args.runs} runs, {args.gen_tokens} decoded tokens "
          f"(tok/s from the first streamed token to the last, {args.clock} clock)")
    names = [e.name for e in engines]
    peer = "llama.cpp" if "llama.cpp" in names else None
    ours = [name for name in names if name != peer]
    median = {key: statistics.median(v) for key, v in results.items()}
    header = f"{'context':>8} " + "".join(f"{name + ' median (min-max)':>32}" for name in names)
    print(header + ("".join(f"{name + ' / llama.cpp':>26}" for name in ours) if peer else ""))
    for n in lengths:
        line = f"{n:8d} " + "".join(
            f"{f'{median[name, n]:.2f} ({min(results[name, n]):.2f}-{max(results[name, n]):.2f})':>32}" for name in names)
        if peer:
            line += "".join(f"{median[name, n] / median[peer, n]:25.2f}x" for name in ours)
        print(line)
    for name in names:
        if (name, 512) in median and (name, 4096) in median:
            print(f"{name}: 4k / 512 decode speed {median[name, 4096] / median[name, 512]:.0%}")


if __name__ == "__main__":
    main()

"""Decode speed as the context grows: levante beside llama.cpp (llama-cpp-python), same GGUF,
same threads, same process, same run.

    python benchmarks/long_context.py [--model ALIAS_OR_GGUF] [--threads 2] [--runs 3]
                                      [--lengths 512,2048,4096,8192,16384] [--gen-tokens 64]

For each context length, each engine gets a fresh prompt of that many tokens (the first token
differs per run and length, so neither prefix cache serves it), then decodes `--gen-tokens`
greedy tokens, timed from the first streamed token to the last (prefill excluded). Runs and
engines are interleaved (run 1: levante 512, llama.cpp 512, levante 2k, ...) so that load
from other jobs on a shared machine falls on both. Prints min / median / max per length and
engine, levante's ratio to llama.cpp on the medians, and levante's own ratio of 4k to 512.
"""
from __future__ import annotations

import argparse
import statistics
import time


def prompt(length: int, salt: int) -> list[int]:
    """A token-id prompt of `length` tokens whose first token is unique to `salt`."""
    return [1000 + salt] + [(i * 7919 + salt * 31) % 20000 + 100 for i in range(1, length)]


class Levante:
    name = "levante"

    def __init__(self, path: str, threads: int, max_len: int):
        from levante import LLM, SamplingParams

        self.llm = LLM(path, num_threads=threads, max_model_len=max_len, warmup=True)
        self.params = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def decode(self, ids: list[int], tokens: int) -> float:
        stamps = [time.perf_counter() for _ in self.llm.stream(ids, self.params(tokens))]
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])


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
            stamps.append(time.perf_counter())
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
    args = parser.parse_args()

    import torch

    from levante.loader.auto import resolve_path

    torch.set_num_threads(args.threads)
    _, path = resolve_path(args.model)
    lengths = [int(n) for n in args.lengths.split(",")]
    max_len = max(lengths) + args.gen_tokens + 16
    kinds = {"levante": Levante, "llama.cpp": LlamaCpp}
    engines = [kinds[name](str(path), args.threads, max_len) for name in args.engines.split(",")]
    results = {(e.name, n): [] for e in engines for n in lengths}
    for run in range(args.runs):
        for n in lengths:
            for e in engines:
                tok_s = e.decode(prompt(n, run * 97 + n % 89), args.gen_tokens)
                results[e.name, n].append(tok_s)
                print(f"run {run + 1} {n:6d} tokens  {e.name:10} {tok_s:7.2f} tok/s", flush=True)
    print(f"\nmodel {path.name}, {args.threads} threads, {args.runs} runs, {args.gen_tokens} decoded tokens "
          "(tok/s from the first streamed token to the last)")
    names = [e.name for e in engines]
    print(f"{'context':>8} " + "".join(f"{name + ' median (min-max)':>30}" for name in names)
          + ("   ratio" if len(names) == 2 else ""))
    for n in lengths:
        cells = []
        for name in names:
            v = results[name, n]
            cells.append(f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})")
        line = f"{n:8d} " + "".join(f"{c:>30}" for c in cells)
        if len(names) == 2:
            line += f"   {statistics.median(results[names[0], n]) / statistics.median(results[names[1], n]):.2f}x"
        print(line)
    for name in names:
        if (name, 512) in results and (name, 4096) in results:
            ratio = statistics.median(results[name, 4096]) / statistics.median(results[name, 512])
            print(f"{name}: 4k / 512 decode speed {ratio:.0%}")


if __name__ == "__main__":
    main()

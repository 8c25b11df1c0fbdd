"""levante beside llama.cpp (llama-cpp-python) on the same GGUF, same threads, same run.

    python benchmarks/decode_vs_llamacpp.py [--model ALIAS_OR_GGUF] [--threads 2] [--runs 3]

Prints load time, prefill tokens/s (a 512-token prompt) and single-stream decode
tokens/s for both, min / median / max over the runs, and levante's ratio to
llama.cpp on the medians. The machine is shared and noisy: compare ratios, not
absolute figures from different runs.
"""
from __future__ import annotations

import argparse
import statistics
import time


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_levante(path: str, threads: int, prompt_ids: list[int], gen_tokens: int, runs: int) -> dict:
    import torch

    from levante import LLM, SamplingParams

    torch.set_num_threads(threads)
    load, llm = timed(lambda: LLM(path, num_threads=threads, warmup=True))
    prefill, decode = [], []
    for i in range(runs):
        # A fresh prompt each run (first token differs) so the prefix cache cannot serve it.
        ids = [prompt_ids[0] + i + 1] + prompt_ids[1:]
        seconds, _ = timed(lambda: llm.generate([ids], SamplingParams(temperature=0, max_tokens=1)))
        prefill.append(len(ids) / seconds)
        params = SamplingParams(temperature=0, max_tokens=gen_tokens, ignore_eos=True)
        stamps = [time.perf_counter() for _ in llm.stream([ids[0] + 7, 11, 12, 13], params)]
        decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"load_s": [load], "prefill_tok_s": prefill, "decode_tok_s": decode}


def bench_llamacpp(path: str, threads: int, prompt_ids: list[int], gen_tokens: int, runs: int) -> dict:
    from llama_cpp import Llama

    load, llm = timed(lambda: Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                                    n_ctx=2048, n_batch=512, verbose=False))
    prefill, decode = [], []
    for i in range(runs):
        ids = [prompt_ids[0] + i + 1] + prompt_ids[1:]
        llm.reset()
        seconds, _ = timed(lambda: llm.eval(ids))
        prefill.append(len(ids) / seconds)
        llm.reset()
        stamps = []
        for _token in llm.generate([ids[0] + 7, 11, 12, 13], temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == gen_tokens:
                break
        decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"load_s": [load], "prefill_tok_s": prefill, "decode_tok_s": decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder:0.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    args = parser.parse_args()

    from levante.loader.auto import resolve_path

    _, path = resolve_path(args.model)
    prompt_ids = [(i * 7919) % 20000 + 100 for i in range(args.prompt_tokens)]
    results = {
        "llama.cpp": bench_llamacpp(str(path), args.threads, prompt_ids, args.gen_tokens, args.runs),
        "levante": bench_levante(str(path), args.threads, prompt_ids, args.gen_tokens, args.runs),
    }
    print(f"model {path.name}, {args.threads} threads, {args.runs} runs, "
          f"prefill {args.prompt_tokens} tokens, decode {args.gen_tokens} tokens")
    print(f"{'metric':16}{'engine':12}{'min':>10}{'median':>10}{'max':>10}")
    for metric in ["load_s", "prefill_tok_s", "decode_tok_s"]:
        for engine, values in results.items():
            v = values[metric]
            print(f"{metric:16}{engine:12}{min(v):10.2f}{statistics.median(v):10.2f}{max(v):10.2f}")
        ratio = statistics.median(results["levante"][metric]) / statistics.median(results["llama.cpp"][metric])
        better = "lower is better" if metric == "load_s" else "higher is better"
        print(f"{metric:16}{'ratio':12}{ratio:10.2f}x  (levante / llama.cpp, {better})")


if __name__ == "__main__":
    main()

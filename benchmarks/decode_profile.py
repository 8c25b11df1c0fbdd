"""Where a decode step's CPU time goes at a long context: torch.profiler's top entries by self CPU time.

    python benchmarks/decode_profile.py [--context 4096] [--steps 16] [--threads 1] [--top 15]
                                        [--kv-cache-dtype auto] [--paged 0|1]

A fresh prompt of `--context` tokens is prefilled (not profiled), then `--steps` greedy decode steps
run under the profiler (the engine steps in this thread). `--paged 0` is the SDPA path
(LEVANTE_PAGED_ATTENTION=0: the attention before the native kernel). The ctypes calls into the
native kernels show as the Python-side ops around them; the rest of a step that is not an aten op
is Python (the profile's total minus the ops').
"""
from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder:0.5b")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--paged", choices=["0", "1"], default=None)
    parser.add_argument("--shapes", action="store_true", help="group the entries by their input shapes")
    args = parser.parse_args()
    if args.paged is not None:
        os.environ["LEVANTE_PAGED_ATTENTION"] = args.paged

    import torch
    from torch.profiler import ProfilerActivity, profile

    from levante import LLM, SamplingParams

    llm = LLM(args.model, num_threads=args.threads, max_model_len=args.context + args.steps + 16,
              kv_cache_dtype=args.kv_cache_dtype, warmup=False)
    prompt = [1000] + [(i * 7919) % 20000 + 100 for i in range(1, args.context)]
    stream = llm.stream(prompt, SamplingParams(temperature=0, max_tokens=args.steps + 1, ignore_eos=True))
    next(stream)  # the prefill and the first token
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        started = time.process_time()
        for _ in stream:
            pass
        cpu = time.process_time() - started
    path = "native kernel" if llm.engine.runner.paged else "SDPA"
    print(f"{args.context} tokens of context, {args.steps} decode steps, {args.threads} thread(s), {path}, "
          f"KV {llm.engine.runner.kv_cache[0][0].dtype}: {cpu / args.steps * 1e3:.1f} ms CPU a step")
    table = prof.key_averages(group_by_input_shape=args.shapes).table(
        sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40, max_shapes_column_width=60)
    print(table)


if __name__ == "__main__":
    main()

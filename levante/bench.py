"""`levante bench`: load time, prefill and decode speed of one model on this machine.

For a side-by-side comparison with llama.cpp see benchmarks/decode_vs_llamacpp.py.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time


def run_bench(args) -> int:
    import torch

    from levante import LLM
    from levante.engine.args import EngineArgs
    from levante.engine.engine import weight_bytes
    from levante.engine.sampling_params import SamplingParams
    from levante.kernels import native

    start = time.perf_counter()
    llm = LLM.from_engine_args(EngineArgs.from_cli_args(args, warmup=True, progress=sys.stderr.isatty()))
    load = time.perf_counter() - start
    span = min(20000, llm.engine.model_config.vocab_size - 120)  # ordinary tokens of any vocabulary
    prompt = [(i * 7919) % span + 100 for i in range(args.prompt_tokens)]
    prefill, decode = [], []
    for run in range(args.runs):
        ids = [prompt[0] + run + 1] + prompt[1:]
        start = time.perf_counter()
        llm.generate([ids], SamplingParams(temperature=0, max_tokens=1))
        prefill.append(len(ids) / (time.perf_counter() - start))
        params = SamplingParams(temperature=0, max_tokens=args.gen_tokens, ignore_eos=True)
        stamps = [time.perf_counter() for _ in llm.stream([ids[0] + 7, 11, 12], params)]
        decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    engine = llm.engine
    print(f"model {args.model} ({engine.dtype}, quantization {engine.quantization or 'none'}), load {load:.2f} s, "
          f"weights {weight_bytes(engine.model) / 2**20:.0f} MiB, peak RSS {_peak_rss_mib():.0f} MiB, "
          f"CPU kernels {native.variant()}, {torch.get_num_threads()} threads")
    print(f"weights loaded from {getattr(engine, 'loaded_from', None)}")
    for name, values in [("prefill tok/s", prefill), ("decode tok/s", decode)]:
        print(f"{name:14} min {min(values):8.1f}  median {statistics.median(values):8.1f}  max {max(values):8.1f}")
    return 0


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)

"""Host (Python) time of the engine's decode steps: `Engine.step()` minus the model forward.

    OMP_NUM_THREADS=1 python benchmarks/engine_overhead.py              # 64 and 256 sequences
    OMP_NUM_THREADS=1 python benchmarks/engine_overhead.py --profile    # plus a cProfile of the 256 run
    OMP_NUM_THREADS=1 python benchmarks/engine_overhead.py --num-seqs 1 --temperature 0   # batch-1 decode

A tiny random Qwen3 on the CPU: gpu_throughput.py's TINY shape with its word-level tokenizer
(default), or tests/tiny_models.py's with a byte-level BPE (`--tokenizer bpe`). Every sequence
gets a 32-token prompt of random ids and decodes with temperature 0.6 and ignore_eos
(gpu_throughput.py's sampling; `--temperature 0`: greedy); once all are decoding, `--steps`
steps are timed. The model forward (`model.forward` and `model.compute_logits`, patched on the
instance) is timed separately and subtracted: what is left is what the host adds to every step
on any device, since the engine is synchronous (scheduler, runner.prepare, sampler, token
append, detokenizing, outputs), plus, on the CPU, the sampler's tensor math (a few kernels on
CUDA). `--path padded` runs the CUDA-graph decode path (engine/cuda_graph.py) eagerly.
Reported per step (min and median over the steps) and per sequence.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: which levante is measured


def timed_forward(model):
    """Patch `model`'s forward and compute_logits to add their time to a counter; returns the counter."""
    spent = [0.0]

    def wrap(fn):
        def inner(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return inner

    model.forward = wrap(model.forward)
    model.compute_logits = wrap(model.compute_logits)
    return spent


def measure(model_dir: str, num_seqs: int, steps: int, prompt_len: int, profile: bool,
            temperature: float = 0.6, output_kind: str = "cumulative", freeze_gc: bool = False) -> dict:
    from levante.config import CacheConfig, EngineConfig
    from levante.engine.engine import Engine
    from levante.engine.sampling_params import SamplingParams

    config = EngineConfig(max_num_seqs=num_seqs, max_num_batched_tokens=max(1024, num_seqs * prompt_len),
                          max_model_len=prompt_len + steps + 64, cache=CacheConfig(memory_gb=0.25))
    engine = Engine(model_dir, config)
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    kind = {} if output_kind == "cumulative" else {"output_kind": output_kind}  # main has no such field
    for i in range(num_seqs):
        prompt = [rng.randint(3, vocab - 1) for _ in range(prompt_len)]
        engine.add_request(f"r{i}", prompt,
                           SamplingParams(temperature=temperature, max_tokens=steps + 32, ignore_eos=True, **kind))
    while engine.scheduler.waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
        engine.step()  # prefill
    for _ in range(3):
        engine.step()
    if freeze_gc:  # what a long-running server could do once loaded (vLLM does): full collections skip the heap
        gc.collect()
        gc.freeze()
    spent = timed_forward(engine.runner.model)
    host, total = [], []
    profiler = cProfile.Profile() if profile else None
    for _ in range(steps):
        spent[0] = 0.0
        if profiler:
            profiler.enable()
        start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        if profiler:
            profiler.disable()
        assert len(outputs) == (num_seqs if output_kind == "cumulative" else 0)
        assert len(engine.scheduler.running) == num_seqs
        host.append(elapsed - spent[0])
        total.append(elapsed)
    if freeze_gc:
        gc.unfreeze()
    if profiler:
        pstats.Stats(profiler).sort_stats(os.environ.get("PROFILE_SORT", "tottime")).print_stats(40)
    return {"min": min(host), "median": statistics.median(host), "mean": statistics.mean(host), "max": max(host),
            "step_median": statistics.median(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-seqs", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="cProfile the decode steps of the largest batch")
    parser.add_argument("--path", choices=["sdpa", "paged", "padded"], default="sdpa",
                        help="CPU attention path: sdpa (the CPU default), paged (CUDA's eager path), padded "
                             "(the CUDA-graph decode path run eagerly)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--output-kind", choices=["cumulative", "final_only"], default="cumulative",
                        help="cumulative: an output per running request per step (streaming, Engine's "
                             "default); final_only: what LLM.generate asks for")
    parser.add_argument("--tokenizer", choices=["word", "bpe"], default="word",
                        help="word: gpu_throughput.py's TINY model and word-level tokenizer (the H200 run's "
                             "workload); bpe: tests/tiny_models.py's byte-level BPE, on which random ids often "
                             "end inside a UTF-8 character (detokenizing's worst case)")
    parser.add_argument("--freeze-gc", action="store_true",
                        help="gc.freeze() before the timed steps: Python's full collections (tens of ms each, "
                             "about every 50 steps with cumulative outputs) then skip the objects made so far")
    parser.add_argument("--model-dir", default=None, help="reuse a folder built by an earlier run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.path == "paged":
        os.environ["LEVANTE_PAGED_ATTENTION"] = "1"
    elif args.path == "padded":
        os.environ["LEVANTE_PADDED_DECODE"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir:
            model_dir = args.model_dir
        elif args.tokenizer == "bpe":
            from tests.tiny_models import build
            model_dir = str(build("qwen3", Path(tmp)))
        else:
            from benchmarks.gpu_throughput import TINY, build_model
            model_dir = str(build_model(Path(tmp), TINY, torch.float32))
        for n in args.num_seqs:
            r = measure(model_dir, n, args.steps, args.prompt_len, args.profile and n == max(args.num_seqs),
                        args.temperature, args.output_kind, args.freeze_gc)
            print(f"{n:4d} seqs: host {r['min'] * 1e3:7.3f} ms/step min, {r['median'] * 1e3:7.3f} median "
                  f"({r['median'] / n * 1e6:5.2f} us/seq), mean {r['mean'] * 1e3:.3f}, max {r['max'] * 1e3:.3f}; "
                  f"whole step median {r['step_median'] * 1e3:.3f} ms",
                  flush=True)


if __name__ == "__main__":
    main()

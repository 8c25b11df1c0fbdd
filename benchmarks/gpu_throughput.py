"""Offline throughput with many concurrent sequences, nano-vllm's benchmark setup.

    python benchmarks/gpu_throughput.py                       # CUDA: Qwen3-0.6B shape, 256 seqs, graphs and eager
    python benchmarks/gpu_throughput.py --device cpu --num-seqs 4 --max-len 32   # CPU smoke test (tiny model)

A Qwen3-0.6B-shaped model with random weights (bf16 on CUDA) is built with transformers and
saved to a temporary folder with a word-level tokenizer covering its vocabulary (no download).
`--num-seqs` prompts of uniform random length in [min(100, max_len / 2), max_len] token ids,
each generating a uniform random number of tokens in the same range with ignore_eos
(temperature 0.6, as nano-vllm's bench.py); fixed seed. Reported: generated tokens / wall
time of the run (load, capture and warm-up excluded), and (prompt + generated) / wall time.

Peers: `run_levante(model_dir, prompts, max_tokens, enforce_eager)` returns (generated
tokens, seconds); a peer engine can be added beside it with the same contract.
"""
from __future__ import annotations

import argparse
import os
import sys
import gc
import json
import random
import tempfile
import time
from pathlib import Path

QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_theta=1_000_000.0, tie_word_embeddings=True)


def build_model(folder: Path, shape: dict, dtype) -> Path:
    """A random Qwen3 checkpoint of `shape` plus a word-level tokenizer with one word per id."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.02,
                         architectures=["Qwen3ForCausalLM"])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is much faster there
        model = Qwen3ForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    del model
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, shape["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>").save_pretrained(folder)
    return folder


def workload(num_seqs: int, max_len: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    low = min(100, max(1, max_len // 2))
    prompts = [[rng.randint(3, vocab - 1) for _ in range(rng.randint(low, max_len))] for _ in range(num_seqs)]
    max_tokens = [rng.randint(low, max_len) for _ in range(num_seqs)]
    return prompts, max_tokens


def run_levante(model_dir: str, prompts: list[list[int]], max_tokens: list[int], enforce_eager: bool, *,
                device: str = "cuda", **options) -> tuple[int, float]:
    """Generate every prompt at once (each its own max_tokens, ignore_eos); (generated tokens, seconds)."""
    import torch

    from levante import LLM, SamplingParams

    longest = max(len(p) + m for p, m in zip(prompts, max_tokens))
    llm = LLM(model_dir, device=device, enforce_eager=enforce_eager, max_num_seqs=len(prompts),
              max_model_len=max(longest, options.pop("max_model_len", 0)), **options)
    engine = llm.engine
    graphs = engine.runner.decode_graphs
    print(f"levante ({'eager' if enforce_eager else 'graphs'}): CUDA graphs "
          f"{'captured in %.2f s' % graphs.capture_seconds if graphs and graphs.graphs else 'off'}", flush=True)
    try:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for i, (prompt, m) in enumerate(zip(prompts, max_tokens)):
            engine.add_request(f"bench-{i}", prompt,
                               SamplingParams(temperature=0.6, max_tokens=m, ignore_eos=True, seed=None,
                                              output_kind="final_only"))  # as LLM.generate: only finished ones are read
        generated = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    generated += len(out.outputs[0].token_ids)
        seconds = time.perf_counter() - started
    finally:
        engine.close()
        del engine, llm
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return generated, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=1024, help="longest prompt and longest output (tokens)")
    parser.add_argument("--enforce-eager", action="store_true", help="only the eager run (no CUDA graphs)")
    parser.add_argument("--no-eager", action="store_true", help="only the CUDA-graph run")
    parser.add_argument("--kv-cache-gb", type=float, default=None, help="default: 40 on CUDA, 1 on CPU")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: 16384 CUDA, 1024 CPU")
    parser.add_argument("--tiny", action="store_true", help="a tiny model shape (default on CPU)")
    parser.add_argument("--model-dir", default=None, help="reuse a model folder built by an earlier run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer", choices=["none", "transformers"], default="transformers",
                        help="peer engine on the same workload (CUDA only; vLLM does not fit the GPU machine)")
    parser.add_argument("--peer-cap", type=float, default=60.0,
                        help="seconds the peer may run; its rate is tokens streamed within them")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    cuda = args.device.startswith("cuda")
    shape = TINY if (args.tiny or not cuda) else QWEN3_0_6B
    dtype = torch.bfloat16 if cuda else torch.float32
    # CUDA: the KV cache sized by levante itself (gpu_memory_utilization 0.9, as nano-vllm's bench).
    options = dict(dtype="bfloat16" if cuda else "float32",
                   kv_cache_gb=args.kv_cache_gb or (None if cuda else 1.0),
                   max_num_batched_tokens=args.max_num_batched_tokens or (16384 if cuda else 1024))
    prompts, max_tokens = workload(args.num_seqs, args.max_len, shape["vocab_size"], args.seed)
    if not cuda:
        runs = [("levante cpu", True)] + ([] if args.peer == "none" else [("transformers CB", None)])
    elif args.enforce_eager:
        runs = [("levante eager", True)]
    else:
        runs = [("levante graphs", False)] + ([] if args.peer == "none" else [("transformers CB", None)]) \
            + ([] if args.no_eager else [("levante eager", True)])
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_dir or str(build_model(Path(tmp), shape, dtype))
        prompt_tokens = sum(len(p) for p in prompts)
        results = []
        for name, eager in runs:
            try:
                if eager is None:
                    from transformers_peer import run_transformers

                    generated, seconds, finished = run_transformers(folder, prompts, max_tokens, args.device,
                                                                    cap=args.peer_cap)
                    print(f"{name}: {finished}/{len(prompts)} requests finished within {seconds:.1f} s", flush=True)
                    complete = finished == len(prompts)
                else:
                    generated, seconds = run_levante(folder, prompts, max_tokens, eager, device=args.device,
                                                     **options)
                    complete = True
            except Exception as exc:  # one engine failing must not lose the others' numbers
                print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            results.append({"engine": name, "seqs": len(prompts), "prompt_tokens": prompt_tokens,
                            "generated_tokens": generated, "seconds": round(seconds, 3),
                            "output_tok_s": round(generated / seconds, 1),
                            # a capped peer did not read every prompt: no total rate
                            "total_tok_s": round((generated + prompt_tokens) / seconds, 1) if complete else None})
            print(json.dumps(results[-1]), flush=True)
        print(f"{'engine':<16}{'seqs':>6}{'generated':>11}{'seconds':>9}{'out tok/s':>11}{'total tok/s':>13}")
        for r in results:
            print(f"{r['engine']:<16}{r['seqs']:>6}{r['generated_tokens']:>11}{r['seconds']:>9.2f}"
                  f"{r['output_tok_s']:>11.1f}{r['total_tok_s'] or '-':>13}")
        by_name = {r["engine"]: r["output_tok_s"] for r in results}
        ours = by_name.get("levante graphs") or by_name.get("levante cpu")
        if ours and by_name.get("transformers CB"):
            print(f"levante / transformers CB, generated tok/s: {ours / by_name['transformers CB']:.2f}x")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # the peer's generation thread must not keep the process alive

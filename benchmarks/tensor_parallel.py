"""Tensor parallel 2 against 1 on this host: prefill and decode time of one model.

    python benchmarks/tensor_parallel.py [--model FOLDER] [--runs 3]

Without --model it builds a random Llama of ~200M parameters (float32) in a temporary
folder. TP1 and TP2 engines run interleaved, run by run, so machine noise hits both.
On a CPU host both ranks share the same cores (each rank gets half the threads), so
TP2 cannot be faster than TP1 here: the numbers measure the cost of the split (the
per-layer all-reduces and the step broadcast), not a speed-up.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _random_model(folder: Path) -> Path:
    import torch
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                            num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                            architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import _tokenizer

    _tokenizer(folder)
    return folder


def _measure(llm, prompt_tokens: int, gen_tokens: int, run: int) -> tuple[float, float]:
    from levante import SamplingParams

    prompt = [(i * 7919 + run) % 300 + 3 for i in range(prompt_tokens)]
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    prefill = time.perf_counter() - start
    stamps = [time.perf_counter() for _ in llm.stream([5 + run, 11, 12], SamplingParams(
        temperature=0, max_tokens=gen_tokens, ignore_eos=True))]
    decode = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=32)
    args = parser.parse_args()
    from levante import LLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or str(_random_model(Path(tmp)))
        import torch

        threads = torch.get_num_threads()
        options = dict(dtype="float32", kv_cache_gb=0.25, enable_prefix_caching=False)
        tp1, tp2 = LLM(folder, **options), LLM(folder, **options, tensor_parallel_size=2)
        half = max(1, threads // 2)
        # Threads are per process: TP2's rank 0 has half of them (its worker the other half).
        # TP1 runs with all of them, and with half (what one TP2 rank has).
        setups = {f"TP1, {threads} threads": (tp1, threads), f"TP1, {half} thread(s)": (tp1, half),
                  f"TP2, {half} thread(s) per rank": (tp2, half)}
        results = {label: ([], []) for label in setups}
        for run in range(args.runs):
            for label, (llm, n) in setups.items():
                torch.set_num_threads(n)
                prefill, decode = _measure(llm, args.prompt_tokens, args.gen_tokens, run)
                results[label][0].append(prefill)
                results[label][1].append(decode)
        tp2.close()
    print(f"prefill {args.prompt_tokens} tokens, decode {args.gen_tokens} tokens; median (min) of {args.runs} "
          "interleaved runs")
    for label, (prefill, decode) in results.items():
        print(f"{label:28} prefill {statistics.median(prefill) * 1000:7.0f} ms ({min(prefill) * 1000:5.0f})   "
              f"decode {statistics.median(decode) * 1000:6.1f} ms/token ({min(decode) * 1000:5.1f})")


if __name__ == "__main__":
    main()

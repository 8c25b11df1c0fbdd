"""Decode speed of a small random mixture of experts: the grouped expert path (layers/moe.py:
each step runs only the experts its tokens chose) against every expert run for every token
(what a dense loop over the experts reads), dense float32 and with experts quantised (int4 ISQ),
and llama.cpp on the same model as a Q4_0 GGUF, all in one run.

    python benchmarks/moe_decode.py [--experts 64] [--top-k 8] [--layers 4] [--threads 2] [--runs 3]

The model is Qwen3-MoE-shaped (64 experts of width 256, top 8, hidden 1024 by default: a
scaled-down Qwen3-30B-A3B), random weights, built with transformers into a temporary folder
(and written as GGUF with the tests' converter, tests/tiny_gguf.py). Single-stream decode
tokens/s, min / median / max over the runs. The machine is shared and noisy: compare the
ratios of one run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def build_model(folder: Path, args) -> Path:
    import transformers as tf

    from tiny_models import _tokenizer

    config = tf.Qwen3MoeConfig(
        vocab_size=4096, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=args.experts,
        num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_width, norm_topk_prob=True,
        max_position_embeddings=4096, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        architectures=["Qwen3MoeForCausalLM"])
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
    model.save_pretrained(folder)
    _tokenizer(folder)
    return folder


def every_expert_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The baseline: every expert over every token, weighted by the routing (zero for the unchosen)."""
    from levante.layers.moe import route

    weights, experts = route(self.gate(x), self.top_k, self.renormalize)
    dense = torch.zeros(x.shape[0], len(self.experts)).scatter_(1, experts, weights)
    out = torch.zeros_like(x)
    for index, expert in enumerate(self.experts):
        out += (expert(x) * dense[:, index:index + 1]).to(x.dtype)
    return out


def decode_levante(path: str, threads: int, runs: int, gen_tokens: int, every_expert: bool, **options) -> list[float]:
    from levante import LLM, SamplingParams
    from levante.layers.moe import SparseMoE

    grouped = SparseMoE.forward
    if every_expert:
        SparseMoE.forward = every_expert_forward
    try:
        llm = LLM(path, num_threads=threads, prepared_cache=False, **options)
        rates = []
        for run in range(runs):
            params = SamplingParams(temperature=0, max_tokens=gen_tokens, ignore_eos=True)
            stamps = [time.perf_counter() for _ in llm.stream([5 + run, 11, 12, 13], params)]
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        return rates
    finally:
        SparseMoE.forward = grouped


def decode_llamacpp(path: str, threads: int, runs: int, gen_tokens: int) -> list[float]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    rates = []
    for run in range(runs):
        stamps = []
        for _token in llm.generate([5 + run, 11, 12, 13], temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == gen_tokens:
                break
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--expert-width", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gen-tokens", type=int, default=32)
    args = parser.parse_args()

    from gguf import GGMLQuantizationType

    from tiny_gguf import convert

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "moe", args)
        gguf_path = str(convert(folder, Path(tmp) / "moe-q4_0.gguf", GGMLQuantizationType.Q4_0))
        bench = dict(threads=args.threads, runs=args.runs, gen_tokens=args.gen_tokens)
        results = {
            ("float32", "grouped"): decode_levante(str(folder), every_expert=False, dtype="float32", **bench),
            ("float32", "every expert"): decode_levante(str(folder), every_expert=True, dtype="float32", **bench),
            ("int4 ISQ", "grouped"): decode_levante(str(folder), every_expert=False, dtype="float32",
                                                    quantization="int4", **bench),
            ("int4 ISQ", "every expert"): decode_levante(str(folder), every_expert=True, dtype="float32",
                                                         quantization="int4", **bench),
            ("Q4_0 GGUF", "grouped"): decode_levante(gguf_path, every_expert=False, dtype="float32", **bench),
            ("Q4_0 GGUF", "llama.cpp"): decode_llamacpp(gguf_path, args.threads, args.runs, args.gen_tokens),
        }
    print(f"Qwen3-MoE-shaped: {args.layers} layers, hidden {args.hidden}, {args.experts} experts of width "
          f"{args.expert_width}, top {args.top_k}; {args.threads} threads, {args.runs} runs, "
          f"decode {args.gen_tokens} tokens (tokens/s)")
    print(f"{'weights':12}{'path':14}{'min':>9}{'median':>9}{'max':>9}")
    for (weights, path), rates in results.items():
        print(f"{weights:12}{path:14}{min(rates):9.1f}{statistics.median(rates):9.1f}{max(rates):9.1f}")
    for weights, peer in [("float32", "every expert"), ("int4 ISQ", "every expert"), ("Q4_0 GGUF", "llama.cpp")]:
        ratio = statistics.median(results[(weights, "grouped")]) / statistics.median(results[(weights, peer)])
        print(f"{weights}: grouped / {peer} = {ratio:.2f}x")


if __name__ == "__main__":
    main()

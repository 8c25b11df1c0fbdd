"""What the KV cache's dtype costs in quality and saves in memory, on a real model and a long prompt.

    python benchmarks/kv_cache_quality.py [--model qwen2.5-coder:0.5b] [--tokens 2048] [--gen-tokens 64]
                                          [--kv-dtypes float32,bfloat16,int8] [--threads 2]

The prompt is real code: Python's own standard library sources (from this interpreter's install,
no network), tokenised and cut to `--tokens`. Each KV dtype runs the same prompt through the same
model (weights and compute in the model's `--dtype`, default auto), teacher-forced: the next-token
distribution at every prompt position is compared with the first dtype's (the reference, float32 by
default) by KL divergence (nats; mean, 99th percentile, max) and top-1 agreement; then each decodes
`--gen-tokens` greedy tokens, compared with the reference's continuation (identical tokens, and
the first position where they differ). Memory per token and the tokens that fit in 1 GiB come from
the engine's own accounting (the blocks `--kv-cache-gb 1` holds).
"""
from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch

STDLIB_FILES = ("inspect.py", "argparse.py", "dataclasses.py", "typing.py")


def code_prompt(tokenizer, tokens: int) -> list[int]:
    text = "".join(Path(sysconfig.get_paths()["stdlib"], name).read_text() for name in STDLIB_FILES)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < tokens:
        raise SystemExit(f"the stdlib text has {len(ids)} tokens, fewer than --tokens {tokens}")
    return ids[:tokens]


def kl_rows(logits: torch.Tensor, reference: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """KL(reference || logits) per row, in nats, a chunk of rows at a time (the rows are vocabulary-wide)."""
    out = []
    for i in range(0, len(logits), chunk):
        p = reference[i:i + chunk].float().log_softmax(-1)
        q = logits[i:i + chunk].float().log_softmax(-1)
        out.append((p.exp() * (p - q)).sum(-1))
    return torch.cat(out)


def run(args, kv_dtype: str, prompt: list[int] | None):
    from levante import LLM, SamplingParams
    from levante.engine.runner import kv_bytes_per_token

    llm = LLM(args.model, dtype=args.dtype, kv_cache_dtype=kv_dtype, num_threads=args.threads, kv_cache_gb=1.0,
              max_model_len=args.tokens + args.gen_tokens + 16, warmup=False)
    engine = llm.engine
    cache_dtype = engine.runner.kv_cache[0][0].dtype
    memory = {"bytes": kv_bytes_per_token(engine.model, cache_dtype),
              "tokens_per_gib": engine.block_manager.num_blocks * engine.config.cache.block_size,
              "model_dtype": str(engine.dtype).removeprefix("torch."),
              "path": "native kernel" if engine.runner.paged else "SDPA"}
    if prompt is None:
        prompt = code_prompt(engine.tokenizer, args.tokens)
    params = SamplingParams(temperature=0, max_tokens=args.gen_tokens, ignore_eos=True, return_prompt_logits=True)
    output = llm.generate([prompt], params)[0]
    return prompt, output.metrics["prompt_logits"], output.outputs[0].token_ids, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder:0.5b")
    parser.add_argument("--dtype", default="auto", help="the model's weights and compute (default: auto)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--kv-dtypes", default="float32,bfloat16,int8", help="the first is the reference")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.kv_dtypes.split(",")
    prompt, reference, ref_tokens, memory = run(args, names[0], None)
    print(f"model {args.model} ({memory['model_dtype']} compute), prompt: {len(prompt)} tokens of Python stdlib "
          f"code ({', '.join(STDLIB_FILES)}), {args.gen_tokens} greedy tokens after it; reference: {names[0]} KV")
    print(f"{'kv dtype':>9} {'bytes/token':>12} {'tokens/GiB':>11} {'attention':>14} {'KL mean':>10} "
          f"{'KL p99':>10} {'KL max':>10} {'top-1 agree':>12} {'greedy same':>12} {'first diff':>11}")
    rows = [(names[0], reference, ref_tokens, memory)]
    for name in names[1:]:
        _, logits, tokens, mem = run(args, name, prompt)
        rows.append((name, logits, tokens, mem))
    for name, logits, tokens, mem in rows:
        kl = kl_rows(logits, reference)
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        same = sum(a == b for a, b in zip(tokens, ref_tokens))
        first = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
        print(f"{name:>9} {mem['bytes']:>12,d} {mem['tokens_per_gib']:>11,d} {mem['path']:>14} {kl.mean():10.2e} "
              f"{kl.quantile(0.99):10.2e} {kl.max():10.2e} {agree:12.2%} {f'{same}/{len(tokens)}':>12} "
              f"{'-' if first is None else first:>11}", flush=True)


if __name__ == "__main__":
    main()

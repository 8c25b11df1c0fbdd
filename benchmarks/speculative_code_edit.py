"""Speculative decoding on a code edit: levante with and without prompt lookup, beside llama.cpp's.

    python benchmarks/speculative_code_edit.py [--model ALIAS_OR_GGUF] [--threads 2] [--runs 3] [-k 5]

The task: a function given in the prompt, to be rewritten with one small change, the answer
mostly a copy of the input (greedy, up to 256 tokens, the model's chat template). Prints, for
levante plain / levante ngram / llama.cpp plain / llama.cpp prompt lookup
(`llama_cpp.llama_speculative.LlamaPromptLookupDecoding`), run after run in turn, decode tokens/s
(after the first token) and end-to-end tokens/s, min / median / max over the runs, whether each engine's
speculative text equals its plain text, and levante's acceptance rate. The machine is shared
and noisy: compare ratios within one run, not absolute figures across runs.
"""
from __future__ import annotations

import argparse
import statistics
import time

FUNCTION = '''def summarize_orders(orders, currency="EUR", include_cancelled=False):
    """Total, average and largest order per customer, in one currency."""
    rates = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17, "CHF": 1.04}
    if currency not in rates:
        raise ValueError(f"unknown currency: {currency}")
    per_customer = {}
    for order in orders:
        if order.get("status") == "cancelled" and not include_cancelled:
            continue
        customer = order["customer_id"]
        amount = order["amount"] * rates[order.get("currency", "EUR")] / rates[currency]
        entry = per_customer.setdefault(customer, {"count": 0, "total": 0.0, "largest": 0.0})
        entry["count"] += 1
        entry["total"] += amount
        entry["largest"] = max(entry["largest"], amount)
    summary = []
    for customer, entry in sorted(per_customer.items()):
        average = entry["total"] / entry["count"]
        summary.append({
            "customer_id": customer,
            "orders": entry["count"],
            "total": round(entry["total"], 2),
            "average": round(average, 2),
            "largest": round(entry["largest"], 2),
            "currency": currency,
        })
    return summary
'''

REQUEST = ("Here is a Python function:\n\n```python\n" + FUNCTION + "```\n\n"
           "Rename the parameter `orders` to `order_list` everywhere in the function. Change nothing else. "
           "Reply with the complete rewritten function in one Python code block, and nothing more.")


def rates(start: float, stamps: list[float], tokens: int) -> tuple[float, float]:
    """(decode tokens/s after the first token, end-to-end tokens/s) of a stream."""
    return (tokens - 1) / (stamps[-1] - stamps[0]), tokens / (stamps[-1] - start)


def levante_runner(path: str, threads: int, max_tokens: int, options: dict):
    """A function running the task once: (decode tok/s, end-to-end tok/s, text, tokens); and the engine."""
    from levante import LLM, SamplingParams

    llm = LLM(path, num_threads=threads, warmup=True, **options)
    ids = llm.apply_chat_template([{"role": "user", "content": REQUEST}])
    params = SamplingParams(temperature=0, max_tokens=max_tokens)

    def run():
        start, stamps, last = time.perf_counter(), [], None
        for last in llm.stream(ids, params):  # several tokens may come in one output
            stamps.append(time.perf_counter())
        output = last.outputs[0]
        return (*rates(start, stamps, len(output.token_ids)), output.text, len(output.token_ids))

    return run, llm.engine, ids


def llamacpp_runner(path: str, threads: int, max_tokens: int, ids: list[int], lookup: int):
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=lookup) if lookup else None
    # llama-cpp-python keeps the logits of every drafted position only with logits_all.
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=512,
                verbose=False, draft_model=draft, logits_all=draft is not None)

    def run():  # the prompt stays evaluated between runs (llama.cpp reuses a common prefix), as levante's cache
        start, stamps, pieces = time.perf_counter(), [], []
        for chunk in llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, stream=True):
            choice = chunk["choices"][0]
            if choice["finish_reason"] is None:  # a chunk per token, then one that only says why it ended
                stamps.append(time.perf_counter())
            pieces.append(choice["text"])
        return (*rates(start, stamps, len(stamps)), "".join(pieces), len(stamps))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder:0.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=5)
    parser.add_argument("--prompt-lookup-min", type=int, default=None)
    parser.add_argument("--prompt-lookup-max", type=int, default=None)
    parser.add_argument("--llamacpp-lookup", type=int, default=10,
                        help="llama.cpp: LlamaPromptLookupDecoding(num_pred_tokens=N) (default: its own, 10)")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--show-text", action="store_true")
    args = parser.parse_args()

    from levante.loader.auto import resolve_path

    _, path = resolve_path(args.model)
    lookup = {"speculative_method": "ngram", "num_speculative_tokens": args.num_speculative_tokens}
    for name in ("prompt_lookup_min", "prompt_lookup_max"):
        if getattr(args, name) is not None:
            lookup[name] = getattr(args, name)
    runners = {}
    runners["levante"], _, ids = levante_runner(str(path), args.threads, args.max_tokens, {})
    runners["levante ngram"], engine, _ = levante_runner(str(path), args.threads, args.max_tokens, lookup)
    if not args.skip_llamacpp:
        runners["llama.cpp"] = llamacpp_runner(str(path), args.threads, args.max_tokens, ids, 0)
        runners["llama.cpp lookup"] = llamacpp_runner(str(path), args.threads, args.max_tokens, ids,
                                                      args.llamacpp_lookup)
    print(f"model {path.name}, {args.threads} threads, {args.runs} runs (engines interleaved), prompt {len(ids)} "
          f"tokens, greedy, up to {args.max_tokens} tokens, levante {lookup}", flush=True)
    results = {name: {"decode_tok_s": [], "total_tok_s": []} for name in runners}
    for run in range(args.runs):
        for name, runner in runners.items():
            decode, total, text, tokens = runner()
            r = results[name]
            r["decode_tok_s"].append(decode)
            r["total_tok_s"].append(total)
            r["text"], r["tokens"] = text, tokens
            print(f"run {run}: {name:18} {tokens} tokens, decode {decode:.2f} tok/s, end to end {total:.2f} tok/s",
                  flush=True)
    spec = engine.speculator
    results["levante ngram"]["acceptance"] = spec.num_accepted_tokens / max(1, spec.num_draft_tokens)
    results["levante ngram"]["tokens_per_step"] = (spec.num_accepted_tokens + spec.num_drafts) / max(1, spec.num_drafts)
    print(f"{'engine':18}{'tokens':>7}{'metric':>14}{'min':>9}{'median':>9}{'max':>9}")
    for name, r in results.items():
        for metric in ("decode_tok_s", "total_tok_s"):
            v = r[metric]
            print(f"{name:18}{r['tokens']:7}{metric:>14}{min(v):9.2f}{statistics.median(v):9.2f}{max(v):9.2f}")
    base = results["levante"]
    for engine in [e for e in results if e != "levante"]:
        ratio = statistics.median(results[engine]["decode_tok_s"]) / statistics.median(base["decode_tok_s"])
        print(f"decode {engine} / levante plain: {ratio:.2f}x")
    spec = results["levante ngram"]
    print(f"levante ngram: acceptance {spec['acceptance']:.1%}, {spec['tokens_per_step']:.2f} tokens per "
          f"speculating step, text identical to plain: {spec['text'] == base['text']}")
    if "llama.cpp" in results:
        print(f"llama.cpp lookup: text identical to its plain: "
              f"{results['llama.cpp lookup']['text'] == results['llama.cpp']['text']}")
    if args.show_text:
        for engine, r in results.items():
            print(f"--- {engine}\n{r['text']}")


if __name__ == "__main__":
    main()

"""levante beside sentence-transformers: embeddings per second, same model, threads and batch size.

    python benchmarks/embeddings_vs_sentence_transformers.py [--model all-minilm:l6-v2] [--threads 2]
        [--texts 512] [--batch-size 32] [--runs 5]

Both embed the same corpus (texts of 3 to 120 words, a fixed seed) in float32,
`batch_size` texts per forward pass, after one warm-up pass; runs alternate
between the two. Prints texts/s as min / median / max over the runs, levante's
ratio to sentence-transformers on the medians and on the best runs, and the
worst cosine between the two sets of vectors. The machine is shared and noisy:
compare ratios, not absolute figures from different runs.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

WORDS = ("the of and to in is was for on that with as by at from his her an which are this be have or had not "
         "they but one were all their there been has when who will more no if out so said what up its about into "
         "than them can only other new some could time these two may then do first any my now such like our over "
         "embedding model vector search query document server engine batch token sentence language network").split()


def corpus(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120))).capitalize() + "."
            for _ in range(count)]


def texts_per_second(engines: dict, texts: list[str], runs: int) -> dict[str, list[float]]:
    """Runs alternate between the engines, so a busy spell on a shared machine hits both alike."""
    for embed in engines.values():
        embed(texts[: min(len(texts), 64)])  # warm-up: allocator, thread pool, first-call paths
    rates = {name: [] for name in engines}
    for _ in range(runs):
        for name, embed in engines.items():
            start = time.perf_counter()
            embed(texts)
            rates[name].append(len(texts) / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-minilm:l6-v2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from levante import LLM
    from levante.loader.auto import resolve_path

    torch.set_num_threads(args.threads)
    texts = corpus(args.texts)
    _, path = resolve_path(args.model)
    llm = LLM(args.model, dtype="float32", num_threads=args.threads)
    llm.embedder.max_batch_size = args.batch_size
    llm.embedder.max_batch_tokens = 1 << 30  # batch by count only, as sentence-transformers does
    reference = SentenceTransformer(str(path), device="cpu", local_files_only=True).float()

    results = texts_per_second({
        "sentence-transformers": lambda t: reference.encode(t, batch_size=args.batch_size, convert_to_tensor=True),
        "levante": lambda t: llm.embed(t, as_tensor=True),
    }, texts, args.runs)
    ours = llm.embed(texts, as_tensor=True)
    theirs = reference.encode(texts, batch_size=args.batch_size, convert_to_tensor=True)
    worst = torch.nn.functional.cosine_similarity(ours, theirs.float()).min().item()
    tokens = sum(len(ids) for ids in llm.embedder.token_ids(texts))

    print(f"model {args.model}, {args.threads} threads, {args.texts} texts ({tokens} tokens), "
          f"batch {args.batch_size}, {args.runs} runs, float32")
    print(f"{'engine':24}{'min':>10}{'median':>10}{'max':>10}  texts/s")
    for engine, rates in results.items():
        print(f"{engine:24}{min(rates):10.1f}{statistics.median(rates):10.1f}{max(rates):10.1f}")
    ratio = statistics.median(results["levante"]) / statistics.median(results["sentence-transformers"])
    best = max(results["levante"]) / max(results["sentence-transformers"])
    print(f"{'ratio':24}{ratio:10.2f}x  (levante / sentence-transformers on the medians, higher is better)")
    print(f"{'ratio of best runs':24}{best:10.2f}x  (the least disturbed runs of each)")
    print(f"worst cosine between the two: {worst:.6f}")


if __name__ == "__main__":
    main()

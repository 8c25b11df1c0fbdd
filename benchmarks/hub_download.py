"""Downloading a sharded model by Hub name, through the fake Hub of the tests (loopback, no network).

    python benchmarks/hub_download.py                 # a ~26 MB llama in 8 shards, plus files it does not need
    python benchmarks/hub_download.py --layers 16

The repo holds what a real one often does beside the model: a pickled copy of the weights
(pytorch_model.bin) and an `original/` checkpoint, each as large as the model. levante's resolver
(`levante pull`) fetches only the files the model reads; the peer, huggingface_hub's
`snapshot_download` of the repo as it is (what a loader that takes a whole snapshot does),
fetches everything. Both run against the same fake Hub in this process, each into a fresh cache,
`--rounds` times alternately; then levante's warm resolve (cache filled, a new process: only
the API calls) is timed. Reported: files and bytes fetched, best time.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH: which levante is measured
sys.path.append(str(ROOT / "tests"))  # the fake Hub


def build_repo(folder: Path, layers: int) -> dict[str, bytes]:
    import torch
    import transformers as tf

    from tiny_models import _tokenizer

    config = tf.LlamaConfig(vocab_size=384, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                            num_attention_heads=8, num_key_value_heads=4, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="4MB")
    _tokenizer(folder)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    weights = sum(len(data) for name, data in files.items() if name.endswith(".safetensors"))
    files["pytorch_model.bin"] = os.urandom(weights)
    files["original/consolidated.safetensors"] = os.urandom(weights)
    files["README.md"] = b"# a sharded tiny llama\n"
    return files


def fetched(hub) -> tuple[int, int]:
    names = hub.downloads()
    repo = hub.repos["bench/llama"]
    files = repo.commits[repo.branches["main"]]
    return len(names), sum(len(files[n]) for n in names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is imported
    from huggingface_hub import snapshot_download

    from fake_hub import FakeHub
    from levante.loader import hub as levante_hub
    from levante.loader.auto import resolve_path

    with tempfile.TemporaryDirectory() as tmp, FakeHub() as hub:
        files = build_repo(Path(tmp) / "model", args.layers)
        hub.add("bench/llama", files)
        os.environ["HF_ENDPOINT"] = hub.url
        os.environ.pop("HF_HUB_OFFLINE", None)
        total = sum(len(d) for d in files.values())
        shards = sum(n.startswith("model-") for n in files)
        print(f"repo: {len(files)} files, {total / 1e6:.1f} MB ({shards} weight shards and an index)")
        results: dict[str, list] = {"levante (pull)": [], "snapshot_download (whole repo)": [], "levante warm": []}
        for round_ in range(args.rounds):
            for case in ("levante (pull)", "snapshot_download (whole repo)"):
                os.environ["HF_HUB_CACHE"] = cache = f"{tmp}/cache-{case.split()[0]}-{round_}"
                levante_hub._resolved.clear()
                hub.requests.clear()
                start = time.perf_counter()
                if case.startswith("levante"):
                    resolve_path("bench/llama")
                else:
                    snapshot_download("bench/llama", cache_dir=cache, endpoint=hub.url)
                results[case].append((time.perf_counter() - start, *fetched(hub), len(hub.requests)))
            os.environ["HF_HUB_CACHE"] = f"{tmp}/cache-levante-{round_}"
            levante_hub._resolved.clear()  # as a new process would
            hub.requests.clear()
            start = time.perf_counter()
            resolve_path("bench/llama")
            results["levante warm"].append((time.perf_counter() - start, *fetched(hub), len(hub.requests)))
        base = min(r[0] for r in results["snapshot_download (whole repo)"])
        for case, runs in results.items():
            seconds, count, size, requests = min(runs)
            print(f"{case:32} {seconds:7.3f} s  x{seconds / base:.2f}  {count:2d} files  {size / 1e6:6.1f} MB  "
                  f"{requests} HTTP requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What LoRA adapters add to a decode step, against the base model in the same run.

    python benchmarks/lora_overhead.py                       # smollm2:135m (Q4_1 GGUF, packed), rank 16
    python benchmarks/lora_overhead.py --model PATH --rank 8 --steps 40 --batch 16

A random adapter of rank `--rank` on every attention and MLP projection of every layer (PEFT's
layout and names, written here: no download), scaling alpha/r. For batch 1 and 16, every
sequence decodes greedily with ignore_eos from a 32-token prompt; once all are decoding, `--steps`
steps are timed with `Engine.step()`. Four cases, interleaved round by round so that the machine's
load hits them alike: the base model; every sequence on one adapter; and at batch 16 half base,
half adapter, and two adapters plus the base (a third each). Reported: median step time and the ratio to the base.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: which levante is measured

MODULES = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}


def write_adapter(folder: Path, config, rank: int, seed: int) -> Path:
    """A PEFT LoRA folder for a model of `config` (levante's ModelConfig), A and B random."""
    g = torch.Generator().manual_seed(seed)
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    h, i = config.hidden_size, config.intermediate_size
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    tensors = {}
    for layer in range(config.num_layers):
        for block, names in MODULES.items():
            for name in names:
                fan_in, fan_out = shapes[name]
                key = f"base_model.model.model.layers.{layer}.{block}.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sum(MODULES.values(), []),
        "bias": "none"}))
    return folder


def decode_steps(engine, adapters: list[str | None], steps: int, prompt_len: int) -> list[float]:
    from levante.engine.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    for n, adapter in enumerate(adapters):
        prompt = torch.randint(10, vocab - 10, (prompt_len,), generator=g).tolist()
        engine.add_request(f"r{n}", prompt, SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True,
                                                           lora=adapter, output_kind="final_only"))
    while any(seq.num_computed_tokens < seq.num_prompt_tokens
              for request in engine.requests.values() for seq in request.seqs):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for rid in list(engine.requests):
        engine.abort_request(rid)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, action="append", default=None, help="batch sizes (default: 1 and 16)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from levante import LLM

    llm = LLM(args.model, enable_prefix_caching=False, warmup=True)
    engine = llm.engine
    with tempfile.TemporaryDirectory() as tmp:
        for name, seed in [("a", 1), ("b", 2)]:
            llm.load_lora(name, str(write_adapter(Path(tmp) / name, engine.model_config, args.rank, seed)))
    print(f"{args.model}: dtype {engine.dtype}, quantization {engine.quantization or 'none'}, "
          f"{torch.get_num_threads()} threads, LoRA rank {args.rank} on q/k/v/o/gate/up/down of "
          f"{engine.model_config.num_layers} layers")
    for batch in args.batch or (1, 16):
        cases = {"base": [None] * batch, "one adapter": ["a"] * batch}
        if batch > 1:
            cases.update({"half base, half adapter": [None, "a"] * (batch // 2),
                          "base + two adapters": ([None, "a", "b"] * batch)[:batch]})
        medians: dict[str, list[float]] = {case: [] for case in cases}
        for _ in range(args.rounds):
            for case, adapters in cases.items():
                medians[case].append(statistics.median(decode_steps(engine, adapters, args.steps, args.prompt_len)))
        base = min(medians["base"])
        print(f"batch {batch}:")
        for case, values in medians.items():
            best = min(values)
            print(f"  {case:26} {best * 1000:8.2f} ms/step  x{best / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""transformers' continuous batching as a throughput peer (vLLM does not fit the GPU machine's 64 MiB carry).

`run_transformers(model_dir, prompts, max_tokens, device, cap)` runs the same workload through
`model.init_continuous_batching()` (paged KV cache, its own scheduler, CUDA graphs where it uses
them): each prompt with its own max_new_tokens, EOS disabled, greedy. Returns (generated tokens,
seconds, finished requests); with `cap` seconds it stops counting there (tokens streamed so far),
so a slow peer still yields a rate over the same kind of window.
"""
from __future__ import annotations

import time


def run_transformers(model_dir: str, prompts: list[list[int]], max_tokens: list[int], device: str = "cuda",
                     cap: float = float("inf")) -> tuple[int, float, int]:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    model.eval()
    config = GenerationConfig(do_sample=False, max_new_tokens=max(max_tokens), eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        manager.add_request(prompts[0][:16], request_id="warm-up", max_new_tokens=4, eos_token_id=-1)
        while (r := manager.get_result(timeout=120)) is None or not r.is_finished():
            if r is None and not manager.is_running():
                raise RuntimeError("transformers' generation thread stopped during the warm-up")
        started = time.perf_counter()
        for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1, streaming=True)
        tokens: dict[str, int] = {}
        finished = 0
        while finished < len(prompts) and time.perf_counter() - started < cap:
            r = manager.get_result(timeout=1)
            if r is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' generation thread stopped")
                continue
            tokens[r.request_id] = len(r.generated_tokens)
            finished += r.is_finished()
        return sum(tokens.values()), time.perf_counter() - started, finished
    finally:
        import logging

        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)  # its loop complains when stopped
        manager.stop(block=False)

"""The Python API, shaped like vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from levante.config import CacheConfig, EngineConfig
from levante.engine.engine import Engine
from levante.engine.outputs import RequestOutput
from levante.engine.sampling_params import SamplingParams
from levante.loader.chat_template import ChatTemplate

Prompt = str | list[int]


class LLM:
    """Loads a model (HF folder, .gguf file or alias) and generates from it.

    Keyword arguments configure the engine: `dtype`, `device`, `max_model_len`,
    `max_num_seqs`, `max_num_batched_tokens`, `block_size`, `kv_cache_gb`,
    `num_kv_blocks`, `enable_prefix_caching`, `num_threads`, `warmup`.
    """

    def __init__(self, model: str | None = None, *, progress: bool = False, **options):
        from levante.loader.sources import DEFAULT_MODEL

        self.engine = Engine(model or DEFAULT_MODEL, _engine_config(options), progress=progress)
        self.tokenizer = self.engine.tokenizer
        tok = self.tokenizer
        if tok.chat_template:
            self.chat_template = ChatTemplate(tok.chat_template, tok.bos_token or "", tok.eos_token or "")
        else:
            vocabulary = {"<start_of_turn>"} if tok.token_to_id("<start_of_turn>") is not None else ()
            self.chat_template = ChatTemplate.fallback(tok.bos_token or "", tok.eos_token or "", vocabulary)
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None,
                 ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids) in one continuous batch; outputs in prompt order."""
        ids = self._submit(prompts, params)
        finished: dict[str, RequestOutput] = {}
        try:
            while len(finished) < len(ids):
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
        finally:
            for rid in ids:
                if rid not in finished:
                    self.engine.abort_request(rid)
        return [finished[rid] for rid in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that adds to it; text is cumulative."""
        (rid,) = self._submit([prompt], params)
        done = False
        try:
            while not done:
                for output in self.engine.step():
                    if output.request_id == rid:
                        done = output.finished
                        yield output
        finally:
            if not done:
                self.engine.abort_request(rid)

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             tools: list[dict] | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Render each conversation through the model's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, tools, add_generation_prompt) for c in conversations]
        return self.generate(prompts, params)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True) -> list[int]:
        text = self.chat_template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _submit(self, prompts, params: SamplingParams | None) -> list[str]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        ids = []
        for prompt in prompts:
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(rid, prompt, params)
            ids.append(rid)
        return ids


def _engine_config(options: dict) -> EngineConfig:
    cache = CacheConfig()
    renames = {"block_size": "block_size", "kv_cache_gb": "memory_gb", "num_kv_blocks": "num_blocks",
               "enable_prefix_caching": "enable_prefix_caching"}
    config = EngineConfig(cache=cache)
    for key, value in options.items():
        if key in renames:
            setattr(cache, renames[key], value)
        elif hasattr(config, key) and key != "cache":
            if key == "dtype" and isinstance(value, str):
                import torch

                value = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                         "auto": None}[value]
            setattr(config, key, value)
        else:
            raise TypeError(f"unknown LLM option '{key}'")
    return config

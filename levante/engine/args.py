"""`EngineArgs`: how to load and run a model, as one plain object (vLLM's name and idea).

Built once, from keyword arguments (`LLM(model, **options)`) or from command-line
flags (`EngineArgs.from_cli_args`), and handed to whoever loads the model: the
Python API, the server, the terminal chat, the benchmarks. Faces never build
an engine configuration of their own.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from levante.config import CacheConfig, EngineConfig, SpeculativeConfig
from levante.errors import InvalidRequest

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CACHE_FIELDS = {"block_size": "block_size", "kv_cache_gb": "memory_gb", "num_kv_blocks": "num_blocks",
                 "enable_prefix_caching": "enable_prefix_caching",
                 "gpu_memory_utilization": "gpu_memory_utilization"}
_SPECULATIVE_FIELDS = {"speculative_method": "method", "num_speculative_tokens": "num_speculative_tokens",
                       "draft_model": "draft_model", "prompt_lookup_min": "prompt_lookup_min",
                       "prompt_lookup_max": "prompt_lookup_max"}


@dataclass
class EngineArgs:
    """Every knob of model loading and the engine. `None` means the device's default (EngineConfig)."""

    model: str | None = None  # HF folder, .gguf file or alias; None: the default model
    dtype: str | torch.dtype | None = "auto"
    device: str = "cpu"
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_gb: float | None = None
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_threads: int | None = None
    quantization: str = "auto"
    tensor_parallel_size: int = 1
    device_map: str | None = None
    topology: str | None = None
    matformer_config: str | None = None  # Gemma 3n: the MatFormer slicing table (CSV)
    matformer_slice: str | None = None  # Gemma 3n: the row of that table to cut out of the checkpoint
    prepared_cache: bool = True
    enforce_eager: bool = False
    cuda_graph_max_batch: int = 256
    # Speculative decoding (config.SpeculativeConfig; None: its default): off unless a method is named.
    speculative_method: str | None = None  # "ngram" (prompt lookup) or "draft" (with draft_model)
    num_speculative_tokens: int | None = None
    draft_model: str | None = None
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    warmup: bool = True
    seed: int = 0
    progress: bool = False  # progress bars while loading weights

    def engine_config(self) -> EngineConfig:
        config = EngineConfig(cache=CacheConfig())
        for name, value in dataclasses.asdict(self).items():
            if name in _CACHE_FIELDS:
                setattr(config.cache, _CACHE_FIELDS[name], value)
            elif name == "dtype":
                config.dtype = DTYPES[value] if isinstance(value, str) or value is None else value
            elif hasattr(config, name):
                setattr(config, name, value)
        config.speculative = self._speculative_config()
        return config

    def _speculative_config(self) -> SpeculativeConfig | None:
        options = {field: getattr(self, name) for name, field in _SPECULATIVE_FIELDS.items()
                   if getattr(self, name) is not None}
        if not options:
            return None
        if "method" not in options:
            raise InvalidRequest("speculative decoding options need a speculative method ('ngram' or 'draft')")
        return SpeculativeConfig(**options)

    def options(self) -> dict:
        """The keyword arguments of `LLM(model, **options)` that give these arguments back."""
        return {name: value for name, value in dataclasses.asdict(self).items() if name != "model"}

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides) -> EngineArgs:
        """The flags `add_cli_args` defined, as parsed; `overrides` win (e.g. warmup=False)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {name: getattr(args, name) for name in names if hasattr(args, name)}
        return cls(**{**values, **overrides})

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, default_model: str | None) -> None:
        parser.add_argument("-m", "--model", default=default_model,
                            help=f"HF folder, .gguf file or alias (default: {default_model}; see `levante models`)")
        parser.add_argument("--dtype", default="auto", choices=list(DTYPES))
        parser.add_argument("--device", default="cpu")
        parser.add_argument("--max-model-len", type=int, default=None)
        parser.add_argument("--max-num-seqs", type=int, default=None,
                            help="sequences batched together (default: 64 on the CPU, 256 on CUDA)")
        parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                            help="tokens computed per step, prefill chunks included (default: 1024 on the CPU, "
                                 "8192 on CUDA)")
        parser.add_argument("--kv-cache-gb", type=float, default=None,
                            help="memory preallocated for the KV cache (default: 2 on the CPU; on CUDA what "
                                 "--gpu-memory-utilization leaves after the weights)")
        parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                            help="fraction of the GPU's memory levante may use, KV cache included (default: 0.9)")
        parser.add_argument("--threads", dest="num_threads", type=int, default=None,
                            help="CPU threads (default: PyTorch's choice)")
        parser.add_argument("--quantization", "--isq", dest="quantization", default="auto",
                            choices=["auto", "none", "int8", "int4"],
                            help="weights in memory: auto keeps GGUF quantised (packed int8/int4), none dequantises "
                                 "to --dtype, int8/int4 quantise any model in situ (default: auto)")
        parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                            help="split every layer across N ranks (worker processes on this host, or torchrun's "
                                 "ranks across hosts); NCCL on CUDA, gloo on CPU")
        parser.add_argument("--device-map", default=None,
                            help='layers per device: "auto" or "ORDINAL:LAYERS;..." such as "0:12;1:12"')
        parser.add_argument("--topology", default=None,
                            help="YAML file: per-layer-range or /regex/ device and isq (mistral.rs's format)")
        parser.add_argument("--matformer-config", default=None,
                            help="Gemma 3n: the MatFormer slicing table (CSV, as Google publishes it)")
        parser.add_argument("--matformer-slice", default=None,
                            help="Gemma 3n: the row of --matformer-config to cut out of the checkpoint, "
                                 'such as "Config for E2.49B (block-level)"')
        parser.add_argument("--enforce-eager", action="store_true",
                            help="CUDA: no CUDA graphs for decode steps (always the eager forward)")
        parser.add_argument("--no-prepared-cache", dest="prepared_cache", action="store_false",
                            help="do not keep packed weights under <cache>/prepared/ (re-pack on every start)")
        parser.add_argument("--speculative-method", default=None, choices=["ngram", "draft"],
                            help="speculative decoding (off by default): ngram copies proposals from the prompt "
                                 "and text so far (prompt lookup); draft asks --draft-model")
        parser.add_argument("--num-speculative-tokens", type=int, default=None,
                            help="tokens proposed and checked per step (default: 5)")
        parser.add_argument("--draft-model", default=None,
                            help="a smaller model with the same tokenizer, for --speculative-method draft")
        parser.add_argument("--prompt-lookup-min", type=int, default=None,
                            help="ngram: the shortest suffix looked up (default: 2)")
        parser.add_argument("--prompt-lookup-max", type=int, default=None,
                            help="ngram: the longest suffix looked up (default: 5)")

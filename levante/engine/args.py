"""`EngineArgs`: how to load and run a model, as one plain object (vLLM's name and idea).

Built once, from keyword arguments (`LLM(model, **options)`) or from command-line
flags (`EngineArgs.from_cli_args`), and handed to whoever loads the model: the
Python API, the server, the terminal chat, the benchmarks. Faces never build
an engine configuration of their own.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from levante.config import CacheConfig, EngineConfig, SpeculativeConfig
from levante.errors import InvalidRequest

# `--dtype` names; torch's dtypes are looked up when the engine is configured, so that the CLI
# (argument parsing, `levante --help`, the start of `levante serve`) runs before PyTorch is imported.
DTYPES = ("auto", "float32", "bfloat16", "float16")
# `--kv-cache-dtype` names: "auto" keeps the model's dtype; int8 (llama.cpp's name for the same idea:
# q8_0) is quant/kv_int8.py's cache, 56% of bfloat16's memory.
KV_CACHE_DTYPES = (*DTYPES, "int8", "q8_0")
_CACHE_FIELDS = {"block_size": "block_size", "kv_cache_gb": "memory_gb", "num_kv_blocks": "num_blocks",
                 "enable_prefix_caching": "enable_prefix_caching",
                 "gpu_memory_utilization": "gpu_memory_utilization"}
_SPECULATIVE_FIELDS = {"speculative_method": "method", "num_speculative_tokens": "num_speculative_tokens",
                       "draft_model": "draft_model", "prompt_lookup_min": "prompt_lookup_min",
                       "prompt_lookup_max": "prompt_lookup_max"}


@dataclass
class EngineArgs:
    """Every knob of model loading and the engine. `None` means the device's default (EngineConfig)."""

    model: str | None = None  # HF folder, .gguf file, alias or Hub name; None: the default model
    # What the model does (loader/auto.py's TASKS); None: what its files say. "score" reads a decoder
    # LLM as a yes/no reranker (Qwen3-Reranker), which its files cannot say.
    task: str | None = None
    gguf_file: str | None = None  # the .gguf file of the Hub repo `model` names (instead of :QUANT)
    dtype: str | torch.dtype | None = "auto"
    device: str = "cpu"
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_gb: float | None = None
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_threads: int | None = None
    quantization: str = "auto"
    tensor_parallel_size: int = 1
    # Data parallelism (`levante serve` only, engine/front.py): replicas of the model, on local
    # processes ("mp") or Ray actors ("ray"), requests routed by "prefix" (cache-aware) or "round-robin".
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    data_parallel_routing: str = "prefix"
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
    lora: dict[str, str] = field(default_factory=dict)  # LoRA adapters (PEFT folders) loaded at start, name -> path
    max_loras: int = 8  # adapters loaded at once, run-time loads included
    max_lora_rank: int = 64

    @property
    def model_name(self) -> str:
        """What to open: `model` (or the default model), with `gguf_file` folded in (``org/name:FILE``)."""
        from levante.loader.hub import with_gguf_file
        from levante.loader.sources import DEFAULT_MODEL

        return with_gguf_file(str(self.model or DEFAULT_MODEL), self.gguf_file)

    def engine_config(self) -> EngineConfig:
        config = EngineConfig(cache=CacheConfig())
        for name, value in dataclasses.asdict(self).items():
            if name in _CACHE_FIELDS:
                setattr(config.cache, _CACHE_FIELDS[name], value)
            elif name == "dtype":
                config.dtype = _torch_dtype(value)
            elif name == "kv_cache_dtype":
                config.cache.dtype = _torch_dtype(value, "kv_cache_dtype", KV_CACHE_DTYPES)
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
        if isinstance(values.get("lora"), list):
            values["lora"] = parse_lora_flags(values["lora"])
        return cls(**{**values, **overrides})

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, default_model: str | None, several: bool = False) -> None:
        """The engine flags; `several`: -m may be repeated (`levante serve`), a list in `args.model`."""
        what = "HF folder, .gguf file, alias or Hub name org/name[@revision][:QUANT]"
        if several:
            parser.add_argument("-m", "--model", action="append", default=None,
                                help=f"{what}; repeat it to serve several models, routed by `model` (default: "
                                     f"{default_model}; see `levante models`)")
        else:
            parser.add_argument("-m", "--model", default=default_model,
                                help=f"{what} (default: {default_model}; see `levante models`)")
        EngineArgs.add_gguf_file_arg(parser)
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
        parser.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                            help="the KV cache's dtype: auto (the model's), bfloat16, float16, float32, or int8 "
                                 "(= q8_0: 8-bit codes with a scale per token and KV head, half of bfloat16's "
                                 "memory; the CPU only)")
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
        parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                            help="a LoRA adapter (PEFT folder) served as model NAME (repeatable; `run` applies it)")
        parser.add_argument("--max-lora-rank", type=int, default=64, help="largest LoRA rank accepted (default: 64)")
        parser.add_argument("--max-loras", type=int, default=8,
                            help="LoRA adapters loaded at once, run-time loads included (default: 8)")
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

    @staticmethod
    def add_gguf_file_arg(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--gguf-file", default=None, metavar="NAME",
                            help="the .gguf file of the Hub repo -m names (instead of picking one by :QUANT)")


def parse_lora_flags(specs: list[str]) -> dict[str, str]:
    """`--lora NAME=PATH` flags as {name: path}."""
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InvalidRequest(f"--lora {spec}: expected NAME=PATH (a PEFT adapter folder)")
        if name in adapters:
            raise InvalidRequest(f"--lora {spec}: adapter name '{name}' is given twice")
        adapters[name] = path
    return adapters


def _torch_dtype(value, field: str = "dtype", names: tuple[str, ...] = DTYPES):
    """A dtype flag's value (`--dtype`, `--kv-cache-dtype`) as a torch dtype; None for "auto" (the
    device's default, the model's for the cache)."""
    if value is None or value == "auto":
        return None
    if not isinstance(value, str):
        return value  # a torch.dtype given to LLM(dtype=..., kv_cache_dtype=...)
    if value not in names:
        raise InvalidRequest(f"{field} '{value}': expected one of {', '.join(names)}")
    import torch

    return torch.int8 if value == "q8_0" else getattr(torch, value)  # q8_0: llama.cpp's name for int8

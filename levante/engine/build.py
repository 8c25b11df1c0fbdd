"""From an opened checkpoint to a model with its weights, on its devices: the part of
start-up that rank 0 and tensor-parallel workers share."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import nn

from levante.config import EngineConfig, ModelConfig
from levante.distributed import parallel_state
from levante.distributed.topology import Topology
from levante.errors import InvalidTopology, ModelLoadError
from levante.loader.memory import return_free_memory, trim_heap
from levante.loader.prepared import load_prepared, prepared_path, save_prepared
from levante.loader.sources import prepared_dir
from levante.models.registry import build_model, load_weights
from levante.quant.packed import resolve_mode


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Clear errors for a model that cannot be split `tp` ways (before any process starts)."""
    if tp < 1:
        raise ModelLoadError(f"--tensor-parallel-size must be at least 1, got {tp}")
    if tp == 1:
        return
    if config.model_type.startswith("gemma3n"):  # its per-layer tables and AltUp streams are not split
        raise ModelLoadError(f"--tensor-parallel-size {tp}: Gemma 3n runs on one rank for now")
    if config.architecture.endswith("ForConditionalGeneration"):
        # Workers receive token ids only; image embeddings would have to travel with each step.
        raise ModelLoadError(f"--tensor-parallel-size {tp}: vision-language models ({config.architecture}) "
                             "run on one rank for now")
    problems = []
    if config.num_heads % tp:
        problems.append(f"{config.num_heads} attention heads")
    kv = config.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        problems.append(f"{kv} key/value heads")
    if config.intermediate_size % tp and len(config.moe_layers) < config.num_layers:  # a dense MLP somewhere
        problems.append(f"an MLP width of {config.intermediate_size}")
    if config.num_experts and config.moe_intermediate_size % tp:
        problems.append(f"an expert width of {config.moe_intermediate_size}")
    if problems:
        raise ModelLoadError(f"--tensor-parallel-size {tp} does not divide the model's {', '.join(problems)}")


def load_model(source, config: EngineConfig, dtype: torch.dtype, device: torch.device,
               progress_weights=None) -> tuple[nn.Module, str | None, Path]:
    """Build the model for `source` and load its weights; (model, quantization mode, where the weights
    came from: the checkpoint, or the prepared-weights cache of loader/prepared.py).

    `progress_weights(source, quantized)` may wrap the weight iterator (a progress bar)."""
    quantization = resolve_mode(config.quantization, source.format)
    topology = Topology.from_file(config.topology) if config.topology else None
    tp = config.tensor_parallel_size > 1
    if tp and (config.device_map or (topology is not None and topology.sets_devices)):
        raise InvalidTopology("tensor parallelism and per-layer device mapping cannot be combined: "
                              "use one or the other")
    # The context the user asked for is part of the model where RoPE depends on it (LongRoPE).
    model_config = dataclasses.replace(source.config, max_model_len=config.max_model_len)
    with parallel_state.building() if tp else contextlib.nullcontext():
        model = build_model(model_config, dtype, device)
    overrides = None
    if config.device_map or topology is not None:
        from levante.engine.placement import place

        kv_bytes = int((config.cache.memory_gb or 2.0) * (1 << 30))
        overrides = place(model, device, dtype, source.format, config.device_map, topology, kv_bytes)
    trim_heap()  # what reading the tokenizer freed, before the weights come in
    prepared = None  # packed weights kept from an earlier load: one rank, no per-layer placement
    if config.prepared_cache and not tp and overrides is None:
        prepared = prepared_path(prepared_dir(), source.path, quantization, dtype)
    if prepared is not None and load_prepared(model, prepared, quantization):
        return model.eval(), quantization, prepared
    quantized = quantization is not None or any(overrides.values() if overrides else ())
    weights = source.weights(quantized) if progress_weights is None else progress_weights(source, quantized)
    load_weights(model, weights, quantization, overrides)
    return_free_memory()
    if prepared is not None:
        save_prepared(model, prepared)
    return model.eval(), quantization, source.path

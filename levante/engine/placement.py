"""Putting a model's layers on devices and choosing their quantization, before its weights load.

Inputs: `--device-map` (distributed/device_map.py) and a topology file
(distributed/topology.py); the topology's devices win over the device map. The embedding
sits with the first decoder layer (and a tied head with it), the final norm and an untied
head with the last one. Activations follow the layers: each layer moves its inputs to its
device on entry (a forward pre-hook), and the decoder's output and the logits come back to
the engine's device. Each attention layer's KV cache is allocated on its layer's device
(`cache_device`, read by engine/runner.py), and the step's attention metadata is copied
once per device (AttentionMetadata.to).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from levante.distributed import device_map as dmap
from levante.distributed.topology import Topology
from levante.errors import InvalidTopology
from levante.layers.attention import Attention
from levante.layers.embedding import VocabParallelEmbedding
from levante.layers.linear import LinearBase

logger = logging.getLogger("levante")


def place(model: nn.Module, device: torch.device, dtype: torch.dtype, checkpoint_format: str,
          device_map: str | None = None, topology: Topology | None = None,
          kv_cache_bytes: int = 0) -> dict[str, str | None]:
    """Move `model`'s layers to their devices; the quantization overrides (module name ->
    "int8" | "int4" | "auto" | None) the topology asks for, for models/registry.load_weights."""
    decoder = model.get_submodule("model")
    layers = decoder.layers
    n = len(layers)
    devices = _layer_devices(layers, device, dtype, device_map, kv_cache_bytes)
    overrides: dict[str, str | None] = {}
    module_devices: dict[str, str] = {}
    if topology is not None:
        own_form = "auto" if checkpoint_format == "gguf" else None
        for i, spec in enumerate(topology.layers(n)):
            if spec is None:
                continue
            if spec.device:
                devices[i] = _checked(spec.device, f"topology key '{spec.key}'")
            mode = own_form if spec.isq is None else (None if spec.isq == "none" else spec.isq)
            for name, module in layers[i].named_modules():
                if isinstance(module, (LinearBase, VocabParallelEmbedding)):
                    overrides[f"model.layers.{i}.{name}"] = mode
        matched = set()
        for name, module in model.named_modules():
            if not isinstance(module, (LinearBase, VocabParallelEmbedding)):
                continue
            spec = topology.match(f"{name}.weight")
            if spec is None:
                continue
            matched.add(spec.key)
            if spec.isq is not None:
                overrides[name] = None if spec.isq == "none" else spec.isq
            if spec.device:
                module_devices[name] = _checked(spec.device, f"topology key '{spec.key}'")
        for _, spec in topology.patterns:
            if spec.key not in matched:
                logger.warning("topology key '%s' matches no weight of this model", spec.key)
    _move(model, decoder, [torch.device(d) for d in devices], device)
    for name, dev in module_devices.items():
        _pin_module(model.get_submodule(name), torch.device(dev))
    if any(torch.device(d).type != "cpu" for d in list(devices) + list(module_devices.values())):
        quantized = [k for k, v in overrides.items() if v in ("int8", "int4")]
        if quantized:
            raise InvalidTopology(f"in-situ quantization ({quantized[0]}) keeps weights in CPU packed formats: "
                                  "place quantized layers on cpu")
    return overrides


def layer_devices(model: nn.Module) -> list[torch.device]:
    """Where each decoder layer's weights are (for tests and logs)."""
    return [next(layer.parameters()).device for layer in model.get_submodule("model").layers]


def _layer_devices(layers: nn.ModuleList, device: torch.device, dtype: torch.dtype, device_map: str | None,
                   kv_cache_bytes: int) -> list[str]:
    n = len(layers)
    if not device_map:
        return [str(device)] * n
    entries = dmap.parse(device_map)
    if entries != "auto":
        return [_checked(d, f"device map '{device_map}'") for d in dmap.assign(entries, n, device.type)]
    capacities = dmap.free_memory(device.type)
    if not capacities:
        return [str(device)] * n
    size = torch.empty((), dtype=dtype).element_size()
    per_layer = [sum(p.numel() for p in layer.parameters()) * size + kv_cache_bytes // n for layer in layers]
    return dmap.auto_assign(per_layer, capacities, device.type, reserve=max(per_layer))


def _checked(device: str, where: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise InvalidTopology(f"{where}: device {device} is not available ({count} CUDA devices visible)")
    return device


def _move_inputs(device: torch.device):
    def hook(module, args):
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    return hook


def _output_to(device: torch.device):
    def hook(module, args, output):
        return output.to(device) if isinstance(output, torch.Tensor) else output
    return hook


def _move(model: nn.Module, decoder: nn.Module, devices: list[torch.device], main: torch.device) -> None:
    first, last = devices[0], devices[-1]
    for layer, dev in zip(decoder.layers, devices):
        layer.to(dev)
        layer.register_forward_pre_hook(_move_inputs(dev))
        for m in layer.modules():
            if isinstance(m, Attention):
                m.cache_device = dev
    decoder.embed_tokens.to(first)
    decoder.embed_tokens.register_forward_pre_hook(_move_inputs(first))
    decoder.norm.to(last)
    decoder.norm.register_forward_pre_hook(_move_inputs(last))
    decoder.register_forward_hook(_output_to(main))  # the runner picks logits rows on the main device
    head = model.lm_head
    tied = head.weight is decoder.embed_tokens.weight
    head_device = first if tied else last
    if not tied:
        head.to(head_device)
    head.register_forward_pre_hook(_move_inputs(head_device))
    head.register_forward_hook(_output_to(main))


def _pin_module(module: nn.Module, device: torch.device) -> None:
    """One module elsewhere (a regex key's device): inputs go there, its output comes back."""
    module.to(device)
    origin: dict[str, torch.device] = {}

    def before(mod, args):
        for a in args:
            if isinstance(a, torch.Tensor):
                origin["device"] = a.device
                break
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)

    def after(mod, args, output):
        back = origin.get("device", device)
        return output.to(back) if isinstance(output, torch.Tensor) else output

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)

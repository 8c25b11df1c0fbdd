"""`--device-map`: which device each decoder layer lives on.

* `"0:12;1:12"`: the first 12 layers on device 0, the next 12 on device 1 (mistral.rs's
  `ORDINAL:LAYERS;...`). Layers beyond the listed counts stay on the CPU; counts over the
  model's layers are an error.
* `"auto"`: fill the visible GPUs in order, each up to 90% of its free memory, counting a
  layer's weights and its share of the KV cache; what does not fit stays on the CPU.

Ordinals name devices of `--device`'s type: `cuda:N` under `--device cuda`. Under
`--device cpu` every ordinal is the CPU (there is one), which keeps the mapping and the
activation moves testable without GPUs.
"""
from __future__ import annotations

import re

from levante.errors import InvalidTopology

_ENTRY = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
AUTO_FRACTION = 0.9


def parse(text: str) -> list[tuple[int, int]] | str:
    """"auto", or [(ordinal, layer count), ...] in order."""
    text = text.strip()
    if text.lower() == "auto":
        return "auto"
    entries, seen = [], set()
    for part in filter(None, (p.strip() for p in text.split(";"))):
        m = _ENTRY.match(part)
        if m is None:
            raise InvalidTopology(f"device map entry '{part}': expected ORDINAL:LAYERS, e.g. \"0:12;1:12\", or auto")
        ordinal, count = int(m.group(1)), int(m.group(2))
        if ordinal in seen:
            raise InvalidTopology(f"device map entry '{part}': device {ordinal} is listed twice")
        seen.add(ordinal)
        entries.append((ordinal, count))
    if not entries:
        raise InvalidTopology(f"device map '{text}' is empty: expected ORDINAL:LAYERS;... or auto")
    return entries


def assign(entries: list[tuple[int, int]], num_layers: int, device_type: str) -> list[str]:
    """Each layer's device string for an explicit map."""
    total = sum(count for _, count in entries)
    if total > num_layers:
        raise InvalidTopology(f"device map places {total} layers but the model has {num_layers}")
    out = []
    for ordinal, count in entries:
        out += [_device(device_type, ordinal)] * count
    return out + ["cpu"] * (num_layers - total)


def auto_assign(layer_bytes: list[int], capacities: list[int], device_type: str,
                reserve: int = 0) -> list[str]:
    """Fill devices in order, device i holding layers while their bytes fit `capacities[i]`
    (`reserve` is kept free on the first device for the embedding and head); the rest on the CPU."""
    out, ordinal = [], 0
    room = capacities[0] - reserve if capacities else 0
    for size in layer_bytes:
        while ordinal < len(capacities) and size > room:
            ordinal += 1
            room = capacities[ordinal] if ordinal < len(capacities) else 0
        if ordinal >= len(capacities):
            out.append("cpu")
            continue
        out.append(_device(device_type, ordinal))
        room -= size
    return out


def free_memory(device_type: str) -> list[int]:
    """Usable bytes on each visible device of `device_type` (none for the CPU)."""
    import torch

    if device_type != "cuda" or not torch.cuda.is_available():
        return []
    return [int(torch.cuda.mem_get_info(i)[0] * AUTO_FRACTION) for i in range(torch.cuda.device_count())]


def _device(device_type: str, ordinal: int) -> str:
    return "cpu" if device_type == "cpu" else f"{device_type}:{ordinal}"

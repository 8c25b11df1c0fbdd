"""Topology files: per-layer device and in-situ quantization, in mistral.rs's YAML shape.

    0-16:              # layers 0..15 (start inclusive, end exclusive)
      device: cuda[0]
      isq: int4
    16-32:
      device: cuda[1]
    20: {isq: int8}    # one layer
    '/mlp\\.down_proj\\.weight$/':   # a regex over parameter names
      isq: int8

Keys are layer ranges `START-END`, single layers `N`, or regular expressions between
slashes, matched (`search`, by RE2: user_regex.py) against levante's parameter names, e.g.
`model.layers.3.self_attn.qkv_proj.weight`, `model.layers.3.mlp.down_proj.weight`
(q/k/v and gate/up are fused: `qkv_proj`, `gate_up_proj`).

Values: `device` (`cpu`, `cuda`, `cuda[N]` or `cuda:N`) and `isq` (`int8`, `int4`,
`none`, or a mistral.rs type name mapped to the nearest: Q4_0/Q4_1/Q4K/Q3K/Q2K/HQQ4 ->
int4; Q5_0/Q5_1/Q5K/Q6K/Q8_0/Q8_1/Q8K/HQQ8/FP8 -> int8). Both optional.

Resolution, as mistral.rs documents it:
* overlapping ranges: the range with the higher end wins; with equal ends, the later key.
* a layer covered by a range gets that range's values; a covered layer without `isq` keeps
  the checkpoint's own form (dense safetensors; GGUF blocks stay packed), whatever
  `--isq` says. Layers no key covers follow `--isq` and `--device`.
* regex keys win over ranges for the weights they match; among regex keys the later wins.
  A regex `device` moves that one module: its inputs go to the device and its output
  comes back.
* the embedding sits with the first layer, the final norm and head with the last.

Every error names the offending key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from levante.errors import InvalidTopology
from levante.user_regex import compile_user_regex

_DEVICE = re.compile(r"^(cpu|cuda)(?:\[(\d+)\]|:(\d+))?$")
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
ISQ_TYPES = {"int8": "int8", "int4": "int4", "none": "none"}
ISQ_TYPES.update({name: "int4" for name in ("q4_0", "q4_1", "q4k", "q3k", "q2k", "hqq4")})
ISQ_TYPES.update({name: "int8" for name in ("q5_0", "q5_1", "q5k", "q6k", "q8_0", "q8_1", "q8k", "hqq8", "fp8",
                                            "f8e4m3")})
_FIELDS = ("device", "isq")


@dataclass(frozen=True)
class LayerSpec:
    device: str | None = None  # a torch device string ("cpu", "cuda:1"); None: the default device
    isq: str | None = None  # "int8" | "int4" | "none"; None: the checkpoint's own form
    key: str = ""  # the selector it came from, for messages


@dataclass
class _Range:
    start: int
    end: int
    index: int
    spec: LayerSpec


class Topology:
    def __init__(self, ranges: list[_Range], patterns: list[tuple[object, LayerSpec]]):
        self.ranges = ranges
        self.patterns = patterns

    @classmethod
    def from_file(cls, path: str | Path) -> "Topology":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise InvalidTopology(f"cannot read topology file '{path}': {e.strerror or e}") from None
        return cls.from_yaml(text, source=str(path))

    @classmethod
    def from_yaml(cls, text: str, source: str = "topology") -> "Topology":
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InvalidTopology(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
        return cls.from_dict(data if data is not None else {}, source)

    @classmethod
    def from_dict(cls, data, source: str = "topology") -> "Topology":
        if not isinstance(data, dict):
            raise InvalidTopology(f"{source}: expected a mapping of layer ranges or /regex/ keys to "
                                  f"{{device, isq}}, got {type(data).__name__}")
        ranges, patterns = [], []
        for index, (raw_key, value) in enumerate(data.items()):
            key = str(raw_key)
            spec = _spec(key, value, source)
            if isinstance(raw_key, str) and len(key) >= 2 and key.startswith("/") and key.endswith("/"):
                patterns.append((compile_user_regex(key[1:-1], f"{source}: key '{key}'", InvalidTopology), spec))
                continue
            start, end = _layer_range(key, raw_key, source)
            ranges.append(_Range(start, end, index, spec))
        return cls(ranges, patterns)

    @property
    def sets_devices(self) -> bool:
        return any(r.spec.device for r in self.ranges) or any(s.device for _, s in self.patterns)

    def layers(self, num_layers: int) -> list[LayerSpec | None]:
        """Each decoder layer's spec (None: no key covers it)."""
        out: list[LayerSpec | None] = [None] * num_layers
        for r in sorted(self.ranges, key=lambda r: (r.end, r.index)):
            if r.end > num_layers:
                raise InvalidTopology(f"topology key '{r.spec.key}': layer {r.end - 1} is beyond the model's "
                                      f"{num_layers} layers (0-{num_layers - 1})")
            for i in range(r.start, r.end):
                out[i] = r.spec
        return out

    def match(self, name: str) -> LayerSpec | None:
        """The spec of the last regex key matching parameter `name`, or None."""
        for pattern, spec in reversed(self.patterns):
            if pattern.search(name):
                return spec
        return None


def _layer_range(key: str, raw_key, source: str) -> tuple[int, int]:
    if isinstance(raw_key, int) and not isinstance(raw_key, bool):
        start, end = raw_key, raw_key + 1
    elif (m := _RANGE.match(key)) is not None:
        start, end = int(m.group(1)), int(m.group(2))
    elif key.strip().isdigit():
        start = int(key)
        end = start + 1
    else:
        raise InvalidTopology(f"{source}: key '{key}': expected a layer range START-END, a layer number "
                              "or a /regex/")
    if start < 0 or end <= start:
        raise InvalidTopology(f"{source}: key '{key}': the range end must be greater than its start "
                              "(start inclusive, end exclusive)")
    return start, end


def _spec(key: str, value, source: str) -> LayerSpec:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise InvalidTopology(f"{source}: key '{key}': expected a mapping with 'device' and/or 'isq', "
                              f"got {value!r}")
    unknown = [str(k) for k in value if k not in _FIELDS]
    if unknown:
        raise InvalidTopology(f"{source}: key '{key}': unknown field '{unknown[0]}' (allowed: device, isq)")
    device = value.get("device")
    if device is not None:
        device = parse_device(str(device), f"{source}: key '{key}'")
    isq = value.get("isq")
    if isq is not None:
        isq = ISQ_TYPES.get(str(isq).lower())
        if isq is None:
            raise InvalidTopology(f"{source}: key '{key}': unknown isq type '{value.get('isq')}' "
                                  f"(use int8, int4, none, or a mistral.rs name such as Q4K, Q8_0)")
    return LayerSpec(device=device, isq=isq, key=key)


def parse_device(text: str, where: str = "device") -> str:
    """`cpu`, `cuda`, `cuda[N]`, `cuda:N` -> a torch device string."""
    m = _DEVICE.match(text.strip().lower())
    if m is None:
        raise InvalidTopology(f"{where}: device '{text}' must be cpu, cuda, cuda[N] or cuda:N")
    kind, ordinal = m.group(1), m.group(2) or m.group(3)
    return kind if ordinal is None else f"{kind}:{int(ordinal)}"

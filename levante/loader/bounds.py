"""Bounds on what a checkpoint declares, checked before anything is built from it.

One checker for every format: a Hugging Face `config.json` (text_config merged, as
`ModelConfig.text_fields` reads it) and the config a GGUF file's metadata gives (loader/gguf.py).
The counts the engine turns into per-layer structures, tables and tensors (layers, heads, widths,
vocabulary, positions, experts) must be positive integers under sane maxima, the layers must
have tensors of their own in the checkpoint, and the model they describe must be no larger than
the tensors the checkpoint holds. So a file cannot make levante allocate what it does not hold,
and a refusal is one line that names the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from levante.errors import ModelLoadError

# Far beyond any released model (the largest have ~200 layers, 128 heads, hidden 2^15, a
# 2^18 vocabulary, 10M positions, 512 experts), far below what would exhaust memory to build.
MAXIMA = {
    "num_hidden_layers": 1 << 12,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "head_dim": 1 << 12,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "vocab_size": 1 << 24,
    "max_position_embeddings": 1 << 26,
    "num_local_experts": 1 << 12,
    "num_experts": 1 << 12,
    "num_experts_per_tok": 1 << 12,
}
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# May be 0 (a dense model) or absent.
OPTIONAL_ZERO = ("num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size")
# The encoders of a multimodal config (vision, audio): their counts, as bounded as the text model's.
TOWERS = ("vision_config", "audio_config")
TOWER_COUNTS = {"depth": "num_hidden_layers", "num_hidden_layers": "num_hidden_layers",
                "conf_num_hidden_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                "num_attention_heads": "num_attention_heads", "hidden_size": "hidden_size",
                "intermediate_size": "intermediate_size", "out_hidden_size": "hidden_size"}
# Path parts after which a number is a layer index: model.layers.3., encoder.layer.3., h.3., blocks.3.
LAYER_WORDS = frozenset({"layers", "layer", "h", "blocks", "blk"})


@dataclass(frozen=True)
class Held:
    """What a checkpoint holds: the elements of all its tensors, and how many layers (the highest
    layer index in its tensor names, plus one)."""

    parameters: int
    layers: int

    @classmethod
    def of(cls, shapes: dict[str, list[int]]) -> "Held":
        """From tensor name -> shape."""
        parameters, layers = 0, 0
        for name, shape in shapes.items():
            elements = 1
            for size in shape:
                elements *= size
            parameters += elements
            layers = max(layers, layer_index(name) + 1)
        return cls(parameters, layers)


def layer_index(name: str) -> int:
    """The layer a tensor name belongs to (`model.layers.12.mlp...` -> 12); -1 for none."""
    parts = name.split(".")
    indices = [int(parts[i + 1]) for i in range(len(parts) - 1)
               if parts[i] in LAYER_WORDS and parts[i + 1].isdigit() and len(parts[i + 1]) < 10]
    return max(indices, default=-1)


def check_model(config: dict[str, Any], held: Held | None, source: str) -> None:
    """ModelLoadError (one line, naming the field) unless `config`'s sizes are sane and, with `held`,
    fit the tensors the checkpoint holds. `source` says where the config came from, for the message
    ("<path>/config.json", "<path>: GGUF metadata")."""
    for key in MAXIMA:
        check_count(config, key, source)
    widths = config["intermediate_size"]
    layers = config["num_hidden_layers"]
    if isinstance(widths, list) and len(widths) != layers:
        raise ModelLoadError(f"{source} gives {len(widths)} feed-forward widths for {layers} layers")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv_heads:
        raise ModelLoadError(f"{source}: {heads} attention heads cannot share {kv_heads} key/value heads")
    experts = config.get("num_local_experts") or config.get("num_experts") or 0
    if (config.get("num_experts_per_tok") or 0) > experts and experts:
        raise ModelLoadError(f"{source} routes each token to {config['num_experts_per_tok']} of {experts} experts")
    for tower in TOWERS:
        _check_tower(config.get(tower), f"{source} {tower}", held)
    if held is None:
        return
    check_layers(source, "num_hidden_layers", layers, held.layers)
    declared = parameter_count(config)
    if declared > 2 * held.parameters + (1 << 20):
        raise ModelLoadError(f"{source} describes a model of ~{declared:,} parameters, the checkpoint holds "
                             f"{held.parameters:,}")


def _check_tower(tower: Any, source: str, held: Held | None) -> None:
    """A vision or audio encoder's counts (absent ones are its own defaults)."""
    if tower is None:
        return
    if not isinstance(tower, dict):
        raise ModelLoadError(f"{source} is not an object")
    for key, like in TOWER_COUNTS.items():
        check_count(tower, key, source, like, required=False)
    layers = next((tower[key] for key in ("depth", "num_hidden_layers", "conf_num_hidden_layers")
                   if tower.get(key) is not None), None)
    if held is not None and layers is not None:
        check_layers(source, "its layer count", layers, held.layers)


def check_count(config: dict[str, Any], key: str, source: str, like: str | None = None,
                required: bool | None = None) -> None:
    """`config[key]` (each entry, for a per-layer list) is an integer from 1 (0 for the optional expert
    fields) to the maximum of `like` (default: the key itself); absent is fine but for REQUIRED."""
    like = like or key
    if key not in config or config[key] is None:
        if key in REQUIRED if required is None else required:
            raise ModelLoadError(f"{source} lacks {key}")
        return
    value = config[key]
    values = value if isinstance(value, list) and key == "intermediate_size" else [value]
    least = 0 if key in OPTIONAL_ZERO else 1
    for item in values:
        if isinstance(item, bool) or not isinstance(item, int) or not least <= item <= MAXIMA[like]:
            shown = repr(value) if len(repr(value)) < 60 else repr(value)[:60] + "..."
            raise ModelLoadError(f"{source} gives {key} = {shown}, which must be an integer from {least} to "
                                 f"{MAXIMA[like]:,}")


def check_layers(source: str, key: str, declared: int, held: int, holder: str = "the checkpoint") -> None:
    """Every declared layer has tensors of its own: a count past the highest layer held is refused
    before any per-layer list is built."""
    if isinstance(declared, bool) or not isinstance(declared, int) or not 1 <= declared <= held:
        raise ModelLoadError(f"{source} gives {key} = {declared!r}, {holder} holds tensors of {held} layers")


def parameter_count(config: dict[str, Any]) -> int:
    """At least how many parameters a model of `config` has: the embedding once, attention and MLP
    weights per layer (a mixture's layers counted at the smaller of its dense and expert widths, as
    some layers of it may be dense)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    layers = config["num_hidden_layers"]
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    widths = config["intermediate_size"]
    width_sum = sum(widths) if isinstance(widths, list) else widths * layers
    experts = config.get("num_local_experts") or config.get("num_experts") or 0
    if experts and config.get("moe_intermediate_size"):
        width_sum = min(width_sum, experts * config["moe_intermediate_size"] * layers)
    return config["vocab_size"] * hidden + attention * layers + 3 * hidden * width_sum

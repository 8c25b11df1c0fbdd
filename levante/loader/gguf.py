"""A GGUF checkpoint seen the Hugging Face way: metadata, a config.json dict, and tensors
under transformers parameter names and layouts.

llama.cpp's converter changes a few weights on the way in (Q/K rows permuted for
``llama``, ``+1`` folded into Gemma norms); they are undone here exactly as
transformers' GGUF loader undoes them, so a model built for HF checkpoints loads both.
It also stacks a mixture's experts into one 3-D tensor per matrix (``ffn_gate_exps``,
...): they come out again one expert at a time, as HF checkpoints store them (each a
view of the stack's bytes, so quantised experts stay quantised), and Mixtral, which
llama.cpp files as ``llama`` with ``llama.expert_count`` set, comes back as Mixtral.
"""
from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFReader, GGUFValueType

from levante.errors import ModelLoadError, UnsupportedArchitecture
from levante.loader import bounds
from levante.loader.bounds import Held, layer_index
from levante.loader.gguf_metadata import check_field_types, read_gguf_metadata
from levante.loader.memory import trim_heap
from levante.quant.gguf_blocks import GGUFTensor, as_bytes, dequantize

_HF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "gemma3n": ("Gemma3nForCausalLM", "gemma3n_text"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}
_MIXTRAL = ("MixtralForCausalLM", "mixtral")  # a "llama" file with experts
SUPPORTED_ARCHITECTURES = tuple(sorted(_HF_ARCHITECTURES))

_TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 normalises around the attention and the MLP both before and after.
_GEMMA3_LAYER_NAMES = _LAYER_NAMES | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 keeps q/k/v and gate/up fused ("ffn_up" holds gate then up).
_PHI3_LAYER_NAMES = _LAYER_NAMES | {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# Mixtures of experts: the router, and each matrix's experts stacked ("{index}": one per expert).
_QWEN3MOE_LAYER_NAMES = _LAYER_NAMES | {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{index}.gate_proj",
    "ffn_up_exps": "mlp.experts.{index}.up_proj",
    "ffn_down_exps": "mlp.experts.{index}.down_proj",
}
_MIXTRAL_LAYER_NAMES = _LAYER_NAMES | {
    "ffn_gate_inp": "block_sparse_moe.gate",
    "ffn_gate_exps": "block_sparse_moe.experts.{index}.w1",
    "ffn_up_exps": "block_sparse_moe.experts.{index}.w3",
    "ffn_down_exps": "block_sparse_moe.experts.{index}.w2",
}
# Gemma 3n (llama.cpp's names, gguf's MODEL_TENSORS[GEMMA3N]): no +1 in its norms; AltUp's projections are
# stored stacked, one [n - 1, hidden, hidden] tensor each, split back into transformers' per-stream matrices.
_GEMMA3N_TOP_LEVEL_NAMES = _TOP_LEVEL_NAMES | {
    "per_layer_token_embd": "model.embed_tokens_per_layer", "per_layer_model_proj": "model.per_layer_model_projection",
    "per_layer_proj_norm": "model.per_layer_projection_norm",
}
_STACKED_NAMES = {"altup_proj": "model.altup_projections", "altup_unembd_proj": "model.altup_unembed_projections"}
_GEMMA3N_LAYER_NAMES = _GEMMA3_LAYER_NAMES | {
    "inp_gate": "per_layer_input_gate", "proj": "per_layer_projection", "post_norm": "post_per_layer_input_norm",
    "altup_correct_coef": "altup.correction_coefs", "altup_predict_coef": "altup.prediction_coefs",
    "altup_router": "altup.modality_router", "altup_router_norm": "altup.router_norm",
    "laurel_l": "laurel.linear_left", "laurel_r": "laurel.linear_right", "laurel_post_norm": "laurel.post_laurel_norm",
}
_ARCH_LAYER_NAMES = {"gemma3": _GEMMA3_LAYER_NAMES, "gemma3n": _GEMMA3N_LAYER_NAMES, "phi3": _PHI3_LAYER_NAMES,
                     "qwen3moe": _QWEN3MOE_LAYER_NAMES}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Precomputed RoPE frequencies (Llama 3.x) and LongRoPE factors (Phi-3): RoPE settings, not parameters.
_NOT_PARAMETERS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
_REQUIRED = object()
# Arrays longer than this (the vocabulary, its merges) are not kept in memory: ~90 MB of
# Python strings for a 150k vocabulary, which the tokenizer reads for itself.
_LARGE_ARRAY = 4096
# Gemma 3: every sixth layer attends globally, the others within the sliding window.
GEMMA3_SLIDING_WINDOW_PATTERN = 6


_U64 = struct.Struct("<Q")


class _Reader(GGUFReader):
    """GGUFReader over a plain ndarray view of the memmap, and bounds-checked.

    Every slice of an ``np.memmap`` runs ``memmap.__array_finalize__``, which makes
    parsing a 150k-token vocabulary about 3x slower; and reading past the end of a
    truncated file should say so rather than fail in a reshape.
    """

    @property
    def data(self) -> np.ndarray:
        return self._bytes

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._bytes = value.view(np.ndarray)
        self._mmap = getattr(value, "_mmap", None)

    def release(self, offset: int, size: int) -> None:
        """Drop this process's resident pages of bytes [offset, offset + size) of the file.

        The map is private and never written, so a later read just faults the pages back
        in from the file (or the page cache); meanwhile they stop counting in our RSS.
        """
        page = mmap.PAGESIZE
        start, end = -(-offset // page) * page, (offset + size) // page * page
        if self._mmap is not None and end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def _get(self, offset, dtype, count=1, override_order=None):
        end = int(offset) + int(count) * np.dtype(dtype).itemsize
        if end > self._bytes.size:
            raise _Truncated(f"needs byte {end} but the file has {self._bytes.size}")
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(self, orig_offs, raw_type):
        """Arrays longer than ``_LARGE_ARRAY`` (the vocabulary) are stepped over rather than
        parsed into a numpy view per element (seconds for a 150k vocabulary): ``GGUFFile`` only
        needs their length, and the tokenizer reads them itself (gguf_metadata.py)."""
        if raw_type == GGUFValueType.ARRAY and self.byte_order == "I":
            item_type, count = struct.unpack_from("<IQ", self._bytes, int(orig_offs)) if \
                int(orig_offs) + 12 <= self._bytes.size else (None, 0)
            if count > _LARGE_ARRAY and item_type != GGUFValueType.ARRAY:
                size = 12 + self._array_bytes(int(orig_offs) + 12, GGUFValueType(item_type), count)
                header = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]
                return size, header, [0] * count, [GGUFValueType.ARRAY, GGUFValueType(item_type)]
        return super()._get_field_parts(orig_offs, raw_type)

    def _array_bytes(self, offset: int, item_type: GGUFValueType, count: int) -> int:
        if item_type != GGUFValueType.STRING:
            size = count * np.dtype(self.gguf_scalar_to_np[item_type]).itemsize
        else:  # each string is a u64 length and its bytes: one tight loop (it runs 300k times per start)
            length_at, end = _U64.unpack_from, offset
            with memoryview(self._bytes) as view:
                try:
                    for _ in range(count):
                        end += 8 + length_at(view, end)[0]
                except struct.error:  # a length read past the end of the file
                    raise _Truncated(f"an array runs past the end of the file ({view.nbytes} bytes)") from None
            size = end - offset
        if offset + size > self._bytes.size:
            raise _Truncated(f"an array needs byte {offset + size} but the file has {self._bytes.size}")
        return size


class _Truncated(Exception):
    pass


def _open_reader(path: Path) -> GGUFReader:
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        with path.open("rb") as stream:
            magic = stream.read(4)
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot read ({error.strerror})") from None
    if len(magic) < 4 or int.from_bytes(magic, "little") != GGUF_MAGIC:
        raise ModelLoadError(f"{path}: not a GGUF file (bad magic {magic!r})")
    try:
        # Copy-on-write: tensors handed out are writable without touching the file.
        return _Reader(path, mode="c")
    except _Truncated as error:
        raise ModelLoadError(f"{path}: truncated or corrupt GGUF file ({error})") from None
    except Exception as error:  # gguf raises ValueError, KeyError, IndexError, ... on bad headers
        raise ModelLoadError(f"{path}: corrupt GGUF header or metadata ({type(error).__name__}: {error})") from None


class GGUFFile:
    """One GGUF file, memory-mapped; tensors are read only when asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = _open_reader(self.path)
        self._check_tensor_bounds()
        fields = self._reader.fields
        self._array_lengths = {key: len(field.data) for key, field in fields.items()
                               if field.types[:1] == [GGUFValueType.ARRAY] and len(field.data) > _LARGE_ARRAY}
        try:
            self.metadata: dict[str, Any] = {key: field.contents() for key, field in fields.items()
                                             if key not in self._array_lengths}
        except Exception as error:
            raise ModelLoadError(f"{self.path}: unreadable GGUF metadata ({error})") from None
        check_field_types(self.metadata, self.path)
        fields.clear()  # the reader's numpy views of the metadata, freed now (no cycles: no collection)
        trim_heap()
        self.architecture: str = self.metadata.get("general.architecture", "")
        if not self.architecture:
            raise ModelLoadError(f"{self.path}: GGUF metadata has no general.architecture")
        self._tensors = {tensor.name: tensor for tensor in self._reader.tensors}

    def _check_tensor_bounds(self) -> None:
        """Every tensor inside the data section, at an aligned offset (the reader adds offsets in
        unsigned 64-bit arithmetic: a huge one wraps around to point into the header)."""
        size, start = self._reader.data.size, self._reader.data_offset
        for tensor in self._reader.tensors:
            offset, end = tensor.data_offset, tensor.data_offset + tensor.n_bytes
            if offset < start or (offset - start) % self._reader.alignment:
                raise ModelLoadError(f"{self.path}: corrupt GGUF file (tensor {tensor.name} has a bad data offset)")
            if end > size:
                raise ModelLoadError(
                    f"{self.path}: truncated GGUF file (tensor {tensor.name} ends at byte {end}, file has {size})"
                )

    @property
    def tensor_count(self) -> int:
        return len(self._tensors)

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value (arrays as lists), or ``default`` when the key is absent.
        Large arrays are read from the file again on each call."""
        if key in self._array_lengths:
            return read_gguf_metadata(self.path, prefixes=(key,)).get(key, default)
        return self.metadata.get(key, default)

    def _arch_field(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.metadata.get(f"{self.architecture}.{key}", default)
        if value is _REQUIRED:
            raise ModelLoadError(f"{self.path}: GGUF metadata lacks {self.architecture}.{key}")
        return value

    def _require_supported(self) -> None:
        if self.architecture not in _HF_ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"{self.path}: GGUF architecture '{self.architecture}' is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )

    # -- config ---------------------------------------------------------------------------

    def hf_config(self) -> dict[str, Any]:
        """The transformers ``config.json`` this checkpoint was converted from, as far as
        GGUF records it (plus ``rope_parameters`` in transformers 5 form)."""
        self._require_supported()
        hf_class, model_type = _MIXTRAL if self._is_mixtral else _HF_ARCHITECTURES[self.architecture]
        hidden = self._arch_count("embedding_length")
        heads = self._arch_count("attention.head_count")
        rope_theta = float(self._arch_field("rope.freq_base", 10000.0))
        layers = self._layer_count()
        config = {
            "architectures": [hf_class],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": self._arch_field("feed_forward_length"),
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": self._arch_field("attention.head_count_kv", heads),
            "head_dim": self._arch_field("attention.key_length", hidden // heads),
            "rms_norm_eps": self._arch_field("attention.layer_norm_rms_epsilon"),
            "rope_theta": rope_theta,
            "rope_scaling": self._rope_scaling(),
            "max_position_embeddings": self._arch_field("context_length"),
            "vocab_size": self._vocab_size(),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.field("tokenizer.ggml.padding_token_id"),
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
            "hidden_act": "silu",
            "sliding_window": None,
            "layer_types": ["full_attention"] * layers,
        }
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta} | (config["rope_scaling"] or {})
        if self.architecture == "gemma3":
            config["sliding_window"] = self._arch_field("attention.sliding_window")
            _add_gemma3_fields(config)
        if self.architecture == "gemma3n":
            self._add_gemma3n_fields(config)
        if self.architecture == "phi3":
            self._add_phi3_fields(config)
        if self._arch_field("expert_count", 0):
            config["num_local_experts"] = self._arch_count("expert_count")
            config["num_experts_per_tok"] = self._arch_count("expert_used_count")
            config["moe_intermediate_size"] = self._arch_field("expert_feed_forward_length",
                                                               config["intermediate_size"])
            config["norm_topk_prob"] = True  # llama.cpp renormalises for both Mixtral and Qwen3-MoE
        self._check_sizes(config)
        return config

    @property
    def _is_mixtral(self) -> bool:
        return self.architecture == "llama" and bool(self._arch_field("expert_count", 0))

    def _add_phi3_fields(self, config: dict[str, Any]) -> None:
        """Phi-3's RoPE dimensions (Phi-4-mini rotates part of each head) and LongRoPE, whose
        factors llama.cpp's converter stores as tensors. `phi3.attention.sliding_window` is
        left unused, as llama.cpp leaves it (its converter's value is not to be trusted)."""
        rotary = self._arch_field("rope.dimension_count", config["head_dim"])
        if not 0 < rotary <= config["head_dim"] or rotary % 2:
            raise ModelLoadError(f"{self.path}: GGUF metadata phi3.rope.dimension_count is {rotary}, "
                                 f"must be even and within the head size {config['head_dim']}")
        config["partial_rotary_factor"] = rotary / config["head_dim"]
        original = self._arch_field("rope.scaling.original_context_length", config["max_position_embeddings"])
        config["original_max_position_embeddings"] = original
        if "rope_factors_long.weight" in self._tensors:
            factors = {key: self._float_tensor(f"rope_factors_{kind}.weight").tolist()
                       for key, kind in (("long_factor", "long"), ("short_factor", "short"))}
            config["rope_scaling"] = {"rope_type": "longrope", **factors,
                                      "original_max_position_embeddings": original,
                                      "attention_factor": self._arch_field("rope.scaling.attn_factor", None)}
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"],
                                     "partial_rotary_factor": config["partial_rotary_factor"]} \
            | (config["rope_scaling"] or {})

    def _float_tensor(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        return dequantize(tensor.data, tensor.tensor_type, tuple(reversed(tensor.shape.tolist())))

    def _add_gemma3n_fields(self, config: dict[str, Any]) -> None:
        """Gemma 3n's settings, as llama.cpp's converter writes them (and transformers' defaults otherwise)."""
        _add_gemma3_fields(config)
        swa = self._arch_field("attention.sliding_window_pattern", None)
        if swa is None:  # llama.cpp's fixed pattern: four sliding layers, then a full one
            swa = [(i + 1) % 5 != 0 for i in range(config["num_hidden_layers"])]
        config["layer_types"] = ["sliding_attention" if s else "full_attention" for s in swa]
        local = self._arch_field("rope.freq_base_swa", None)
        if local is not None:
            config["rope_parameters"]["sliding_attention"]["rope_theta"] = float(local)
        config["sliding_window"] = self._arch_field("attention.sliding_window")
        config["query_pre_attn_scalar"] = None
        config["final_logit_softcapping"] = self._arch_field("final_logit_softcapping", 30.0)
        config["hidden_size_per_layer_input"] = self._arch_field("embedding_length_per_layer_input")
        config["altup_num_inputs"] = self._arch_field("altup.num_inputs", 4)
        config["altup_active_idx"] = self._arch_field("altup.active_idx", 0)
        config["num_kv_shared_layers"] = self._arch_field("attention.shared_kv_layers", 0)
        # the converter stores each layer's std multiplier Phi^-1(sparsity); -inf for dense layers
        multipliers = self._arch_field("activation_sparsity_scale", None)
        if multipliers is not None:
            normal = torch.distributions.Normal(0.0, 1.0)
            config["activation_sparsity_pattern"] = [float(normal.cdf(torch.tensor(m))) for m in multipliers]
        for key, tensor in (("vocab_size_per_layer_input", "per_layer_token_embd.weight"),
                            ("laurel_rank", "blk.0.laurel_l.weight")):
            if tensor not in self._tensors:
                raise ModelLoadError(f"{self.path}: a Gemma 3n GGUF without {tensor}")
            config[key] = int(self._tensors[tensor].shape[-1])

    def _layer_count(self) -> int:
        """block_count, bounded by the file: every layer has tensors of its own (`blk.N.*`), so a
        count past the highest layer the file holds is refused before any per-layer list is built."""
        layers = self._arch_field("block_count")
        held = 1 + max((layer_index(name) for name in self._tensors), default=-1)
        bounds.check_layers(f"{self.path}: GGUF metadata", f"{self.architecture}.block_count", layers, held,
                            "the file")
        return layers

    def _arch_count(self, key: str) -> int:
        """A required count (a size, a number of heads or layers): at least 1."""
        value = self._arch_field(key)
        if value < 1:
            raise ModelLoadError(f"{self.path}: GGUF metadata {self.architecture}.{key} is {value}, must be at least 1")
        return value

    def _check_sizes(self, config: dict[str, Any]) -> None:
        """Sizes a model can be built from, and a model no larger than the file's tensors (the bounds
        every format meets, loader/bounds.py): the metadata cannot make levante allocate what the
        file does not hold."""
        held = Held(sum(int(t.n_elements) for t in self._tensors.values()), config["num_hidden_layers"])
        bounds.check_model(config, held, f"{self.path}: GGUF metadata")

    def _vocab_size(self) -> int:
        """Declared, else the token list's length (as transformers does), else the embedding's rows."""
        size = self._arch_field("vocab_size", None) or self._array_lengths.get("tokenizer.ggml.tokens") \
            or len(self.field("tokenizer.ggml.tokens") or [])
        if not size and "token_embd.weight" in self._tensors:
            size = int(self._tensors["token_embd.weight"].shape[-1])
        return size

    def _rope_scaling(self) -> dict[str, Any] | None:
        """``{arch}.rope.scaling.*`` in transformers' ``rope_scaling`` form, or None."""
        kind = self._arch_field("rope.scaling.type", None)
        factor = self._arch_field("rope.scaling.factor", None)
        if kind is None and self._arch_field("rope.scale_linear", None) is not None:
            kind, factor = "linear", self._arch_field("rope.scale_linear")
        if kind in (None, "none"):
            return None
        scaling = {"rope_type": kind, "factor": float(factor if factor is not None else 1.0)}
        for gguf_key, hf_key in [
            ("rope.scaling.original_context_length", "original_max_position_embeddings"),
            ("rope.scaling.attn_factor", "attention_factor"),
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
        ]:
            if (value := self._arch_field(gguf_key, None)) is not None:
                scaling[hf_key] = value
        return scaling

    # -- tensors --------------------------------------------------------------------------

    def raw_tensors(self) -> Iterator[tuple[str, GGMLQuantizationType, torch.Tensor, tuple[int, ...]]]:
        """``(hf_name, qtype, raw bytes, hf_shape)`` for every parameter, still quantised.

        The bytes have shape ``hf_shape[:-1] + (bytes_per_row,)``; Q/K rows are already
        un-permuted. Tensors whose values transformers changes (Gemma norms) come back
        dequantised, as F32 bytes.
        """
        for name, hf_name, tensor, shape, data in self._parameters():
            qtype = tensor.tensor_type
            if self._shifts_values(name):
                values = self._undo_conversion(name, dequantize(data, qtype, shape))
                yield hf_name, GGMLQuantizationType.F32, values.view(torch.uint8).view(*shape[:-1], -1), shape
                continue
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            raw = as_bytes(data).view(*shape[:-1], shape[-1] // block_size * type_size)
            yield hf_name, qtype, self._unpermute(name, raw), shape

    def quantized_tensors(self) -> Iterator[tuple[str, GGUFTensor | torch.Tensor]]:
        """``(hf_name, tensor)`` with block-quantised tensors left as ``GGUFTensor`` (float
        ones come as float32 tensors), for layers that keep weights packed.

        The pages of the mapped file are released as loading moves on, so the file does not
        stay resident beside the packed copies: a block's tensors once the next block
        starts (a fused q/k/v or gate/up is read when its last shard arrives), others at once.
        """
        block, held = None, []
        for (hf_name, qtype, raw, shape), tensor in zip(self.raw_tensors(), self._parameter_tensors()):
            match = _LAYER_TENSOR.fullmatch(tensor.name)
            if match is None or match[1] != block:
                self._release(held)
                block, held = match and match[1], []
            if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
                yield hf_name, dequantize(raw, qtype, shape)
            else:
                yield hf_name, GGUFTensor(GGMLQuantizationType(qtype), raw, shape)
            if not held or held[-1] is not tensor:  # a stack of experts: once, not once per expert
                held.append(tensor)
            if block is None:
                self._release(held)
                held = []
        self._release(held)

    def _release(self, tensors) -> None:
        """Release the tensors' file pages, and the heap pages their conversion freed."""
        for tensor in tensors:
            self._reader.release(tensor.data_offset, tensor.n_bytes)
        trim_heap()

    def _parameters(self):
        """``(gguf_name, hf_name, reader tensor, hf_shape, data)`` for every tensor that is a parameter; a
        stacked tensor (a mixture's experts, Gemma 3n's AltUp projections: ``{index}`` in its name) gives
        one entry per matrix, its slice of the stack (quantised blocks stay blocks)."""
        self._require_supported()
        for name, tensor in self._tensors.items():
            hf_name = self._hf_name(name)
            if hf_name is None:
                continue
            shape = tuple(reversed(tensor.shape.tolist()))
            if "{index}" not in hf_name:
                yield name, hf_name, tensor, shape, tensor.data
                continue
            for index in range(shape[0]):
                yield name, hf_name.format(index=index), tensor, shape[1:], tensor.data[index]

    def _parameter_tensors(self):
        """The reader's tensors in ``raw_tensors``' order."""
        return (tensor for _, _, tensor, _, _ in self._parameters())

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(hf_name, float32 tensor)`` for every parameter, in transformers' layout."""
        for name, hf_name, tensor, shape, data in self._parameters():
            yield hf_name, self._undo_conversion(name, dequantize(data, tensor.tensor_type, shape))

    def _hf_name(self, name: str) -> str | None:
        if name in _NOT_PARAMETERS:
            return None
        base, _, suffix = name.rpartition(".")
        if self.architecture == "gemma3n" and base in _STACKED_NAMES:
            return f"{_STACKED_NAMES[base]}.{{index}}.{suffix}"
        top_level = _GEMMA3N_TOP_LEVEL_NAMES if self.architecture == "gemma3n" else _TOP_LEVEL_NAMES
        if base in top_level:
            return f"{top_level[base]}.{suffix}"
        if self.architecture == "gemma3n" and re.fullmatch(r"blk\.(\d+)\.altup_correct_scale\.weight", name):
            return f"model.layers.{name.split('.')[1]}.altup.correct_output_scale"  # a bare parameter
        layer_names = _MIXTRAL_LAYER_NAMES if self._is_mixtral else _ARCH_LAYER_NAMES.get(self.architecture,
                                                                                            _LAYER_NAMES)
        match = _LAYER_TENSOR.fullmatch(name)
        if match is None or match[2] not in layer_names:
            raise ModelLoadError(f"{self.path}: tensor {name} has no known role in a {self.architecture} model")
        return f"model.layers.{match[1]}.{layer_names[match[2]]}.{match[3]}"

    def _shifts_values(self, name: str) -> bool:
        """llama.cpp stores Gemma's RMSNorm weights as ``1 + w``; transformers keeps ``w``."""
        return self.architecture == "gemma3" and name.endswith("norm.weight")

    def _undo_conversion(self, name: str, values: torch.Tensor) -> torch.Tensor:
        if self._shifts_values(name):
            return values - 1
        return self._unpermute(name, values)

    def _unpermute(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Undo the Q/K row permutation llama.cpp applies to ``llama`` checkpoints.

        HF's RoPE pairs element i of a head with element i + head_dim/2; llama.cpp's pairs
        neighbours, so the converter stored HF row (head, half, i) at (head, i, half).
        """
        if self.architecture != "llama" or not re.search(r"\.attn_[qk]\.", name):
            return rows
        heads = self._arch_field("attention.head_count")
        if ".attn_k." in name:
            heads = self._arch_field("attention.head_count_kv", heads)
        grouped = rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:])
        return grouped.transpose(1, 2).reshape(rows.shape)


def _add_gemma3_fields(config: dict[str, Any]) -> None:
    """Gemma 3 settings GGUF leaves implicit, as llama.cpp and transformers fix them."""
    layers, head_dim = config["num_hidden_layers"], config["head_dim"]
    config["sliding_window_pattern"] = GEMMA3_SLIDING_WINDOW_PATTERN
    config["layer_types"] = [
        "full_attention" if (i + 1) % GEMMA3_SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
        for i in range(layers)
    ]
    config["rope_local_base_freq"] = 10000.0
    # llama.cpp scales queries by hidden/heads for the 62-layer (27B) model, by head_dim otherwise.
    big = layers == 62
    config["query_pre_attn_scalar"] = config["hidden_size"] // config["num_attention_heads"] if big else head_dim
    config["hidden_activation"] = "gelu_pytorch_tanh"
    config.pop("hidden_act")
    config["final_logit_softcapping"] = None
    config["attn_logit_softcapping"] = None
    config["rope_parameters"] = {
        "sliding_attention": {"rope_type": "default", "rope_theta": config["rope_local_base_freq"]},
        "full_attention": {"rope_type": "default", "rope_theta": config["rope_theta"]} | (config["rope_scaling"] or {}),
    }

"""Architecture name -> model class, and loading checkpoint tensors into a model.

Embedding models are chosen by `model_type` instead: their config.json may name
a causal LM (Qwen3-Embedding says `Qwen3ForCausalLM`) or a bare encoder.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from levante.config import ModelConfig
from levante.errors import ModelLoadError, UnsupportedArchitecture
from levante.layers.embedding import VocabParallelEmbedding
from levante.layers.linear import LinearBase
from levante.models.bert import BertModel
from levante.models.cross_encoder import PairScorer, cross_encoder, yes_no_reranker
from levante.models.embedding import (DecoderEncoder, Gemma3Encoder, Qwen2Encoder, Qwen3Encoder,
                                      SentenceEmbeddingModel)
from levante.models.gemma3 import Gemma3ForCausalLM
from levante.models.gemma3_vision import Gemma3ForConditionalGeneration
from levante.models.gemma3n import Gemma3nForCausalLM
from levante.models.gemma3n_multimodal import Gemma3nForConditionalGeneration
from levante.models.llama import LlamaForCausalLM
from levante.models.mistral import MistralForCausalLM
from levante.models.mixtral import MixtralForCausalLM
from levante.models.phi3 import Phi3ForCausalLM
from levante.models.qwen2 import Qwen2ForCausalLM
from levante.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from levante.models.qwen3_vl import Qwen3VLForConditionalGeneration
from levante.models.qwen3 import Qwen3ForCausalLM
from levante.models.qwen3_moe import Qwen3MoeForCausalLM
from levante.models.whisper import WhisperForConditionalGeneration, hf_config as whisper_config
from levante.quant.gguf_blocks import GGUFTensor

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,
    "Gemma3nForCausalLM": Gemma3nForCausalLM,
    "Gemma3nForConditionalGeneration": Gemma3nForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "Qwen3VLForConditionalGeneration": Qwen3VLForConditionalGeneration,
}

# model_type -> the encoder of a sentence-embedding model.
EMBEDDING_ENCODERS: dict[str, type[nn.Module]] = {
    "bert": BertModel,
    "gemma3_text": Gemma3Encoder,
    "qwen3": Qwen3Encoder,
    "qwen2": Qwen2Encoder,
    "llama": DecoderEncoder,
}

# Checkpoint prefixes that wrap the text decoder in multimodal layouts.
_PREFIXES = [("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."), ("model.visual.", "visual.")]


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"unsupported architecture '{architecture}'; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[architecture]


def embedding_encoder_class(model_type: str) -> type[nn.Module]:
    if model_type not in EMBEDDING_ENCODERS:
        raise UnsupportedArchitecture(
            f"unsupported embedding model type '{model_type}'; supported: {', '.join(sorted(EMBEDDING_ENCODERS))}")
    return EMBEDDING_ENCODERS[model_type]


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    cls = model_class(config.architecture)
    return _construct(lambda: cls(config), dtype, device)


def build_embedding_model(config: ModelConfig, pipeline, dtype: torch.dtype,
                          device: torch.device) -> SentenceEmbeddingModel:
    """The encoder for `config.model_type` followed by `pipeline`'s pooling, dense and normalize stages."""
    encoder_cls = embedding_encoder_class(config.model_type)
    return _construct(lambda: SentenceEmbeddingModel(encoder_cls(config), pipeline), dtype, device)


def build_scoring_model(config: ModelConfig, yes_no: tuple[int, int] | None, dtype: torch.dtype,
                        device: torch.device) -> PairScorer:
    """A cross-encoder (`yes_no` None: a `*ForSequenceClassification` checkpoint) or a decoder LLM read
    as a yes/no reranker (its encoder chosen by `model_type`, as an embedding model's is)."""
    if yes_no is None:
        return _construct(lambda: cross_encoder(config), dtype, device)
    encoder_cls = embedding_encoder_class(config.model_type)
    return _construct(lambda: yes_no_reranker(config, encoder_cls(config), *yes_no), dtype, device)


def build_transcription_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    if config.architecture != "WhisperForConditionalGeneration":
        raise UnsupportedArchitecture(f"unsupported speech-recognition architecture '{config.architecture}' "
                                      "(supported: WhisperForConditionalGeneration)")
    return _construct(lambda: WhisperForConditionalGeneration(config), dtype, device)


def family_config(raw: dict) -> dict:
    """A config.json in the names ModelConfig reads, for families that name their sizes otherwise."""
    return whisper_config(raw) if (raw.get("architectures") or [""])[0] == "WhisperForConditionalGeneration" else raw


def _construct(make, dtype: torch.dtype, device: torch.device) -> nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(previous)


def _default_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    param.data.copy_(loaded)


def _set_quantization(model: nn.Module, quantization: str | None, overrides: dict | None = None) -> set[int]:
    """Have every linear and embedding layer keep packed weights (in the mode `overrides`
    gives by module name, else `quantization`; None: dense); the ids of their weight parameters."""
    overrides = overrides or {}
    if quantization is None and not any(overrides.values()):
        return set()
    takes_blocks = set()
    for name, module in model.named_modules():
        if isinstance(module, (LinearBase, VocabParallelEmbedding)) and getattr(module, "quantizable", True):
            module.quantization = overrides.get(name, quantization)
    head, embed = getattr(model, "lm_head", None), _find(model, "model.embed_tokens")
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and head is not None and embed:
        head.quantization = embed.quantization  # one shared matrix: one decision
    for module in model.modules():
        if isinstance(module, (LinearBase, VocabParallelEmbedding)) and module.quantization is not None:
            takes_blocks.add(id(module.weight))
    return takes_blocks


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _our_layout(model: nn.Module, name: str) -> str:
    """A checkpoint tensor's name with its wrapper prefixes (multimodal layouts) rewritten to ours."""
    for old, new in getattr(model, "checkpoint_prefixes", []) + _PREFIXES:  # the model's own layouts first
        if name.startswith(old):
            name = new + name[len(old):]
    return name


def _fused_target(model: nn.Module, name: str, params: dict) -> tuple[str, object]:
    """(our parameter's name, shard id) for a checkpoint name: q/k/v and gate/up land in fused layers,
    unless a parameter of that name takes it unfused."""
    for ckpt_name, (fused, shard) in getattr(model, "packed_modules_mapping", {}).items():
        if name not in params and f".{ckpt_name}." in name:
            return name.replace(f".{ckpt_name}.", f".{fused}."), shard
    return name, None


def lora_targets(model: nn.Module) -> Callable[[str], tuple[str, object, LinearBase]]:
    """For checkpoint module names (``model.layers.0.self_attn.q_proj``): (the decoder's linear layer an
    adapter of that module changes, its name, the shard id in it); ModelLoadError if there is none."""
    params = dict(model.named_parameters())

    def target(name: str) -> tuple[str, object, LinearBase]:
        where, shard_id = _fused_target(model, _our_layout(model, name) + ".weight", params)
        where = where.removesuffix(".weight")
        layer = _find(model, where)
        if not isinstance(layer, LinearBase) or not where.startswith("model.layers."):
            raise ModelLoadError(f"the adapter changes '{name}', which is not a linear layer of the decoder "
                                 "(LoRA applies to attention and MLP projections)")
        if shard_id not in layer.shard_ids:
            raise ModelLoadError(f"the adapter changes '{name}', which {type(model).__name__} does not have")
        return where, shard_id, layer

    return target


def lora_shapes(model: nn.Module) -> Callable[[str], tuple[int, int]]:
    """For checkpoint module names: (out, in) of the matrix an adapter's B and A must fit."""
    target = lora_targets(model)

    def shape(name: str) -> tuple[int, int]:
        _, shard_id, layer = target(name)
        return layer.lora_shape(shard_id)

    return shape


def attach_lora(model: nn.Module, adapter_id: int, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give the decoder's linear layers adapter `adapter_id`'s updates: `modules` maps checkpoint module
    names (``model.layers.0.self_attn.q_proj``) to (A, B with its scaling). All or nothing."""
    per_layer: dict[str, dict] = {}
    target = lora_targets(model)
    for name, pair in modules.items():
        where, shard_id, _ = target(name)
        per_layer.setdefault(where, {})[shard_id] = pair
    try:
        for where, shards in per_layer.items():
            layer = model.get_submodule(where)
            ordered = {shard_id: shards[shard_id] for shard_id in layer.shard_ids if shard_id in shards}
            try:
                layer.set_lora(adapter_id, ordered)
            except RuntimeError as e:
                raise ModelLoadError(f"the adapter's tensors for '{where}' do not fit the model ({e})") from None
    except ModelLoadError:
        detach_lora(model, adapter_id)
        raise


def detach_lora(model: nn.Module, adapter_id: int) -> None:
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.remove_lora(adapter_id)


def _expected_shards(model: nn.Module) -> dict[str, tuple]:
    """Parameter name -> the shards that fill it: a fused linear layer's q/k/v or gate/up
    (each its own checkpoint tensor, or all in one that arrives without a shard id), else one."""
    expected = {name: (None,) for name, _ in model.named_parameters()}
    for module_name, module in model.named_modules():
        if isinstance(module, LinearBase):
            for param_name, _ in module.named_parameters(recurse=False):
                if f"{module_name}.{param_name}" in expected:  # not a second name of a tied parameter
                    expected[f"{module_name}.{param_name}"] = module.shard_ids
    return expected


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 quantization: str | None = None, overrides: dict[str, str | None] | None = None) -> None:
    """Copy checkpoint tensors into `model`, fusing q/k/v and gate/up as its mapping says.

    With `quantization` ("auto", "int8", "int4"; see quant/packed.py) linear and embedding
    layers keep packed weights instead, and checkpoint tensors may arrive as GGUF blocks.
    `overrides` (module name -> mode or None for dense) sets it per module (a topology).
    """
    params = dict(model.named_parameters())
    takes_blocks = _set_quantization(model, quantization, overrides)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    expected = _expected_shards(model)
    loaded: dict[str, set] = {}
    # A model may rename, cut or drop checkpoint tensors (Gemma 3n: the unused k/v of KV-sharing layers,
    # MatFormer slices): `adapt_checkpoint_tensor(name, tensor)` -> (name, tensor), or None to skip it.
    adapt = getattr(model, "adapt_checkpoint_tensor", None)
    for name, tensor in weights:
        name = _our_layout(model, name)
        if adapt is not None:
            adapted = adapt(name, tensor)
            if adapted is None:
                continue
            name, tensor = adapted
        if "rotary_emb." in name or (tied and name == "lm_head.weight"):
            continue
        target, shard_id = _fused_target(model, name, params)
        param = params.get(target)
        if param is None:
            raise ModelLoadError(f"checkpoint tensor '{name}' has no place in {type(model).__name__}")
        if isinstance(tensor, GGUFTensor) and id(param) not in takes_blocks:
            tensor = tensor.dequantize()
        try:
            getattr(param, "weight_loader", _default_loader)(param, tensor, shard_id)
            if tied and getattr(getattr(model, "lm_head", None), "quantization", None) \
                    and target == "model.embed_tokens.weight":
                model.lm_head.load_tied(model.get_submodule("model.embed_tokens"), tensor)
        except RuntimeError as e:
            raise ModelLoadError(f"tensor '{name}' does not fit: shape {tuple(tensor.shape)} ({e})") from None
        loaded.setdefault(target, set()).add(shard_id)
    missing = [n for n, shards in expected.items()
               if None not in loaded.get(n, ()) and not set(shards) <= loaded.get(n, set())]
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")

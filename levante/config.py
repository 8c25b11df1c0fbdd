"""Small dataclasses that describe a model and how the engine runs it.

`ModelConfig.from_hf_dict` accepts both config.json layouts in the wild: the
classic one (`rope_theta`, `rope_scaling`) and transformers 5's
(`rope_parameters`, possibly keyed by layer type).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


from levante.errors import InvalidRequest, ModelLoadError

FULL = "full_attention"
SLIDING = "sliding_attention"


# transformers' Gemma3TextConfig defaults, for the text_config of Gemma3ForConditionalGeneration checkpoints.
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "sliding_window_pattern": 6, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
}


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3 | yarn | longrope
    factor: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    layer_types: list[str] = field(default_factory=list)
    rope: dict[str, RopeConfig] = field(default_factory=dict)
    sliding_window: int | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Mixture of experts (Mixtral, Qwen3-MoE): layers `moe_layers` route each token to
    # `num_experts_per_tok` of `num_experts` gated MLPs `moe_intermediate_size` wide.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # the chosen experts' weights renormalised to sum to 1
    moe_layers: list[int] = field(default_factory=list)
    # The context the engine serves when the user set one (--max-model-len); LongRoPE picks
    # its long or short factors by it (layers/rotary.py). None: max_position_embeddings.
    max_model_len: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @staticmethod
    def text_fields(cfg: dict[str, Any]) -> dict[str, Any]:
        """The language model's fields of a config.json: a multimodal one's `text_config` merged into
        the top level (loader/bounds.py checks these before `from_hf_dict` builds anything)."""
        text = cfg.get("text_config") or {}
        if not isinstance(text, dict):
            raise ModelLoadError("config text_config is not an object")
        if cfg.get("model_type") == "gemma3" and text:  # Google's config.json lists only what differs
            text = {**GEMMA3_TEXT_DEFAULTS, **text}
        return dict(text, **{k: v for k, v in cfg.items() if k != "text_config"}) \
            if "text_config" in cfg and "hidden_size" not in cfg else cfg

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        text = cfg.get("text_config") or {}
        cfg = cls.text_fields(cfg)
        # Vision-language checkpoints may say it in text_config only (Qwen3-VL, #1682).
        tied = bool(cfg.get("tie_word_embeddings", False)) or bool(text.get("tie_word_embeddings", False))
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
            archs = cfg.get("architectures") or [cfg.get("model_type", "")]
            eos = cfg.get("eos_token_id")
            sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
            experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
            return cls(
                architecture=archs[0],
                model_type=cfg.get("model_type", ""),
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=_widest(cfg["intermediate_size"]),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=tied,
                attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
                layer_types=_layer_types(cfg, layers, sliding),
                rope=_rope_configs(cfg),
                sliding_window=sliding,
                query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
                final_logit_softcapping=cfg.get("final_logit_softcapping"),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                num_experts=experts,
                num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0) if experts else 0,
                moe_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
                if experts else 0,
                # Mixtral always renormalises; Qwen3-MoE says so in its config (transformers' default: no).
                norm_topk_prob=bool(cfg.get("norm_topk_prob", cfg.get("model_type") != "qwen3_moe")),
                moe_layers=_moe_layers(cfg, layers, experts),
                raw=cfg,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"config is missing or has a bad value for {e}") from None


def _widest(size) -> int:
    """The MLP width; the widest layer's when it is given per layer (Gemma 3n's MatFormer configs)."""
    return max(int(s) for s in size) if isinstance(size, list) else int(size)


# Families whose sliding window, when the config sets one, applies to every layer.
_WINDOW_ON_EVERY_LAYER = {"mistral", "mixtral", "phi3", "qwen3_moe"}


def _layer_types(cfg: dict, num_layers: int, sliding: int | None) -> list[str]:
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    if sliding and cfg.get("model_type") in _WINDOW_ON_EVERY_LAYER:
        return [SLIDING] * num_layers
    if sliding and cfg.get("model_type", "").startswith("gemma3"):
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]
    if sliding and cfg.get("use_sliding_window"):
        start = int(cfg.get("max_window_layers", num_layers))
        return [SLIDING if i >= start else FULL for i in range(num_layers)]
    return [FULL] * num_layers


def _moe_layers(cfg: dict, num_layers: int, experts: int) -> list[int]:
    """The layers whose MLP is a mixture of experts (Qwen3-MoE may keep some dense)."""
    if not experts:
        return []
    step, dense = int(cfg.get("decoder_sparse_step") or 1), set(cfg.get("mlp_only_layers") or [])
    return [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]


def _rope_from(params: dict | None, theta: float, cfg: dict | None = None) -> RopeConfig:
    params = dict(params or {})
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    theta = float(params.pop("rope_theta", theta))
    if cfg and cfg.get("partial_rotary_factor") is not None:  # the classic layout keeps it at the top
        params.setdefault("partial_rotary_factor", float(cfg["partial_rotary_factor"]))
    if rope_type in ("longrope", "su"):  # "su": LongRoPE's first name (early Phi-3 configs)
        rope_type = "longrope"
        _longrope_defaults(params, cfg or {})
    factor = float(params.pop("factor", 1.0))
    return RopeConfig(theta=theta, rope_type=rope_type, factor=factor, extra=params)


def _longrope_defaults(params: dict, cfg: dict) -> None:
    """As transformers fills them: the pretraining length (a top-level
    `original_max_position_embeddings`, Phi-3's place, wins) and the context stretch it implies."""
    max_position = int(cfg.get("max_position_embeddings", 4096))
    original = cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") \
        or max_position
    params["original_max_position_embeddings"] = int(original)
    if params.get("factor") is None:
        params["factor"] = max_position / int(original)


def _rope_configs(cfg: dict) -> dict[str, RopeConfig]:
    params = cfg.get("rope_parameters")
    theta = float(cfg.get("rope_theta", 10000.0))
    if isinstance(params, dict) and (FULL in params or SLIDING in params):
        return {kind: _rope_from(p, theta, cfg) for kind, p in params.items()}
    if isinstance(params, dict):
        full = _rope_from(params, theta, cfg)
    else:
        full = _rope_from(cfg.get("rope_scaling"), theta, cfg)
    local_theta = cfg.get("rope_local_base_freq")
    local = RopeConfig(theta=float(local_theta)) if local_theta else full
    return {FULL: full, SLIDING: local}


@dataclass
class CacheConfig:
    block_size: int = 16
    # Memory for the KV cache; blocks are preallocated from it at start. None: 2 GiB on the CPU; on
    # CUDA what `gpu_memory_utilization` of the card leaves once the weights are in (as vLLM does).
    memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    num_blocks: int | None = None  # overrides memory_gb when set
    enable_prefix_caching: bool = True
    # The cache's dtype: None keeps the model's; torch.int8 stores 8-bit codes with a scale per token and
    # KV head (quant/kv_int8.py; the CPU only), half of bfloat16's memory.
    dtype: torch.dtype | None = None

    def kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return self.dtype or model_dtype


SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass
class SpeculativeConfig:
    """Speculative decoding (engine/speculative.py): each step of a decoding sequence also checks up to
    `num_speculative_tokens` proposed tokens in the same forward. `method` "ngram" copies them from
    the prompt and the text so far, after the longest suffix of `prompt_lookup_min`..`prompt_lookup_max`
    tokens seen before (prompt lookup); "draft" asks `draft_model`, a smaller model with the same
    tokenizer and its own KV cache."""

    method: str
    num_speculative_tokens: int = 5
    draft_model: str | None = None
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise InvalidRequest(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, "
                                 f"not {self.method!r}")
        if not isinstance(self.num_speculative_tokens, int) or not 1 <= self.num_speculative_tokens <= 32:
            raise InvalidRequest("num_speculative_tokens must be an integer from 1 to 32")
        if self.method == "draft" and not self.draft_model:
            raise InvalidRequest("the 'draft' speculative method needs a draft model (--draft-model)")
        if self.method != "draft" and self.draft_model:
            raise InvalidRequest(f"a draft model serves the 'draft' speculative method only, not '{self.method}'")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise InvalidRequest("prompt lookup needs 1 <= prompt_lookup_min <= prompt_lookup_max")


@dataclass
class EngineConfig:
    # None: per device (`with_device_defaults`): 64 sequences and 1024 tokens a step on the CPU,
    # 256 and 8192 on CUDA. The token budget bounds chunked-prefill latency.
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    dtype: torch.dtype | None = None  # None: bfloat16 on CUDA and on CPUs with AMX/AVX512-BF16, else float32
    device: str = "cpu"
    num_threads: int | None = None
    # "auto": GGUF weights stay quantised (int8/int4 packed, quant/packed.py), others dense;
    # "none": dequantise to `dtype`; "int8" | "int4": quantise every linear layer (ISQ).
    quantization: str = "auto"
    warmup: bool = True
    seed: int = 0
    # Keep quantised weights as packed after the first load (<cache>/prepared/) and map them next time.
    prepared_cache: bool = True
    cache: CacheConfig = field(default_factory=CacheConfig)
    # Scale-out (engine/tp.py, engine/placement.py): ranks of tensor parallelism, a layer
    # map ("auto" or "0:12;1:12") and a topology YAML (per-layer device and quantization).
    tensor_parallel_size: int = 1
    device_map: str | None = None
    topology: str | None = None
    # CUDA: decode steps replay CUDA graphs captured at start for padded batch sizes up to
    # min(max_num_seqs, cuda_graph_max_batch); enforce_eager turns that off.
    enforce_eager: bool = False
    cuda_graph_max_batch: int = 256
    # LoRA adapters (PEFT folders) loaded at start, name -> path; more may be loaded at run time,
    # up to max_loras at once, each of rank at most max_lora_rank.
    lora: dict[str, str] = field(default_factory=dict)
    max_loras: int = 8
    max_lora_rank: int = 64
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding
    # Gemma 3n MatFormer: a slice (a row name of the slicing table CSV at matformer_config) cut out of the
    # checkpoint (loader/matformer.py), as mistral.rs's --matformer-config-path / --matformer-slice-name.
    matformer_config: str | None = None
    matformer_slice: str | None = None

    def with_device_defaults(self, device: torch.device) -> "EngineConfig":
        """Fill the knobs left None with the defaults of `device`'s type (in place; returns self)."""
        import torch  # here: `levante --help` and the start of `levante serve` do not wait for PyTorch

        cuda = torch.device(device).type == "cuda"
        if self.max_num_seqs is None:
            self.max_num_seqs = 256 if cuda else 64
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 8192 if cuda else 1024
        return self

"""What is this path? An alias, a Hugging Face folder or a GGUF file, and which architecture.

A folder with sentence-transformers' files (`modules.json`,
`config_sentence_transformers.json`) is an embedding model whatever its
config.json names (#1707): its source carries the pooling/dense/normalize pipeline.

`open_model` answers with a `ModelSource`: the normalised config, a weight
iterator in Hugging Face names, and the tokenizer and chat template, whatever
the format. The engine never looks at the format itself.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from levante.config import ModelConfig
from levante.errors import ModelLoadError
from levante.loader import hf
from levante.loader.hub import parse_hub_name, resolve as resolve_hub
from levante.loader.sentence_transformers import EmbeddingPipeline, dense_weights, read_pipeline
from levante.loader.sources import PACKAGED_MODELS, prepared_dir, resolve_alias
from levante.models.registry import embedding_encoder_class, family_config, model_class

# What a model does: generate text (the engine), embed texts (engine/embedder.py), score (query,
# document) pairs (engine/scorer.py), transcribe speech (engine/transcriber.py).
TASKS = ("generate", "embed", "score", "transcribe")
TRANSCRIPTION_ARCHITECTURES = ("WhisperForConditionalGeneration",)


@dataclass
class ModelSource:
    name: str  # what the user called it
    path: Path
    format: str  # "hf" | "gguf"
    config: ModelConfig
    _gguf: object = None
    pipeline: EmbeddingPipeline | None = None  # set for sentence-embedding models
    task: str = "generate"  # TASKS: what the files say the model does

    @property
    def is_embedding(self) -> bool:
        return self.pipeline is not None

    def weights(self, quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensors in HF names; with `quantized`, GGUF blocks stay blocks (`GGUFTensor`)."""
        if self.format == "gguf":
            return self._gguf.quantized_tensors() if quantized else self._gguf.named_tensors()
        if self.pipeline is not None:
            return self._embedding_weights()
        return hf.named_tensors(self.path)

    def _embedding_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The transformer's tensors as saved, then each dense stage's as `dense.<i>.<name>`."""
        yield from hf.named_tensors(self.path)
        for index, spec in enumerate(self.pipeline.dense):
            yield from dense_weights(spec, index)

    def num_tensors(self) -> int | None:
        return self._gguf.tensor_count if self.format == "gguf" else None

    def tokenizer(self, cached: bool = True):
        """The model's tokenizer; a GGUF's is built once and then read from the cache folder
        (`cached=False`: built from the file every time)."""
        from levante.loader.tokenizer import Tokenizer

        if self.format == "gguf":
            return Tokenizer.from_gguf(self.path, prepared_dir() if cached else None)
        return Tokenizer.from_folder(self.path)


def is_embedding_folder(path: Path) -> bool:
    """sentence-transformers folders are embedding models even when config.json names a causal LM (#1707)."""
    return folder_task(path) == "embed"


def folder_task(path: Path) -> str:
    """What a model folder does (TASKS): "score" for a cross-encoder (a `*ForSequenceClassification`
    checkpoint, or what sentence-transformers saved as a CrossEncoder), "embed" for another
    sentence-transformers folder, "transcribe" for Whisper, else "generate"."""
    if not path.is_dir():
        return "generate"
    settings = path / "config_sentence_transformers.json"
    saved_as = hf.read_json(settings).get("model_type") if settings.is_file() else None
    architecture = (hf.read_config(path).get("architectures") or [""])[0] if (path / "config.json").is_file() else ""
    if saved_as == "CrossEncoder" or architecture.endswith("ForSequenceClassification"):
        return "score"
    if (path / "modules.json").is_file() or settings.is_file():
        return "embed"
    return "transcribe" if architecture in TRANSCRIPTION_ARCHITECTURES else "generate"


def model_task(model: str | os.PathLike, progress: bool = False) -> str:
    """What `model` (alias, path or Hub name) does, from its files, without reading weights (TASKS)."""
    return folder_task(resolve_path(model, progress)[1])


def is_embedding_model(model: str | os.PathLike, progress: bool = False) -> bool:
    """Whether `model` (alias, path or Hub name) loads as an embedding model, without reading weights."""
    return model_task(model, progress) == "embed"


def resolve_path(model: str | os.PathLike, progress: bool = False) -> tuple[str, Path]:
    """(the name as given, a local path): an alias, a file or folder, else a Hub name (`org/name[@rev][:tag]`)
    downloaded into the Hub cache (loader/hub.py), with progress bars when `progress`."""
    name = str(model)
    if name in PACKAGED_MODELS:
        return name, resolve_alias(name)
    path = Path(name).expanduser()
    if path.exists():
        return name, path
    hub = parse_hub_name(name)
    if hub is None:
        aliases = ", ".join(PACKAGED_MODELS)
        raise ModelLoadError(f"model '{name}' not found: not a file, a folder, an alias ({aliases}) "
                             "or a Hugging Face Hub name (org/name)")
    return name, resolve_hub(hub, progress)


def open_model(model: str | os.PathLike, progress: bool = False) -> ModelSource:
    name, path = resolve_path(model, progress)
    if path.is_file():
        from levante.loader.gguf import GGUFFile

        gguf_file = GGUFFile(path)
        source = ModelSource(name, path, "gguf", ModelConfig.from_hf_dict(gguf_file.hf_config()), gguf_file)
    elif (task := folder_task(path)) == "embed":
        raw = hf.read_config(path)
        if isinstance(raw.get("model_type"), str):
            embedding_encoder_class(raw["model_type"])  # a type levante lacks is named before anything else
        hf.checked_config(path)  # sizes bounded before anything is built from them
        source = ModelSource(name, path, "hf", ModelConfig.from_hf_dict(raw), pipeline=read_pipeline(path, raw),
                             task="embed")
        embedding_encoder_class(source.config.model_type)  # fail before reading weights or tokenizer
        return source
    elif task != "generate":  # a cross-encoder or a speech model: checked by what runs it
        return ModelSource(name, path, "hf", ModelConfig.from_hf_dict(family_config(hf.read_config(path))), task=task)
    else:
        raw = hf.read_config(path)
        if not raw.get("architectures"):
            raise ModelLoadError(f"{path / 'config.json'} names no architectures")
        if isinstance(raw["architectures"], list) and isinstance(raw["architectures"][0], str):
            model_class(raw["architectures"][0])  # an architecture levante lacks is named before anything else
        hf.checked_config(path)  # sizes bounded before anything is built from them
        source = ModelSource(name, path, "hf", ModelConfig.from_hf_dict(raw))
    model_class(source.config.architecture)  # fail before reading weights or tokenizer
    return source

"""Which models a server offers, and how each loads: from `-m A -m B` or a `--models-config` file.

    models:
      coder:                          # the name requests give in `model`
        model: qwen2.5-coder:0.5b     # alias, HF folder, .gguf file or Hub name
        max_model_len: 4096           # any EngineArgs field: quantization, kv_cache_gb, dtype, ...
        lora: {sql: adapters/sql}     # LoRA adapters served on it, by name
      small:
        model: smollm2:135m

Every model starts from the server's engine flags; a config entry's keys override them for that
model. Relative paths in the file (model, lora, topology) are taken from the file's folder when
they exist there. The first model listed is the default: requests without `model` go to it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from levante.engine.args import EngineArgs
from levante.errors import InvalidRequest

DEFAULT_LOAD_TIMEOUT = 600.0
_PATH_FIELDS = ("model", "topology", "matformer_config", "draft_model")
_SERVER_FIELDS = ("progress", "warmup")  # set by the server for every model


# What each task (loader/auto.py's TASKS) is called, and the routes a model of it serves.
TASK_NOUNS = {"generate": "a chat model", "embed": "an embedding model", "score": "a reranker",
              "transcribe": "a speech-recognition model"}
TASK_ROUTES = {"generate": "chat, completions, /v1/responses and /v1/messages (and transcription, with audio)",
               "embed": "/v1/embeddings (and /v1/rerank, /v1/score by cosine similarity)",
               "score": "/v1/rerank and /v1/score", "transcribe": "/v1/audio/transcriptions"}


@dataclass
class ModelSpec:
    """One model a server offers: the name requests give, how to load it, what it serves."""
    name: str
    args: EngineArgs
    task: str = "generate"  # TASK_NOUNS: what it serves (`check_models` reads it from the model's files)
    pinned: bool = False  # loaded at start and never unloaded (--embedding-model, attached models)

    @property
    def embedding(self) -> bool:
        return self.task == "embed"

    @property
    def adapters(self) -> dict[str, str]:
        """The LoRA adapters served on this model, name -> path (run-time loads included, so that a
        reload brings them back)."""
        return self.args.lora


def specs_from_cli(args, engine_args: EngineArgs) -> list[ModelSpec]:
    """`-m` (repeatable; `--served-model-name` names the first, `--lora` goes on the first), then the
    entries of `--models-config`; `--embedding-model` and `--rerank-model` last, pinned. Names must be
    unique, adapters too."""
    models = args.model if isinstance(args.model, list) else [args.model] if args.model else []
    config = getattr(args, "models_config", None)
    if not models and not config:
        models = [engine_args.model_name]
    specs = []
    for index, model in enumerate(models):
        name = (args.served_model_name if index == 0 else None) or model
        lora = engine_args.lora if index == 0 else {}
        specs.append(ModelSpec(name, dataclasses.replace(engine_args, model=model, lora=dict(lora),
                                                         gguf_file=engine_args.gguf_file if index == 0 else None)))
    if args.served_model_name and not models:
        raise InvalidRequest("--served-model-name: names the first -m model; name models in --models-config by "
                             "their keys")
    if config:
        specs += read_models_config(config, dataclasses.replace(engine_args, lora={}, gguf_file=None))
    for flag, task in (("embedding_model", "embed"), ("rerank_model", "score")):
        model = getattr(args, flag, None)
        if model:
            specs.append(ModelSpec(model, dataclasses.replace(engine_args, model=model, lora={}, gguf_file=None,
                                                              task=task), task=task, pinned=True))
    check_names(specs)
    return specs


def read_models_config(path: str | Path, base: EngineArgs) -> list[ModelSpec]:
    """The `models:` of a YAML file, each an EngineArgs from `base` with the entry's keys over it."""
    import yaml

    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise InvalidRequest(f"--models-config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise InvalidRequest(f"--models-config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    entries = data.get("models") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise InvalidRequest(f"--models-config {path}: expected a mapping 'models:' of name -> options")
    unknown = set(data) - {"models"}
    if unknown:
        raise InvalidRequest(f"--models-config {path}: unknown top-level key '{sorted(unknown)[0]}' (only 'models')")
    return [ModelSpec(str(name), _entry_args(path, str(name), options, base)) for name, options in entries.items()]


def _entry_args(path: Path, name: str, options, base: EngineArgs) -> EngineArgs:
    where = f"--models-config {path}: models.{name}"
    if isinstance(options, str):
        options = {"model": options}
    if not isinstance(options, dict) or not options.get("model"):
        raise InvalidRequest(f"{where}: expected a 'model' (alias, folder, .gguf file or Hub name) and options")
    fields = {f.name: f for f in dataclasses.fields(EngineArgs)}
    values = {}
    for key, value in options.items():
        field_name = str(key).replace("-", "_")
        if field_name not in fields or field_name in _SERVER_FIELDS:
            known = ", ".join(sorted(set(fields) - set(_SERVER_FIELDS)))
            raise InvalidRequest(f"{where}.{key}: unknown option (known: {known})")
        values[field_name] = _checked(f"{where}.{key}", fields[field_name], value)
    for field_name in _PATH_FIELDS:
        if field_name in values:
            values[field_name] = _beside(path, values[field_name])
    values["lora"] = {str(k): _beside(path, str(v)) for k, v in values.get("lora", {}).items()}
    return dataclasses.replace(base, **values)


def _checked(where: str, field: dataclasses.Field, value):
    """`value`, if its type fits the field's annotation (such as "int | None")."""
    kinds = str(field.type)
    if field.name == "lora":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise InvalidRequest(f"{where}: expected a mapping of adapter name -> PEFT folder")
        return value
    fits = (value is None and "None" in kinds) or (isinstance(value, bool) and "bool" in kinds) or (
        not isinstance(value, bool) and (isinstance(value, int) and ("int" in kinds or "float" in kinds)
                                         or isinstance(value, float) and "float" in kinds
                                         or isinstance(value, str) and "str" in kinds))
    if not fits:
        raise InvalidRequest(f"{where}: expected {kinds.replace(' | ', ' or ')}, not {value!r}")
    return value


def _beside(config: Path, value: str) -> str:
    """A relative path that exists next to the config file, made absolute; anything else as given."""
    candidate = config.parent / str(value)
    return str(candidate.resolve()) if not Path(str(value)).is_absolute() and candidate.exists() else str(value)


def check_names(specs: list[ModelSpec]) -> None:
    """Model and adapter names, all distinct: a request's `model` names exactly one of them."""
    seen: set[str] = set()
    for spec in specs:
        for name in (spec.name, *spec.adapters):
            if name in seen:
                raise InvalidRequest(f"model name '{name}' is given twice (models and LoRA adapters share one "
                                     "namespace: requests pick them by `model`)")
            seen.add(name)


def add_cli_args(parser) -> None:
    """The flags of several models and of the router that loads and unloads them (serve/router.py)."""
    group = parser.add_argument_group("several models (-m A -m B, --models-config)")
    group.add_argument("--models-config", default=None, metavar="YAML",
                       help="models to serve, by name, each with its own options (quantization, "
                            "max_model_len, kv_cache_gb, lora, ...); see the README")
    group.add_argument("--max-loaded-models", type=int, default=None, metavar="N",
                       help="models loaded at once: loading another unloads the least recently used idle "
                            "one (default: no limit)")
    group.add_argument("--models-memory-gb", type=float, default=None, metavar="GB",
                       help="memory the loaded models may hold together (weights and KV caches): loading "
                            "another unloads the least recently used idle ones (default: no limit)")
    group.add_argument("--model-idle-timeout", type=float, default=None, metavar="SECONDS",
                       help="unload a model no request has used for this long (default: never)")
    group.add_argument("--sleep-after", type=float, default=None, metavar="SECONDS",
                       help="put a model no request has used for this long to sleep (--sleep-level); its next "
                            "request wakes it (default: never)")
    group.add_argument("--sleep-level", type=int, default=1, choices=[1, 2],
                       help="how deep --sleep-after sleeps: 1 gives the weights and KV cache back to the system "
                            "and keeps the rest for a quick wake, 2 unloads the model whole (default: 1)")
    group.add_argument("--model-load-timeout", type=float, default=DEFAULT_LOAD_TIMEOUT, metavar="SECONDS",
                       help="how long a request waits for its model to load before a 503 with Retry-After "
                            f"(default: {DEFAULT_LOAD_TIMEOUT:g})")

"""The server's side of a data-parallel model: what the front needs of an engine without its weights.

`DataParallelLLM` stands where an `LLM` stands in the server (serve/router.py): a tokenizer, a chat
renderer and a `FrontEngine` (model config, context length, prompt checks, the grammar compiler)
for the one pipeline's validation and planning, and `loop`, the `ReplicaSet` that runs the requests
on N replicas (engine/data_parallel.py) in place of an `EngineLoop`. Weights live in the replicas only.
"""
from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

from levante.config import EngineConfig
from levante.engine.args import EngineArgs
from levante.engine.data_parallel import ReplicaSet
from levante.engine.engine import Engine
from levante.engine.structured import GrammarCompiler
from levante.errors import InvalidRequest
from levante.loader.auto import open_model
from levante.loader.chat_prompt import ChatRenderer
from levante.multimodal.processor import load_processor

BACKENDS = ("mp", "ray")


class _FrontAdapters:
    """The LoRA adapters the replicas loaded at start (--lora); none are added at run time."""

    def __init__(self, adapters: dict[str, str]):
        self.loaded = {name: SimpleNamespace(path=path) for name, path in adapters.items()}

    def check_new(self, name: str) -> None:
        raise InvalidRequest("with --data-parallel-size, LoRA adapters are loaded at start (--lora), "
                             "not at run time")


class FrontEngine:
    """An engine's description, without a model: what validating and planning a request read."""

    def __init__(self, args: EngineArgs, replica_info: dict, replicas: int):
        self.source = open_model(args.model_name, args.progress)
        self.model_config = self.source.config
        self.tokenizer = self.source.tokenizer(cached=args.prepared_cache)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids)
        self.processor = load_processor(self.source.path, self.model_config, self.tokenizer) \
            if self.source.format == "hf" else None
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.max_model_len = replica_info["max_model_len"]
        # Admission counts every replica's running slots (serve/pipeline.py `admitted`).
        self.config = EngineConfig(max_num_seqs=replica_info["max_num_seqs"] * replicas)
        self.lora = _FrontAdapters(args.lora)
        self.speculator = None
        self.scheduler = self.block_manager = None  # per replica: serve/metrics.py reads ReplicaSet.stats

    check_prompt = Engine.check_prompt
    check_params = Engine.check_params


class DataParallelLLM:
    """`args.data_parallel_size` replicas of `args.model` on `args.distributed_executor_backend`."""

    is_embedding_model = False
    embedder = scorer = transcriber = None  # a chat model: no other task's runner

    def __init__(self, args: EngineArgs):
        size, backend = args.data_parallel_size, args.distributed_executor_backend or "mp"
        if size < 1:
            raise InvalidRequest("--data-parallel-size: must be 1 or more")
        if backend not in BACKENDS:
            raise InvalidRequest(f"--distributed-executor-backend '{backend}': expected one of {', '.join(BACKENDS)}")
        self.args, self.model_name = args, args.model_name
        replica_args = _replica_args(args, size)
        if backend == "ray":
            from levante.engine.replica_handles import RayReplica, connect_ray

            connect_ray(num_cpus=max(os.cpu_count() or 1, size * args.tensor_parallel_size))
            handles = [RayReplica(i, replica_args) for i in range(size)]
        else:
            from levante.engine.replica_handles import ProcessReplica

            handles = [ProcessReplica(i, replica_args) for i in range(size)]
        self.loop = ReplicaSet(handles, args.data_parallel_routing, args.block_size)
        try:
            self.engine = FrontEngine(args, self.loop.infos[0], size)
        except BaseException:
            self.loop.stop()
            raise
        self.tokenizer = self.engine.tokenizer
        self.chat_renderer = ChatRenderer(self.tokenizer, self.engine.processor, self.model_name,
                                          self.engine.model_config.model_type)

    @property
    def chat_template(self):
        return self.chat_renderer.template

    @property
    def max_batch_size(self) -> int:
        """Sequences the replicas run at once, all together (admission's running slots)."""
        return self.engine.config.max_num_seqs

    def memory_bytes(self) -> int:
        return sum(info.get("memory_bytes", 0) for info in self.loop.infos)

    def close(self) -> None:
        self.loop.stop()


def _replica_args(args: EngineArgs, size: int) -> dict:
    """Each replica's EngineArgs (as a dict: it travels to another process): one replica, no progress
    bars, and the cores split between the replicas unless --threads says how many each takes."""
    threads = args.num_threads or max(1, (os.cpu_count() or 1) // (size * args.tensor_parallel_size))
    replica = dataclasses.replace(args, data_parallel_size=1, distributed_executor_backend=None,
                                  progress=False, num_threads=threads)
    return dataclasses.asdict(replica)

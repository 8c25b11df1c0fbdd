"""Tensor parallelism: rank 0 runs the engine, every other rank follows its steps.

Start-up (`start`, called by Engine before it builds the model):
* one host: rank 0 spawns ranks 1..N-1 (`worker_main`) with MASTER_ADDR=127.0.0.1 and a
  free port, then joins the group;
* under torchrun (RANK / WORLD_SIZE set): every rank was started with the same command;
  rank 0 goes on to serve, the others enter `run_worker` here and leave the process
  when rank 0 shuts down.
Rank 0 sends its resolved model path and EngineConfig, every rank builds its shard of the
model, and all report success or their error together, so a failure on any rank fails
start-up everywhere with its message.

A process holds one group at a time. The engine that formed it releases it on `close()`, or
when it is garbage-collected or the process exits (a finalizer); a new tensor-parallel engine
whose predecessor is still alive (`llm = LLM(..., tensor_parallel_size=2)` run twice in a
notebook) takes the group over: the old engine's workers stop and its next step is an error.

Each step (`TensorParallelRunner.prepare`): rank 0 builds the step's inputs as usual and
broadcasts them (distributed/messages.py), with each token row's LoRA adapter id when any
row has one; workers rebuild the attention metadata and run the same forward. Every rank runs
the native CPU kernels' variant rank 0 runs (sent at start-up), and a paged step travels as
its block tables, so the workers' attention is the paged kernel too (their SDPA fields, where
a layer needs them, are built from the tables as rank 0 builds its own). A LoRA adapter
loaded on rank 0 is loaded by every rank from the same path (each keeps its shard), all
confirming together as at start-up. Layers all-reduce inside; the head's logits are all-gathered, and only
rank 0 samples. Workers end on a SHUTDOWN message, or when rank 0 disappears.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import weakref

import torch
import torch.distributed as dist

from levante.config import EngineConfig
from levante.distributed import launcher, messages, parallel_state
from levante.engine.runner import ModelRunner
from levante.errors import LevanteError, ModelLoadError
from levante.kernels import native
from levante.layers.attention import AttentionMetadata, attention_metadata
from levante.layers.lora import LoraBatch, lora_batch
from levante.loader.lora import read_adapter
from levante.models.registry import attach_lora, detach_lora, lora_shapes

logger = logging.getLogger("levante")

_FIELDS = ("input_ids", "positions", "slot_mapping", "key_slots", "query_positions", "kv_lens",
           "query_index", "output_index", "logits_indices", "block_tables", "cu_seqlens_q", "seq_lens", "lora_rows")
_CPU = torch.device("cpu")


class TensorParallel:
    """Rank 0's handle on the group: the spawned workers and the shutdown."""

    current: TensorParallel | None = None  # the group this process holds, if it formed one

    def __init__(self, procs: list, threads: int | None = None):
        self.procs = procs
        self.closed = False
        self._threads = threads  # rank 0's thread count before the group, restored on close
        TensorParallel.current = self

    def release_with(self, owner) -> None:
        """Close the group when `owner` (the engine) is garbage-collected, or at exit."""
        weakref.finalize(owner, self.close)

    def lora_hooks(self):
        """(on_load, on_unload) for engine/lora.py: the workers follow rank 0's adapters."""
        def on_load(adapter_id: int, path: str) -> None:
            messages.send(messages.LORA_LOAD, [adapter_id], [], _CPU)
            dist.broadcast_object_list([path], src=0, group=parallel_state.cpu_group())
            report_loaded(None)

        def on_unload(adapter_id: int) -> None:
            messages.send(messages.LORA_UNLOAD, [adapter_id], [], _CPU)

        return on_load, on_unload

    def close(self, notify: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if TensorParallel.current is self:
            TensorParallel.current = None
        if notify:
            try:
                messages.send(messages.SHUTDOWN, [], [], torch.device("cpu"))
            except Exception:  # a worker already gone: nothing to tell
                pass
        launcher.join_workers(self.procs)
        parallel_state.destroy()
        if self._threads:
            torch.set_num_threads(self._threads)


def start_rank0(model: str, model_config, config: EngineConfig, device: torch.device,
                dtype: torch.dtype) -> tuple[TensorParallel, torch.device]:
    """Form the group (spawning workers, or joining torchrun's); rank 0's handle and device.
    A torchrun worker rank does not return: it serves rank 0's steps, then exits."""
    from levante.engine.build import check_tensor_parallel

    tp = config.tensor_parallel_size
    check_tensor_parallel(model_config, tp)
    _release_previous_group()
    threads = None
    if device.type == "cpu" and not config.num_threads:
        # The ranks of one host share its cores.
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // tp))
    config = dataclasses.replace(config, dtype=dtype, num_threads=config.num_threads or torch.get_num_threads())
    env = parallel_state.torchrun_env()
    if env is not None:
        rank, world, local_rank = env
        if world != tp:
            raise ModelLoadError(f"torchrun started {world} processes but --tensor-parallel-size is {tp}")
        device = parallel_state.local_device(str(device), local_rank)
        parallel_state.init(rank, world, device)
        if rank != 0:
            _serve_steps(device)
            parallel_state.destroy()
            raise SystemExit(0)
        procs = []
    else:
        port = parallel_state.free_port()
        procs = launcher.spawn_workers("levante.engine.tp_worker", tp, port, [str(device)])
        device = parallel_state.local_device(str(device), 0)
        try:
            parallel_state.init(0, tp, device, "127.0.0.1", port)
        except Exception as e:  # a worker that never joined (it died at start): say so, once
            launcher.join_workers(procs, timeout=1.0)
            codes = [p.returncode for p in procs]
            raise ModelLoadError(f"tensor-parallel workers did not join (exit codes {codes}): {e}") from None
    dist.broadcast_object_list([model, config, native.variant()], src=0, group=parallel_state.cpu_group())
    return TensorParallel(procs, threads), device


def _release_previous_group() -> None:
    """Make room for a new group: one whose engine is gone is released by its finalizer (a
    collection runs it now), one whose engine lives on is taken over."""
    if not parallel_state.is_initialized():
        return
    gc.collect()
    previous = TensorParallel.current
    if previous is not None:
        logger.warning("a new tensor-parallel engine takes over this process's group: the previous one "
                       "stops (close() it when done with it)")
        previous.close()


def load_model_all_ranks(source, config: EngineConfig, dtype: torch.dtype, device: torch.device,
                         progress_weights, group: TensorParallel | None):
    """Rank 0 (or the only rank) loads its model: (model, where its weights came from); with a group,
    all ranks confirm together."""
    from levante.engine.build import load_model

    if group is None:
        return load_model(source, config, dtype, device, progress_weights)[::2]
    model, error = None, None
    try:
        model = load_model(source, config, dtype, device, progress_weights)[0]
    except Exception as e:
        error = e
    try:
        report_loaded(error)
    except LevanteError:
        group.close(notify=False)
        raise
    except Exception as e:  # a rank vanished during start-up
        group.close(notify=False)
        raise ModelLoadError(f"a tensor-parallel rank failed during start-up: {e}") from None
    return model, source.path


def report_loaded(error: BaseException | None) -> None:
    """Every rank says whether it loaded its shard; any failure is raised on all ranks."""
    message = None if error is None else (str(error) if isinstance(error, LevanteError)
                                          else f"{type(error).__name__}: {error}")
    statuses = [None] * parallel_state.group_size()
    dist.all_gather_object(statuses, (parallel_state.group_rank(), message), group=parallel_state.cpu_group())
    if error is not None:
        raise error
    for rank, msg in statuses:
        if msg is not None:
            raise ModelLoadError(f"tensor-parallel rank {rank} failed to load: {msg}")


def worker_main(device: str) -> None:
    """A worker rank started by `start_rank0` or by torchrun: `python -m levante.engine.tp_worker DEVICE`."""
    launcher.exit_with_parent()
    rank, world, local_rank = parallel_state.torchrun_env()
    dev = parallel_state.local_device(device, local_rank)
    parallel_state.init(rank, world, dev)
    try:
        _serve_steps(dev)
    except (ConnectionError, RuntimeError) as e:  # rank 0 went away mid-step
        logger.debug("tensor-parallel worker %d stops: %s", rank, e)
    finally:
        os._exit(0)


def _serve_steps(device: torch.device) -> None:
    """A worker: build this rank's shard, then run every step rank 0 sends until SHUTDOWN."""
    from levante.engine.build import load_model
    from levante.loader.auto import open_model

    box: list = [None, None, None]
    dist.broadcast_object_list(box, src=0, group=parallel_state.cpu_group())
    model_path, config, kernels = box
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    model, error = None, None
    try:
        native.select(kernels)  # rank 0's CPU kernels (the same weight layouts, the same roads)
        source = open_model(model_path)
        dtype = config.dtype  # resolved by rank 0
        model = load_model(source, config, dtype, device)[0]
    except BaseException as e:  # reported to rank 0, which fails start-up with it
        error = e
    try:
        report_loaded(error)
    except LevanteError:
        return
    runner = None
    while True:
        kind, ints, tensors = messages.recv(device)
        if kind == messages.SHUTDOWN:
            return
        if kind == messages.INIT:
            num_blocks, block_size = ints
            runner = ModelRunner(model, num_blocks, block_size, config.cache.kv_dtype(dtype), device)
            continue
        if kind == messages.LORA_LOAD:
            _load_lora(model, ints[0], config.max_lora_rank)
            continue
        if kind == messages.LORA_UNLOAD:
            detach_lora(model, ints[0])
            continue
        _forward(runner, ints, tensors)


def _load_lora(model, adapter_id: int, max_rank: int) -> None:
    """A worker loads its shard of the adapter rank 0 names; every rank reports, as at start-up."""
    box: list = [None]
    dist.broadcast_object_list(box, src=0, group=parallel_state.cpu_group())
    error = None
    try:
        attach_lora(model, adapter_id, read_adapter(box[0], max_rank, lora_shapes(model)).modules)
    except Exception as e:  # reported to rank 0, which refuses the adapter
        error = e
    try:
        report_loaded(error)
    except Exception:  # this rank's or another's failure: rank 0 raises it, every rank drops the adapter
        detach_lora(model, adapter_id)


@torch.inference_mode()
def _forward(runner: ModelRunner, ints: list[int], tensors: list) -> None:
    max_position, causal, max_query_len, block_size = ints
    fields = dict(zip(_FIELDS, tensors))
    metadata = AttentionMetadata(
        slot_mapping=fields["slot_mapping"], key_slots=fields["key_slots"],
        query_positions=fields["query_positions"], kv_lens=fields["kv_lens"],
        query_index=fields["query_index"], output_index=fields["output_index"],
        max_position=max_position, logits_indices=fields["logits_indices"], causal=bool(causal))
    if fields["block_tables"] is not None:  # a paged step: the tables, the SDPA fields on demand
        tables, cu, lens = (fields[n].to(torch.int32) for n in ("block_tables", "cu_seqlens_q", "seq_lens"))
        metadata.block_tables, metadata.cu_seqlens_q, metadata.seq_lens = tables, cu, lens
        metadata.max_query_len, metadata.block_size = max_query_len, block_size
        q_lens = (cu[1:] - cu[:-1]).tolist()
        metadata._sdpa_builder = runner.sdpa_builder(q_lens, lens.tolist(), tables.tolist())
    rows = fields["lora_rows"]
    adapters = None if rows is None else LoraBatch.from_rows([a if a >= 0 else None for a in rows.tolist()])
    with attention_metadata(metadata), lora_batch(adapters):
        hidden = runner.model(fields["input_ids"], fields["positions"])
        runner.model.compute_logits(hidden.index_select(0, metadata.logits_indices))


class TensorParallelRunner(ModelRunner):
    """Rank 0's runner: each step's inputs also go to the workers before the forward."""

    def __init__(self, group: TensorParallel, model, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(model, num_blocks, block_size, dtype, device)
        self.group = group
        messages.send(messages.INIT, [num_blocks, block_size], [], device)

    def prepare(self, batch, all_logits):
        if self.group.closed:  # its collectives would reach another engine's workers
            raise LevanteError("this engine's tensor-parallel workers are stopped (it was closed, or a newer "
                               "tensor-parallel LLM took the group over): load it again")
        input_ids, positions, md = super().prepare(batch, all_logits)
        rows = self.lora_rows(batch)
        lora_rows = None if rows is None else torch.tensor([-1 if a is None else a for a in rows])
        values = {"input_ids": input_ids, "positions": positions, "lora_rows": lora_rows, **{
            name: getattr(md, name) for name in _FIELDS[2:-1]}}
        messages.send(messages.STEP, [md.max_position, int(md.causal), md.max_query_len, md.block_size],
                      [values[n] for n in _FIELDS], self.device)
        return input_ids, positions, md


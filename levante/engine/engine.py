"""The engine: requests in, outputs out, one `step()` at a time.

    add_request -> Scheduler -> ModelRunner (Model.forward) -> Sampler -> detokenizer

`step()` is synchronous; `EngineLoop` (engine/loop.py) drives it from a thread
for the server, sleeping while there is nothing to do.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from levante.config import EngineConfig
from levante.engine import tp
from levante.engine.kv_cache import BlockManager
from levante.engine.lora import LoadedAdapter, LoraAdapters
from levante.loader.lora import LoraAdapter
from levante.engine.outputs import CompletionOutput, RequestOutput
from levante.engine.runner import ModelRunner, kv_bytes_per_token
from levante.engine.sampler import Sampler, top_logprobs
from levante.engine.sampling_params import SamplingParams
from levante.engine.scheduler import ScheduledSequence, Scheduler
from levante.engine.sequence import Sequence, Status
from levante.engine.speculative import Speculator
from levante.engine.structured import GrammarCompiler
from levante.errors import InvalidRequest, ModelLoadError
from levante.loader.auto import open_model
from levante.loader.memory import release_memory
from levante.loader.matformer import sliced_config
from levante.loader.tokenizer import IncrementalDetokenizer
from levante.multimodal.inputs import MultiModalPrompt
from levante.multimodal.processor import load_processor
from levante.kernels import native
from levante.quant.packed import NATIVE_KERNEL_ROWS, resolve_mode

logger = logging.getLogger("levante")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return torch.bfloat16 if caps.get("avx512_bf16") or caps.get("amx_bf16") else torch.float32


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    final_only: bool = False  # params.output_kind == "final_only": no output until it finishes
    error: str | None = None  # why the engine failed it (its outputs then end with finish_reason "error")

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


@dataclass
class _StepResult:
    """What a step computed, before anything is recorded (Engine._compute -> Engine._commit)."""
    logits: torch.Tensor
    wants_all: list[bool]
    prompt_rows: list[tuple[ScheduledSequence, int, int]] = field(default_factory=list)  # (item, row, count)
    to_sample: list[Sequence] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    raw_logprobs: torch.Tensor | None = None
    # Speculative decoding: the items with drafts, and for each the tokens it gets and their logprob rows.
    speculating: list[ScheduledSequence] = field(default_factory=list)
    verified: list[tuple[list[int], torch.Tensor | None]] = field(default_factory=list)


class Engine:
    def __init__(self, model: str, config: EngineConfig | None = None, progress: bool = False):
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" names the current card:
            self.device = torch.device("cuda", torch.cuda.current_device())  # tensors say cuda:N, compare so
        config.with_device_defaults(self.device)
        self.dtype = config.dtype or default_dtype(self.device)
        started = time.monotonic()
        self.source = open_model(model, progress)
        if config.matformer_slice or config.matformer_config:
            if not (config.matformer_slice and config.matformer_config):
                raise ModelLoadError("a MatFormer slice needs both its table (matformer_config) and its name "
                                     "(matformer_slice)")
            self.source.config = sliced_config(self.source.config, config.matformer_config, config.matformer_slice)
        self.quantization = resolve_mode(config.quantization, self.source.format)
        self.model_config = self.source.config
        self.tokenizer = self.source.tokenizer(cached=config.prepared_cache)
        self.tensor_parallel = None  # engine/tp.py: the worker ranks, under --tensor-parallel-size
        if config.tensor_parallel_size != 1:
            # The workers open the resolved path: a Hub model is downloaded once, here.
            self.tensor_parallel, self.device = tp.start_rank0(str(self.source.path), self.model_config, config,
                                                               self.device, self.dtype)
            self.tensor_parallel.release_with(self)  # close() is not required: collection releases it too
        self.model, self.loaded_from = tp.load_model_all_ranks(
            self.source, config, self.dtype, self.device, lambda s, q: _with_progress(s, progress, quantized=q),
            self.tensor_parallel)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids)
        # Vision-language models: turns token ids + images into a MultiModalPrompt (None: text only).
        self.processor = load_processor(self.source.path, self.model_config, self.tokenizer) \
            if self.source.format == "hf" and hasattr(self.model, "encode_images") else None
        self.speculator = self._speculator()
        self._init_cache()
        self.lora = self._init_lora()
        self.sampler = Sampler(self.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.load_seconds = time.monotonic() - started
        if config.warmup:
            self.warmup()

    def _speculator(self) -> Speculator | None:
        """Speculative decoding as configured (the draft model loaded here), or None."""
        spec = self.config.speculative
        if spec is None:
            return None
        draft = None
        if spec.method == "draft":
            from levante.engine.draft import DraftProposer

            draft = DraftProposer.load(spec.draft_model, self.config, self.dtype, self.device, self.tokenizer,
                                       self.model_config.vocab_size, self.eos_token_ids)
        # Packed weights on the CPU: from NATIVE_KERNEL_ROWS rows on, a step dequantises every weight
        # (quant/packed.py), far dearer than a few more rows through the kernels: drafts stay below.
        packed_cpu = self.quantization is not None and self.device.type == "cpu"
        return Speculator(spec, draft, NATIVE_KERNEL_ROWS - 1 if packed_cpu else None)

    def _init_cache(self) -> None:
        cache, cfg = self.config.cache, self.config
        # A draft model's cache holds as many tokens as the target's: it is paid for from the same memory.
        draft_per_token = self.speculator.kv_bytes_per_token() if self.speculator else 0
        kv_dtype = cache.kv_dtype(self.dtype)
        per_token = kv_bytes_per_token(self.model, kv_dtype) + draft_per_token
        memory = self._kv_cache_bytes(per_token) if cache.memory_gb is None else cache.memory_gb * (1 << 30)
        num_blocks = cache.num_blocks or int(memory // (per_token * cache.block_size))
        if num_blocks < 1:
            raise InvalidRequest(f"the KV cache ({memory / (1 << 30):.2f} GiB) holds no block of "
                                 f"{cache.block_size} tokens ({per_token} bytes a token): raise --kv-cache-gb")
        capacity = num_blocks * cache.block_size
        self.max_model_len = min(cfg.max_model_len or self.model_config.max_position_embeddings, capacity)
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        if self.tensor_parallel:
            self.runner = tp.TensorParallelRunner(self.tensor_parallel, self.model, num_blocks, cache.block_size,
                                                  kv_dtype, self.device)
        else:
            self.runner = ModelRunner(self.model, num_blocks, cache.block_size, kv_dtype, self.device)
            self.runner.setup_decode_graphs(cfg.max_num_seqs, self.max_model_len, cfg.enforce_eager,
                                            cfg.cuda_graph_max_batch)
        if draft_per_token:
            self.speculator.draft.init_cache(num_blocks, cache.block_size, self.max_model_len)

    def _init_lora(self) -> LoraAdapters:
        cfg = self.config
        hooks = self.tensor_parallel.lora_hooks() if self.tensor_parallel else (None, None)
        adapters = LoraAdapters(self.model, cfg.max_loras, cfg.max_lora_rank, *hooks)
        for name, path in cfg.lora.items():
            adapters.load(name, path)
        return adapters

    def load_lora(self, name: str, adapter: str | LoraAdapter) -> LoadedAdapter:
        """Serve LoRA adapter `name` (a PEFT folder, or what `self.lora.read` made of one) from now on;
        requests pick it by name."""
        return self.lora.load(name, adapter)

    def unload_lora(self, name: str) -> None:
        """Stop serving adapter `name`; refused while an unfinished request applies it."""
        adapter_id = self.lora.id_of(name)
        in_use = sum(1 for request in self.requests.values() if any(
            seq.lora_id == adapter_id and not seq.finished for seq in request.seqs))
        self.lora.unload(name, in_use)

    def _kv_cache_bytes(self, per_token: int) -> int:
        """The default KV cache size: 2 GiB on the CPU; on CUDA, `gpu_memory_utilization` of the card
        minus what is in use (the weights) and a reserve for one step's activations and logits."""
        if self.device.type != "cuda":
            return 2 << 30
        cfg, mc = self.config, self.model_config
        free, total = torch.cuda.mem_get_info(self.device)
        item = torch.empty((), dtype=self.dtype).element_size()
        activations = cfg.max_num_batched_tokens * (4 * mc.intermediate_size + 8 * mc.hidden_size) * item
        logits = 2 * cfg.max_num_seqs * mc.vocab_size * 4
        budget = total * cfg.cache.gpu_memory_utilization - (total - free) - activations - logits - (1 << 30)
        floor = per_token * self.config.cache.block_size * 64
        if budget < floor:
            logger.warning("little GPU memory left for the KV cache (%.2f GiB free of %.2f): using %.2f GiB",
                           free / (1 << 30), total / (1 << 30), floor / (1 << 30))
        return int(max(budget, floor))

    def memory_bytes(self) -> int:
        """What this engine holds: the weights (this rank's) and the KV cache (nothing while asleep)."""
        if self.asleep:
            return 0
        return weight_bytes(self.model) + sum(k.nbytes + v.nbytes for k, v in self.runner.kv_cache)

    # -- sleep (the server's POST /sleep, level 1) ----------------------
    @property
    def asleep(self) -> bool:
        return self.model is None

    def sleep(self) -> None:
        """Give the weights and the KV cache back to the system, between requests. What a wake needs
        stays: the tokenizer, chat template, grammar tables, LoRA adapters and settings."""
        if self.requests:
            raise InvalidRequest(f"the engine cannot sleep while {len(self.requests)} requests run")
        if self.tensor_parallel is not None:
            raise InvalidRequest("sleep: not supported under tensor parallelism")
        self.model = self.runner = self.speculator = self.lora.model = None
        release_memory(self.device)

    def wake_up(self) -> None:
        """Load the weights again (the prepared-weights cache or the checkpoint, which the system's page
        cache likely still holds) and a new KV cache; the adapters come back under their ids."""
        if not self.asleep:
            return
        self.model, self.loaded_from = tp.load_model_all_ranks(
            self.source, self.config, self.dtype, self.device, lambda s, q: s.weights(q), None)
        self.speculator = self._speculator()
        self._init_cache()
        self.lora.reattach(self.model)
        if self.config.warmup:
            self.warmup()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the engine is collected, or at exit)."""
        if self.tensor_parallel is not None:
            self.tensor_parallel.close()

    def warmup(self) -> None:
        """One dummy request, run and drained to the end before the engine reports ready (#1645)."""
        self.add_request("warmup", [self.tokenizer.bos_token_id or 0] * 8,
                         SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        while self.has_unfinished_requests():
            self.step()

    # -- requests ---------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | MultiModalPrompt,
                    params: SamplingParams) -> None:
        """Queue a prompt: text, token ids, or a `MultiModalPrompt` (token ids plus images, built by
        the model's processor, multimodal/processor.py)."""
        if request_id in self.requests:
            raise InvalidRequest(f"request id '{request_id}' is already in use")
        multimodal = prompt if isinstance(prompt, MultiModalPrompt) else None
        if multimodal is not None:
            prompt = multimodal.token_ids
            self._validate_images(multimodal)
            multimodal = multimodal if multimodal.images or multimodal.mrope_positions is not None else None
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(ids)
        self.check_params(params)
        if multimodal is None and self.processor is not None and self.processor.image_token_id in ids:
            raise InvalidRequest("the prompt has image placeholder tokens but no images")
        params = self._clamp(params, len(ids))
        lora_id = self.lora.id_of(params.lora)
        seqs = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            grammar = self.grammars.matcher(params.structured) if params.structured else None
            seqs.append(Sequence(request_id, i, ids, params, detok, seed, grammar, multimodal, lora_id))
        self.requests[request_id] = Request(request_id, text, ids, params, seqs,
                                            final_only=params.output_kind == "final_only")
        for seq in seqs:
            self.scheduler.add(seq)

    def check_params(self, params: SamplingParams) -> None:
        """InvalidRequest for token ids the sampler would index the logits with but that lie outside them."""
        vocab = self.model_config.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or ())):
            if any(not 0 <= token < vocab for token in ids):
                raise InvalidRequest(f"{name}: token ids must be in [0, {vocab})")

    def check_prompt(self, ids: list[int]) -> None:
        """InvalidRequest unless `ids` fit the context and the vocabulary (callers may check ahead)."""
        if not ids:
            raise InvalidRequest("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len}"
                                 " (prompt and at least one generated token)")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequest(f"token ids must be in [0, {vocab})")

    def _validate_images(self, prompt: MultiModalPrompt) -> None:
        if prompt.images and not hasattr(self.model, "encode_images"):
            raise InvalidRequest(f"model '{self.source.name}' does not take images")
        n = len(prompt.token_ids)
        for image in prompt.images:
            if image.offset < 0 or image.length <= 0 or image.offset + image.length > n:
                raise InvalidRequest("an image's placeholder span lies outside the prompt")
        if prompt.mrope_positions is not None and tuple(prompt.mrope_positions.shape) != (3, n):
            raise InvalidRequest(f"M-RoPE positions must be [3, {n}]")

    def _clamp(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if params.max_tokens is None or params.max_tokens > room:
            params = SamplingParams(**{**params.__dict__, "max_tokens": room})
        return params

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        for seq in request.seqs if request else []:
            if not seq.finished:
                seq.finish("abort")
            self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- one step ---------------------------------------------------------
    def _native_step(self, batch: list[ScheduledSequence]) -> bool:
        """Whether every packed matmul of this step takes the native kernels (kernels/native.py)."""
        return (self.quantization is not None and self.tensor_parallel is None and self.device.type == "cpu"
                and sum(item.num_new_tokens for item in batch) < NATIVE_KERNEL_ROWS)

    def step(self) -> list[RequestOutput]:
        """One step: schedule, forward, sample, then record. A forward or draw that raises is narrowed
        down to the request(s) that cause it (`_isolate`): only those fail, the others go on."""
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self.max_model_len)
        batch = self.scheduler.schedule()
        if not batch:
            return []
        try:
            result = self._compute(batch)
        except Exception as error:  # noqa: BLE001 - narrowed down to its requests below
            return self._isolate(batch, error)
        return self._commit(batch, result)

    def _compute(self, batch: list[ScheduledSequence]) -> _StepResult:
        """Forward and draw, touching no bookkeeping (KV slots written again hold the same values), so a
        step that raises here can be re-run, whole or in parts."""
        if any(item.seq.wants_prompt_rows for item in batch):
            wants_all = [self._wants_prompt_rows(item) for item in batch]
        else:
            wants_all = [False] * len(batch)
        with native.kernel_step(self._native_step(batch)):
            logits = self.runner.run(batch, wants_all)
        result = _StepResult(logits, wants_all)
        # `samples` was fixed when scheduled (before after_step moves num_computed_tokens).
        first_rows = []  # where the rows of logits of each item with drafts start
        if all(item.samples and not item.drafts for item in batch) and not any(wants_all):  # a decode step
            result.to_sample, sample_rows = [item.seq for item in batch], range(len(batch))
        else:
            sample_rows, row = [], 0
            for item, want_all in zip(batch, wants_all):
                if item.drafts:
                    result.speculating.append(item)
                    first_rows.append(row)
                    row += len(item.drafts) + 1
                    continue
                count = item.num_new_tokens if want_all else int(item.samples)
                if want_all:
                    result.prompt_rows.append((item, row, count))
                if item.samples:
                    result.to_sample.append(item.seq)
                    sample_rows.append(row + count - 1)
                row += count
        if result.to_sample:
            # Rows are increasing: as many as the logits means all of them (pure decode), no gather.
            rows = logits if len(sample_rows) == logits.size(0) else logits[sample_rows]
            result.tokens, result.raw_logprobs = self.sampler(rows, result.to_sample)
        if result.speculating:
            result.verified = self.speculator.verify(self.sampler, logits, result.speculating, first_rows)
        return result

    def _commit(self, batch: list[ScheduledSequence], result: _StepResult) -> list[RequestOutput]:
        """Record a computed step: tokens computed, prompt logprobs, sampled tokens, outputs."""
        self.scheduler.after_step(batch)
        for item, row, count in result.prompt_rows:
            self._record_prompt_rows(item, result.logits[row:row + count])
        if not result.to_sample and not result.speculating:
            return []
        raw_logprobs, failed = result.raw_logprobs, {}
        for i, (seq, token) in enumerate(zip(result.to_sample, result.tokens)):
            try:
                self._append_token(seq, token, None if raw_logprobs is None else raw_logprobs[i])
            except Exception as error:  # noqa: BLE001 - this sequence's own trouble (detokenizer, grammar)
                failed[seq.request_id] = error
        for item, (tokens, logprob_rows) in zip(result.speculating, result.verified):
            self.speculator.count(item, tokens)
            try:
                self._append_verified(item.seq, tokens, logprob_rows)
            except Exception as error:  # noqa: BLE001
                failed[item.seq.request_id] = error
            result.to_sample.append(item.seq)
        # An output for each request that got a token, but for running final_only ones.
        requests, finished = self.requests, Status.FINISHED
        touched = dict.fromkeys(seq.request_id for seq in result.to_sample
                                if seq.status is finished or seq.params.output_kind != "final_only")
        outputs = [self._fail(rid, error) for rid, error in failed.items()]
        for rid in touched:
            request = requests.get(rid)
            if rid in failed or request is None or (request.final_only and not request.finished):
                continue
            try:
                outputs.append(self._output(rid))
            except Exception as error:  # noqa: BLE001
                outputs.append(self._fail(rid, error))
        return outputs

    def _isolate(self, batch: list[ScheduledSequence], error: Exception) -> list[RequestOutput]:
        """A step raised: run its requests again in halves until the ones that raise on their own are
        found; they fail with the error, every other request's step is recorded as usual. A request's
        sequences stay together."""
        by_request: dict[str, list[ScheduledSequence]] = {}
        for item in batch:
            if not item.seq.finished:
                by_request.setdefault(item.seq.request_id, []).append(item)
        if len(by_request) == 1:
            (request_id,) = by_request
            logger.error("request %s failed in an engine step", request_id, exc_info=error)
            return [self._fail(request_id, error)]
        groups = list(by_request.values())
        outputs = []
        for half in (groups[:len(groups) // 2], groups[len(groups) // 2:]):
            part = [item for group in half for item in group if not item.seq.finished]
            if not part:
                continue
            try:
                result = self._compute(part)
            except Exception as part_error:  # noqa: BLE001
                outputs += self._isolate(part, part_error)
                continue
            outputs += self._commit(part, result)
        return outputs

    def _fail(self, request_id: str, error: BaseException) -> RequestOutput:
        """End a request with an error: its blocks are freed and its output says why."""
        request = self.requests[request_id]
        for seq in request.seqs:
            if not seq.finished:
                seq.finish("error")
            self.scheduler.finish(seq)
        request.error = f"{type(error).__name__}: {error}"
        return self._output(request_id)

    def _append_verified(self, seq: Sequence, tokens: list[int], raw_logprobs: torch.Tensor | None) -> None:
        """Append a verification's tokens (kept drafts, then the target's own) until one finishes the sequence."""
        for i, token in enumerate(tokens):
            if i:  # the token before was a kept draft: its keys and values, written this step, now count
                self.scheduler.advance(seq)
            self._append_token(seq, token, None if raw_logprobs is None else raw_logprobs[i])
            if seq.finished:
                return

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    @staticmethod
    def _wants_prompt_rows(item: ScheduledSequence) -> bool:
        seq = item.seq
        if seq.prompt_logprobs is None and not seq.params.return_prompt_logits:
            return False
        return seq.num_computed_tokens < seq.num_prompt_tokens

    def _record_prompt_rows(self, item: ScheduledSequence, logits: torch.Tensor) -> None:
        seq = item.seq
        start = seq.num_computed_tokens - item.num_new_tokens
        rows = min(item.num_new_tokens, seq.num_prompt_tokens - start)
        if seq.params.return_prompt_logits:
            previous = seq.prompt_logits if seq.prompt_logits is not None else logits[:0].cpu()
            seq.prompt_logits = torch.cat([previous, logits[:rows].cpu()])
        if seq.prompt_logprobs is None:
            return
        logprobs = logits.log_softmax(-1)
        k = seq.params.prompt_logprobs
        for r in range(rows):
            position = start + r + 1
            if position < seq.num_prompt_tokens and seq.prompt_logprobs[position] is None:
                seq.prompt_logprobs[position] = top_logprobs(
                    logprobs[r], seq.token_ids[position], k, self._token_text)

    def _append_token(self, seq: Sequence, token: int, raw_logprobs: torch.Tensor | None) -> None:
        if len(seq.token_ids) == seq.num_prompt_tokens:  # this sequence's first token: maybe its request's
            request = self.requests[seq.request_id]
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
        seq.token_ids.append(token)
        params = seq.params
        if raw_logprobs is not None:
            seq.cumulative_logprob += float(raw_logprobs[token])
            if params.logprobs is not None:
                seq.logprobs.append(top_logprobs(raw_logprobs, token, params.logprobs, self._token_text))
        new_text = seq.detokenizer.step([token])
        if new_text:
            seq.text += new_text
        grammar_done = seq.grammar is not None and _advance_grammar(seq, token)
        if token in params.stop_token_ids:
            seq.finish("stop", token)
        elif token in self.eos_token_ids and not params.ignore_eos:
            seq.finish("stop")
        elif grammar_done:
            seq.finish("stop")
        elif params.stop and new_text and (stop := self._find_stop(seq, len(new_text))) is not None:
            seq.finish("stop", stop)
        elif (len(seq.token_ids) - seq.num_prompt_tokens >= params.max_tokens
              or len(seq.token_ids) >= self.max_model_len):
            seq.finish("length")
        if seq.status is Status.FINISHED:
            if not isinstance(seq.stop_reason, str):
                seq.text += seq.detokenizer.flush()  # e.g. a length cut inside a multi-byte character
            self.scheduler.finish(seq)

    @staticmethod
    def _find_stop(seq: Sequence, new_chars: int) -> str | None:
        for stop in seq.params.stop:
            index = seq.text.find(stop, max(0, len(seq.text) - new_chars - len(stop) + 1))
            if index >= 0:
                end = index + len(stop) if seq.params.include_stop_str_in_output else index
                seq.text = seq.text[:end]
                return stop
        return None

    def _output(self, request_id: str) -> RequestOutput:
        request = self.requests[request_id]
        seqs = request.seqs
        if len(seqs) == 1:
            first = seqs[0]
            outputs = [_completion(first)]
            finished = first.status is Status.FINISHED
        else:
            first = seqs[0]
            outputs = [_completion(seq) for seq in seqs]
            finished = request.finished
        if finished:
            del self.requests[request_id]
        return RequestOutput(
            request_id, request.prompt, request.prompt_token_ids, outputs, finished, first.prompt_logprobs,
            first.num_cached_tokens,
            {"arrival_time": request.arrival_time, "first_token_time": request.first_token_time,
             "prompt_logits": first.prompt_logits},
            request.error,
        )


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a model holds: dense parameters and buffers plus packed weights (shared ones once)."""
    dense = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    packed = {id(m.packed): m.packed.nbytes for m in model.modules() if getattr(m, "packed", None) is not None}
    return dense + sum(packed.values())


def _advance_grammar(seq: Sequence, token: int) -> bool:
    """Feed the sampled token to the sequence's grammar; True once the grammar is complete."""
    if not seq.grammar.accept(token):  # cannot happen while the mask is applied: a bug, not a user error
        logger.warning("structured output: request %s: grammar rejected token %d: %s",
                       seq.request_id, token, seq.grammar.error)
    return seq.grammar.is_finished()


def _completion(seq: Sequence) -> CompletionOutput:
    params = seq.params
    # Positional: this runs for every running request on every step.
    if params.logprobs is None:
        return CompletionOutput(seq.index, _visible_text(seq) if params.stop else seq.text,
                                seq.token_ids[seq.num_prompt_tokens:], None, None, seq.finish_reason, seq.stop_reason)
    return CompletionOutput(seq.index, _visible_text(seq), seq.token_ids[seq.num_prompt_tokens:],
                            seq.cumulative_logprob, list(seq.logprobs), seq.finish_reason, seq.stop_reason)


def _visible_text(seq: Sequence) -> str:
    """While running, hold back a tail that could still grow into a stop string."""
    text = seq.text
    if seq.finished or not seq.params.stop:
        return text
    hold = 0
    for stop in seq.params.stop:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return text[: len(text) - hold]


def _with_progress(source, progress: bool, quantized: bool):
    weights = source.weights(quantized)
    if not progress:
        return weights
    from tqdm import tqdm

    return tqdm(weights, total=source.num_tensors(), desc=f"loading {source.name}", unit="tensor", leave=False)

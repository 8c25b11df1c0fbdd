"""The draft model of speculative decoding: a smaller model with the target's tokenizer that proposes.

It keeps its own paged KV cache (as many blocks as the target's, of its own size) and one
shadow `Sequence` per target sequence: the target's tokens, then the drafts proposed last
time. Before proposing, the shadow is rolled back to where it still agrees with the target
(the drafts the target rejected, and their KV slots, are dropped), catches up on the tokens
it has not computed (the whole prompt the first time, one or two tokens after that), then
proposes one token per forward, batched over the sequences.

Its cache shares no prefixes: shadow blocks hold drafts that may be rolled back, so a hash
of them could name keys and values that are later overwritten.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from levante.config import EngineConfig
from levante.engine.kv_cache import BlockManager
from levante.engine.runner import ModelRunner, kv_bytes_per_token
from levante.engine.sampler import Sampler, draw
from levante.engine.sampling_params import SamplingParams
from levante.engine.scheduler import ScheduledSequence
from levante.engine.sequence import Sequence, Status
from levante.engine.speculative import SequenceWithDrafts
from levante.errors import ModelLoadError
from levante.kernels import native
from levante.quant.packed import NATIVE_KERNEL_ROWS

logger = logging.getLogger("levante")

_PROBE = "def speculate(x):\n    return x * 2  # ünïcode, 数字 42\n"


class DraftProposer:
    def __init__(self, model, config: EngineConfig, quantization: str | None, dtype: torch.dtype,
                 device: torch.device, vocab_size: int, eos_token_ids: set[int]):
        self.model, self.config, self.quantization = model, config, quantization
        self.dtype, self.device = dtype, device
        self.vocab_size = vocab_size  # the target's: draft logits are cut or padded to it
        self.kv_bytes_per_token = kv_bytes_per_token(model, config.cache.kv_dtype(dtype))
        self.sampler = Sampler(eos_token_ids)
        self.runner: ModelRunner | None = None
        self.block_manager: BlockManager | None = None
        self.shadows: dict[int, _Shadow] = {}  # by the target's seq_id

    @classmethod
    def load(cls, path: str, config: EngineConfig, dtype: torch.dtype, device: torch.device, tokenizer,
             vocab_size: int, eos_token_ids: set[int]) -> "DraftProposer":
        """Load the draft model on the target's device and dtype; ModelLoadError if its tokenizer differs."""
        from levante.engine.build import load_model
        from levante.loader.auto import open_model

        source = open_model(path)
        draft_tokenizer = source.tokenizer()
        probe = [t.encode(_PROBE, add_special_tokens=False) for t in (draft_tokenizer, tokenizer)]
        if draft_tokenizer.vocab_size != tokenizer.vocab_size or probe[0] != probe[1]:
            raise ModelLoadError(f"draft model '{path}' has another tokenizer than the target model: "
                                 "speculative decoding needs the same one")
        alone = dataclasses.replace(config, tensor_parallel_size=1, device_map=None, topology=None, speculative=None)
        model, quantization, _ = load_model(source, alone, dtype, device)
        return cls(model, config, quantization, dtype, device, vocab_size, eos_token_ids)

    def init_cache(self, num_blocks: int, block_size: int, max_model_len: int) -> None:
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(self.model, num_blocks, block_size, self.config.cache.kv_dtype(self.dtype),
                                  self.device)
        cfg = self.config
        self.runner.setup_decode_graphs(cfg.max_num_seqs, max_model_len, cfg.enforce_eager, cfg.cuda_graph_max_batch)

    def propose(self, seqs: list[Sequence], budgets: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        """Up to `budgets[i]` drafts for `seqs[i]`, and the distributions they were drawn from ([drafts,
        vocab], for sequences that sample; None for greedy ones)."""
        self._forget_finished()
        drafts: dict[int, list[int]] = {seq.seq_id: [] for seq in seqs}
        probs: dict[int, list[torch.Tensor]] = {seq.seq_id: [] for seq in seqs}
        batch, wanted = [], {}
        for seq, k in zip(seqs, budgets):
            shadow = self._sync(seq)
            if not self._reserve(shadow, len(shadow.token_ids) - shadow.num_computed_tokens + k - 1):
                continue
            self._catch_up(shadow)
            batch.append(ScheduledSequence(shadow, len(shadow.token_ids) - shadow.num_computed_tokens))
            wanted[seq.seq_id] = k
        while batch:
            logits = self._forward(batch)
            targets = [self.shadows[item.seq.seq_id].target for item in batch]
            positions = [SequenceWithDrafts(t, drafts[t.seq_id]) for t in targets]
            argmax, distributions = self.sampler.distributions(logits, positions)
            next_batch = []
            for i, (item, target) in enumerate(zip(batch, targets)):
                item.seq.num_computed_tokens += item.num_new_tokens
                if target.params.greedy:
                    token = argmax[i]
                else:
                    token = int(draw(distributions[i:i + 1], [target.generator])[0])
                    probs[target.seq_id].append(distributions[i])
                drafts[target.seq_id].append(token)
                item.seq.token_ids.append(token)
                if len(drafts[target.seq_id]) < wanted[target.seq_id]:
                    next_batch.append(ScheduledSequence(item.seq, 1))
            batch = next_batch
        return [(drafts[seq.seq_id], torch.stack(probs[seq.seq_id]) if probs[seq.seq_id] else None) for seq in seqs]

    def _catch_up(self, shadow: Sequence) -> None:
        """A long way behind (a new prompt): forward in chunks of the engine's step budget, all but the last."""
        chunk = self.config.max_num_batched_tokens
        while len(shadow.token_ids) - shadow.num_computed_tokens > chunk:
            self._forward([ScheduledSequence(shadow, chunk)])
            shadow.num_computed_tokens += chunk

    def _forward(self, batch: list[ScheduledSequence]) -> torch.Tensor:
        rows = sum(item.num_new_tokens for item in batch)
        all_native = self.quantization is not None and self.device.type == "cpu" and rows < NATIVE_KERNEL_ROWS
        with native.kernel_step(all_native):
            logits = self.runner.run(batch, [False] * len(batch))
        width = logits.size(-1)
        if width > self.vocab_size:
            return logits[:, :self.vocab_size]
        if width < self.vocab_size:
            return torch.nn.functional.pad(logits, (0, self.vocab_size - width), value=float("-inf"))
        return logits

    def _sync(self, seq: Sequence) -> Sequence:
        """The shadow of `seq`, rolled back to the longest prefix it shares with it and then given the
        rest of its tokens; at least the last one is left to compute."""
        entry = self.shadows.get(seq.seq_id)
        if entry is None:
            entry = self.shadows[seq.seq_id] = _Shadow(seq)
        shadow, target = entry.seq, seq.token_ids
        same, limit = entry.synced, min(len(shadow.token_ids), len(target))
        while same < limit and shadow.token_ids[same] == target[same]:
            same += 1
        del shadow.token_ids[same:]
        shadow.token_ids.extend(target[same:])
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, same, len(target) - 1)
        entry.synced = len(target)
        return shadow

    def _reserve(self, shadow: Sequence, num_new: int) -> bool:
        """Blocks for `num_new` more tokens; without room, the shadow is dropped (recomputed when needed)."""
        manager = self.block_manager
        if manager.blocks_needed(shadow, num_new) > manager.num_free_blocks:
            self._drop(shadow.seq_id)
            return False
        manager.allocate(shadow, num_new)
        return True

    def _forget_finished(self) -> None:
        for target_id, entry in list(self.shadows.items()):
            if entry.target.finished:
                self._drop(target_id)

    def _drop(self, target_id: int) -> None:
        self.block_manager.free_sequence(self.shadows.pop(target_id).seq)


class _Shadow:
    """The draft model's copy of a target sequence: its tokens then the last drafts (`seq`), and how many
    tokens are the target's for sure (`synced`: the target's length when last proposed for)."""

    __slots__ = ("target", "seq", "synced")

    def __init__(self, target: Sequence):
        self.target = target
        self.seq = Sequence(target.request_id, target.index, target.token_ids, SamplingParams(max_tokens=None))
        self.seq.seq_id = target.seq_id  # one id for both: the shadow is found by it
        self.seq.status = Status.RUNNING
        self.synced = 0

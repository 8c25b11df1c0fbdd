"""Which data-parallel replica runs a request: the one whose prefix cache holds the longest run of
the prompt's blocks, unless that would overload it (SGLang's cache-aware balancing, vLLM's
prefix-cache-affinity router).

Each replica's cache is mirrored here by the keys of the blocks routed to it: the SHA-256 chain the
engine files its blocks under (engine/kv_cache.py `prompt_block_keys`), the least recently routed
dropped past the replica's block count, all forgotten when the replica restarts. A request's adapter
roots its chain (keys computed under an adapter never match the base model's), as in the engine.

Load is the front's own count of a replica's requests in flight (its queue depth, exact), and the
KV-cache usage the replica last reported. The policy:
  * when the busiest and the idlest replica differ by more than `balance_slack` requests, the least
    loaded one (ties: the longest match), so a hot prefix cannot pile every request on one replica;
  * otherwise the longest match; ties, no match included, go to the least loaded, then to the one
    holding fewest blocks (new prefixes spread over the replicas).
"round-robin" takes the replicas in turn, the baseline benchmarks/data_parallel.py compares against.
"""
from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

from levante.engine.kv_cache import prompt_block_keys

POLICIES = ("prefix", "round-robin")


@dataclass
class ReplicaView:
    """What the front knows of one replica's cache and load."""
    capacity: int = 0  # KV blocks the replica holds (0: not known yet, keep every key)
    keys: OrderedDict = field(default_factory=OrderedDict)  # block key -> None, least recently routed first
    in_flight: int = 0
    kv_usage: float = 0.0
    up: bool = True

    def matched(self, keys: list[bytes]) -> int:
        """Leading blocks of `keys` this replica holds."""
        count = 0
        for key in keys:
            if key not in self.keys:
                break
            count += 1
        return count

    def remember(self, keys: list[bytes]) -> None:
        for key in keys:
            self.keys[key] = None
            self.keys.move_to_end(key)
        while self.capacity and len(self.keys) > self.capacity:
            self.keys.popitem(last=False)


@dataclass
class Choice:
    replica: int
    matched_blocks: int
    reason: str  # "prefix": the longest match won; "load": balanced away; "round-robin"


class PrefixRouter:
    def __init__(self, num_replicas: int, block_size: int, policy: str = "prefix", balance_slack: int = 4):
        if policy not in POLICIES:
            raise ValueError(f"routing policy '{policy}': expected one of {', '.join(POLICIES)}")
        self.block_size, self.policy, self.balance_slack = block_size, policy, balance_slack
        self.replicas = [ReplicaView() for _ in range(num_replicas)]
        self._turn = itertools.count()

    def keys(self, token_ids: list[int], lora: str | None = None) -> list[bytes]:
        root = hashlib.sha256(b"lora adapter " + lora.encode()).digest() if lora else None
        return prompt_block_keys(token_ids, self.block_size, root)

    def choose(self, keys: list[bytes], exclude: set[int] = frozenset()) -> Choice | None:
        """The replica for a prompt with block `keys`, among those up and not in `exclude`; None: none is."""
        live = [i for i, view in enumerate(self.replicas) if view.up and i not in exclude]
        if not live:
            return None
        if self.policy == "round-robin":
            index = live[next(self._turn) % len(live)]
            return Choice(index, self.replicas[index].matched(keys), "round-robin")
        views = self.replicas
        matched = {i: views[i].matched(keys) for i in live}
        loads = [views[i].in_flight for i in live]
        if max(loads) - min(loads) > self.balance_slack:
            index = min(live, key=lambda i: (views[i].in_flight, views[i].kv_usage, -matched[i]))
            return Choice(index, matched[index], "load")
        index = max(live, key=lambda i: (matched[i], -views[i].in_flight, -views[i].kv_usage, -len(views[i].keys)))
        return Choice(index, matched[index], "prefix" if matched[index] else "load")

    def routed(self, replica: int, keys: list[bytes]) -> None:
        view = self.replicas[replica]
        view.in_flight += 1
        view.remember(keys)

    def done(self, replica: int) -> None:
        self.replicas[replica].in_flight -= 1

    def forget(self, replica: int) -> None:
        """The replica restarted (or died): its cache is empty."""
        self.replicas[replica].keys.clear()

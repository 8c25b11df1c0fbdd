"""Vision-encoder outputs by image key, least recently used out first.

An image's rows are computed once and reused by every chunk of its prompt, by the
other samples of the request (n > 1), by a recompute after preemption and by later
requests that send the same image. Bounded by rows (tokens), not entries, since one
large image can weigh as much as a hundred small ones.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, max_rows: int = 32768):
        self.max_rows = max_rows
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.rows = 0
        self.num_encoded = 0  # images run through the encoder (a repeated image counts once while cached)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> torch.Tensor | None:
        rows = self.entries.get(key)
        if rows is not None:
            self.entries.move_to_end(key)
        return rows

    def put(self, key: str, rows: torch.Tensor) -> None:
        if key in self.entries:
            self.rows -= self.entries.pop(key).size(0)
        self.entries[key] = rows
        self.rows += rows.size(0)
        while self.rows > self.max_rows and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.rows -= old.size(0)

"""Vision-encoder outputs by image key, least recently used out first.

An image's rows are computed once and reused by every chunk of its prompt, by the
other samples of the request (n > 1), by a recompute after preemption and by later
requests that send the same image. Bounded by bytes, not entries, since one large
image can weigh as much as a hundred small ones.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
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
            self.bytes -= _size(self.entries.pop(key))
        self.entries[key] = rows
        self.bytes += _size(rows)
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.bytes -= _size(old)


def _size(rows: torch.Tensor) -> int:
    return rows.numel() * rows.element_size()

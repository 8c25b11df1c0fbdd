"""Giving freed memory back to the operating system after loading."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def trim_heap() -> None:
    """Ask glibc to hand free heap pages back to the system (``malloc_trim``).

    Loading frees many small objects (GGUF metadata views) and float32 temporaries of
    a few MB; glibc keeps such pages mapped, so without this they stay in the resident
    set (~120 MB while loading the default model). A no-op where there is no glibc.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def return_free_memory() -> None:
    """Collect garbage, then ``trim_heap``."""
    gc.collect()
    trim_heap()


def release_memory(device) -> None:
    """``return_free_memory``, and on CUDA the caching allocator's free blocks too (a model put to sleep)."""
    return_free_memory()
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.empty_cache()

"""STREAM-like read bandwidth of this machine, through the native kernels' own thread pool and loads.

    python benchmarks/memory_bandwidth.py [--mib 1024] [--threads 1 2] [--runs 5]

A decode step reads every weight once, so the bandwidth a plain read loop gets (lv_read: a sum over a
buffer far larger than the caches, vectorised with the CPU variant's flags, split over the threads
as the kernels split their work) bounds decode speed: tokens/s <= bandwidth / bytes read per token.
benchmarks/decode_vs_llamacpp.py reports decode against this limit. Prints the best and median of
`--runs` passes per thread count, and the machine's load (the machine is shared: the best pass is
the closest to what the hardware gives).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def read_bandwidth(threads: int, mib: int = 1024, runs: int = 5) -> list[float]:
    """GB/s of each of `runs` passes over a `mib` MiB buffer with `threads` threads."""
    import torch

    from levante.kernels import native

    lib = native.library()
    if lib is None:
        raise SystemExit(f"no native kernel variant runs here ({native.variant()})")
    buffer = torch.ones(mib << 20, dtype=torch.uint8)
    lib.lv_read(buffer.data_ptr(), buffer.numel(), threads)  # threads started, pages touched
    speeds = []
    for _ in range(runs):
        start = time.perf_counter()
        lib.lv_read(buffer.data_ptr(), buffer.numel(), threads)
        speeds.append(buffer.numel() / (time.perf_counter() - start) / 1e9)
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from levante.kernels import native

    print(f"CPU kernels {native.variant()}, load average {os.getloadavg()[0]:.2f} over {os.cpu_count()} CPUs")
    for threads in args.threads:
        speeds = read_bandwidth(threads, args.mib, args.runs)
        print(f"{threads} thread(s): best {max(speeds):6.1f} GB/s   median {statistics.median(speeds):6.1f} GB/s")


if __name__ == "__main__":
    main()

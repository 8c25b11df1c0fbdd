"""The native CPU kernels (levante/kernels/cpu/, the variant this CPU runs) beside PyTorch's, same process, interleaved.

    python benchmarks/native_kernels.py [--threads 1 2] [--rows 1 4 8] [--repeats 5]

For the default model's matmul shapes (the 151936 x 896 head, gate_up 9728 x 896, down
896 x 4864, qkv 1152 x 896): milliseconds per call (median of interleaved repeats) and
the weight bytes streamed per second, for PyTorch's int8 kernel (per-row int8, what
packed weights ran on before), the native int8 (W8A8) kernel, and the native 5-bit (Q5_0)
and 4-bit kernels. Weights are random; the kernels do not depend on the values.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from levante.kernels import native
from levante.quant.packed import Int4Weight, Int8Weight, Q5Weight

SHAPES = {"head": (151936, 896), "gate_up": (9728, 896), "down": (896, 4864), "qkv": (1152, 896)}


def weights(shape):
    n, k = shape
    codes = torch.randint(-127, 128, shape, dtype=torch.int8)
    scales = (torch.rand(n) * 0.01).bfloat16()
    out = {"aten int8": Int8Weight.from_codes(codes, scales, "rows"), "native int8": Int8Weight.from_codes(codes, scales)}
    q5 = torch.randint(0, 32, shape, dtype=torch.uint8)
    out["native q5"] = Q5Weight.from_codes(q5, (torch.rand(n, k // 32) * 0.01).half())
    q4 = torch.randint(0, 16, shape, dtype=torch.uint8)
    scale, offset = torch.rand(n, k // 32) * 0.01, torch.randn(n, k // 32) * 0.01
    out["native int4"] = Int4Weight.from_parts([(q4, scale, offset)], shape, torch.bfloat16, "q4t16")
    out["aten int4"] = Int4Weight.from_parts([(q4, scale, offset)], shape, torch.bfloat16, "aten")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not native.available():
        raise SystemExit("native kernels unavailable here")
    for name in args.shapes:
        shape = SHAPES[name]
        kinds = weights(shape)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for rows in args.rows:
                x = torch.randn(rows, shape[1]).bfloat16()
                calls = max(3, int(2e8 // (shape[0] * shape[1])))
                times = {kind: [] for kind in kinds}
                for _ in range(args.repeats):
                    for kind, weight in kinds.items():
                        weight.matmul(x)
                        start = time.perf_counter()
                        for _ in range(calls):
                            weight.matmul(x)
                        times[kind].append((time.perf_counter() - start) / calls)
                for kind, weight in kinds.items():
                    seconds = statistics.median(times[kind])
                    print(f"{name:8} {str(shape):14} threads {threads} rows {rows}  {kind:12} {seconds * 1e3:8.3f} ms "
                          f"{weight.nbytes / seconds / 1e9:6.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()

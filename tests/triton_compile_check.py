"""Compile the paged-attention kernel for sm_90 without a GPU (ptxas ships with triton) and report
registers and spills of each configuration; exits 1 when one fails to compile or spills.

    PYTHONPATH=$PWD:<triton> python tests/triton_compile_check.py

The interpreter tests cannot catch errors of the compiled path (the kernel takes another loop there),
so tests/test_triton_attention.py runs this in a subprocess (it must not see TRITON_INTERPRET=1).
"""
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from levante.kernels._triton_attention_kernel import combine_splits_kernel as COMBINE
from levante.kernels._triton_attention_kernel import paged_attention_kernel as KERNEL
from levante.kernels.triton_attention import _next_pow2, _tiles

INTS = ["stride_qt", "stride_qh", "stride_ks", "stride_kh", "stride_vs", "stride_vh", "stride_ot", "stride_oh",
        "stride_bt"]
PTRS = ["q_ptr", "k_ptr", "v_ptr", "out_ptr", "block_tables_ptr", "cu_seqlens_q_ptr", "seq_lens_ptr"]


def _usage(kernel) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+).*?STACK:(\d+)", usage, re.S).groups()
    return int(regs), int(stack)


def compile_combine(splits: int, head_dim: int):
    d_pad = max(16, _next_pow2(head_dim))
    sig = {"part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32", "out_ptr": "*bf16",
           "stride_ot": "i32", "stride_oh": "i32", "stride_od": "constexpr", "num_heads": "i32",
           "HEAD_DIM": "constexpr", "D_PAD": "constexpr", "NUM_SPLITS": "constexpr"}
    consts = {"stride_od": 1, "HEAD_DIM": head_dim, "D_PAD": d_pad, "NUM_SPLITS": splits}
    kernel = triton.compile(ASTSource(COMBINE, sig, consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4})
    return _usage(kernel)


def compile_sm90(dtype: str, group: int, head_dim: int, max_q: int, window: bool, splits: int = 1):
    """The cubin's (registers, stack bytes) for one configuration, as a launch would specialise it."""
    d_pad = max(16, _next_pow2(head_dim))
    block_m, tile_n, num_warps = _tiles(max_q, group, d_pad, dtype == "fp32")
    sig = {p: f"*{dtype}" for p in PTRS[:4]} | {p: "*i32" for p in PTRS[4:]} | {n: "i32" for n in INTS}
    part = "*fp32" if splits > 1 else f"*{dtype}"
    sig |= {"part_m_ptr": part, "part_l_ptr": part, "part_acc_ptr": part, "num_heads": "i32"}
    consts = {"stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_od": 1,
              "G": group, "HEAD_DIM": head_dim, "D_PAD": d_pad, "BLOCK_M": block_m, "BLOCK_Q": block_m // group,
              "TILE_N": tile_n, "USE_WINDOW": window, "IEEE": dtype == "fp32", "INTERPRET": False,
              "NUM_SPLITS": splits}
    sig |= {n: "constexpr" for n in consts} | {"qk_scale": "fp32", "window": "i32", "block_size": "i32"}
    attrs = {(KERNEL.arg_names.index(n),): [["tt.divisibility", 16]] for n in PTRS + INTS}
    kernel = triton.compile(ASTSource(KERNEL, sig, consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})
    return (*_usage(kernel), (block_m, tile_n, num_warps))


CONFIGS = [  # (dtype, group, head_dim, max_q, window): the serving shapes (16-bit inputs)
    ("bf16", 2, 128, 1, False), ("bf16", 2, 128, 512, False), ("bf16", 7, 64, 1, True),
    ("bf16", 7, 64, 2000, True), ("bf16", 2, 256, 1000, False), ("fp16", 1, 80, 300, False),
    ("bf16", 8, 128, 1, False), ("bf16", 4, 96, 64, True), ("bf16", 2, 128, 1, False, 16),
    ("bf16", 7, 64, 1, True, 8), ("bf16", 2, 256, 1, False, 4),
]


def main() -> int:
    bad = 0
    for cfg in CONFIGS:
        try:
            regs, stack, tiles = compile_sm90(*cfg)
        except Exception as e:  # noqa: BLE001 - report every configuration
            print(f"{cfg}: FAILED TO COMPILE: {e}")
            bad += 1
            continue
        print(f"{cfg}: BLOCK_M/TILE_N/warps {tiles}: {regs} registers, {stack} bytes of stack")
        bad += stack > 0
    for splits, head_dim in ((4, 256), (16, 80), (16, 128)):
        try:
            regs, stack = compile_combine(splits, head_dim)
        except Exception as e:  # noqa: BLE001
            print(f"combine {splits} splits, dim {head_dim}: FAILED TO COMPILE: {e}")
            bad += 1
            continue
        print(f"combine {splits} splits, dim {head_dim}: {regs} registers, {stack} bytes of stack")
        bad += stack > 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Which CPU variant of the native kernels runs here, chosen once from the CPU's features.

Variants, best first on their architecture (each is a build of cpu/<source> with its flags,
kernels/build.py):

* ``avx512``     x86-64 with AVX-512 F/BW/VL/VNNI, FMA, F16C (AVX512-BF16, where present, is
  checked by the library itself for its bfloat16 attention path);
* ``avx2-vnni``  x86-64 with AVX2, FMA, F16C and AVX-VNNI;
* ``avx2``       x86-64 with AVX2, FMA, F16C;
* ``neon``       aarch64 with the dot-product extension (asimddp);
* ``scalar``     none of them: no native kernels, PyTorch's ops (also LEVANTE_NATIVE_KERNELS=0).

``LEVANTE_CPU_ISA`` names a variant to use instead of the best one (``avx2`` on an AVX-512
machine tests and benchmarks the AVX2 kernels); naming one this CPU cannot run is an error that
says what the CPU lacks, never a crash on an illegal instruction.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

from levante.errors import LevanteError


class KernelChoiceError(LevanteError):
    """LEVANTE_CPU_ISA names a variant that does not exist or that this CPU cannot run."""


@dataclass(frozen=True)
class Variant:
    name: str
    arch: str                # "x86_64" or "aarch64"
    features: tuple          # /proc/cpuinfo flags it needs
    source: str              # under cpu/
    flags: tuple             # compiler flags beyond the common ones
    rank: int                # higher: preferred


VARIANTS = {v.name: v for v in (
    Variant("avx512", "x86_64", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma"), "avx512.c",
            ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"), 3),
    Variant("avx2-vnni", "x86_64", ("avx2", "fma", "f16c", "avx_vnni"), "avx2.c",
            ("-mavx2", "-mfma", "-mf16c", "-mavxvnni", "-DLV_AVX_VNNI"), 2),
    Variant("avx2", "x86_64", ("avx2", "fma", "f16c"), "avx2.c", ("-mavx2", "-mfma", "-mf16c"), 1),
    Variant("neon", "aarch64", ("asimd", "asimddp"), "neon.c", ("-march=armv8.2-a+dotprod+fp16",), 1),
)}
SCALAR = "scalar"


def machine() -> str:
    arch = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def for_machine(arch: str | None = None) -> list[Variant]:
    """The variants built for an architecture (default: this one), best first."""
    arch = arch or machine()
    return sorted((v for v in VARIANTS.values() if v.arch == arch), key=lambda v: -v.rank)


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (x86 "flags", aarch64 "Features"); empty elsewhere."""
    if platform.system() != "Linux":
        return frozenset()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def missing(variant: str) -> str | None:
    """Why `variant` cannot run on this CPU (a sentence), or None when it can."""
    v = VARIANTS.get(variant)
    if v is None:
        return None if variant == SCALAR else f"no variant {variant!r}"
    if platform.system() != "Linux":
        return f"the native kernels run on Linux (this is {platform.system()})"
    if v.arch != machine():
        return f"it is built for {v.arch}, this machine is {machine()}"
    lacking = [f for f in v.features if f not in cpu_features()]
    return f"this CPU lacks {', '.join(lacking)}" if lacking else None


def best() -> str:
    """The best variant this CPU runs (``scalar`` if none)."""
    for v in for_machine():
        if missing(v.name) is None:
            return v.name
    return SCALAR


def _enabled_by_env() -> bool:
    return os.environ.get("LEVANTE_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def requested() -> str:
    """The variant to use: LEVANTE_CPU_ISA's (checked) or the best; ``scalar`` under LEVANTE_NATIVE_KERNELS=0."""
    if not _enabled_by_env():
        return SCALAR
    forced = os.environ.get("LEVANTE_CPU_ISA", "").strip().lower()
    if not forced or forced in ("auto", "native"):
        return best()
    if forced != SCALAR and forced not in VARIANTS:
        names = ", ".join([*VARIANTS, SCALAR])
        raise KernelChoiceError(f"LEVANTE_CPU_ISA={forced}: no such kernel variant (choose one of {names})")
    reason = missing(forced)
    if reason is not None:
        raise KernelChoiceError(f"LEVANTE_CPU_ISA={forced}: {reason}; this CPU runs {best()} "
                                f"(or a lower one: {', '.join(lower_than(best()))})")
    return forced


def lower_than(variant: str) -> list[str]:
    """Variants below `variant` on this machine (which it may be forced down to), then ``scalar``."""
    rank = VARIANTS[variant].rank if variant in VARIANTS else 0
    return [v.name for v in for_machine() if v.rank < rank and missing(v.name) is None] + [SCALAR]

"""Every kernel variant through tests/kernels/harness.c: the kernel tests' cases in C against float64
definitions, for the variants no Python here can load.

The aarch64 NEON variant is compiled with gcc-aarch64-linux-gnu and run under qemu-aarch64 on an
x86-64 machine (`make test` installs both from apt where it can; otherwise this says why it
skips); on aarch64 it runs natively. The variants this CPU executes run the harness natively too,
which checks the harness itself against the variants the Python tests cover.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from levante.kernels import build, isa

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "kernels" / "harness.c"
QEMU = {"aarch64": "qemu-aarch64"}


def _how(name: str) -> tuple[list[str], list[str]] | str:
    """(compile command prefix, run command prefix) for variant `name` here, or why it cannot run."""
    variant = isa.VARIANTS[name]
    if variant.arch == isa.machine():
        reason = isa.missing(name)
        if reason is not None:
            return f"{name} variant: {reason}"
        cc = build.compiler()
        return ([cc], []) if cc else f"{name} variant: no C compiler"
    cc, qemu = build.compiler(variant.arch), shutil.which(QEMU.get(variant.arch, ""))
    if variant.arch not in QEMU:
        return f"{name} variant: built for {variant.arch}; its tests run on such a CPU (no emulator for it here)"
    if cc is None or qemu is None:
        return (f"{name} variant: needs {build.CROSS_COMPILERS[variant.arch]} and {QEMU[variant.arch]} on PATH "
                f"(apt: gcc-{variant.arch}-linux-gnu qemu-user; `make test` installs them as root)")
    return [cc, "-static"], [qemu, "-cpu", "max"]


def _build(name: str, tmp_path: Path) -> list[str]:
    """The harness compiled with variant `name`: the command that runs it here (skips where it cannot)."""
    how = _how(name)
    if isinstance(how, str):
        pytest.skip(how)
    compile_prefix, run_prefix = how
    variant = isa.VARIANTS[name]
    binary, kernels = tmp_path / f"harness-{name}", tmp_path / f"{name}.o"
    flags = [f for f in build.COMMON_FLAGS if f not in ("-shared", "-fPIC", "-fvisibility=hidden")]
    steps = [  # the variant as it is built (-O3), the harness at -O2 (aarch64 gcc 12 crashes vectorising it at -O3)
        [*compile_prefix, *flags, *variant.flags, "-c", "-o", str(kernels), str(build.SOURCES / variant.source)],
        [*compile_prefix, "-O2", "-pthread", *variant.flags, f"-I{build.SOURCES}", "-o", str(binary), str(HARNESS),
         str(kernels), "-lm"],
    ]
    for command in steps:
        compiled = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert compiled.returncode == 0, compiled.stderr[-3000:]
    return [*run_prefix, str(binary)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(isa.VARIANTS))
def test_variant_passes_the_harness(name, tmp_path):
    result = subprocess.run(_build(name, tmp_path), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and " 0 failures" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"variant {name} " in result.stdout


@pytest.mark.slow
def test_variants_compute_the_same_bits(tmp_path):
    """The matrix products and small ops of fixed cases give the same bits on every variant that runs here
    (the integers are exact and the float steps are the AVX-512 variant's, lane for lane)."""
    digests = {}
    for name in isa.VARIANTS:
        if isinstance(_how(name), str):
            continue
        result = subprocess.run([*_build(name, tmp_path), "digest"], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        digests[name] = [line for line in result.stdout.splitlines() if line.startswith("digest ")]
    if len(digests) < 2:
        pytest.skip(f"only {', '.join(digests) or 'no variant'} runs here: nothing to compare")
    first, *others = digests
    for name in others:
        assert digests[name] == digests[first], (name, first)

"""Compiling the CPU variants (cpu/*.c) into shared libraries.

At install: ``pip install .`` / ``make install`` (setup.py's build_ext, or
``python -m levante.kernels.build``) compile every variant of the machine's architecture into
``levante/kernels/lib/liblevante-<variant>.so``, so a wheel carries them. At run time
``library_path`` finds that file; where it is missing or was built from other sources (an
edited checkout), the variant is compiled once into ``$LEVANTE_CACHE/kernels/`` (default
``~/.cache/levante/kernels/``) and that is logged once. Without a C compiler that fallback
fails quietly (the caller runs PyTorch's ops); the package itself never needs one to import.

A library knows the sources it was built from (``lv_build_id``: a hash of cpu/* and the
variant's flags, a string in the file), so a stale one is never loaded.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from levante.kernels.isa import VARIANTS, Variant, for_machine, machine

logger = logging.getLogger("levante")

SOURCES = Path(__file__).with_name("cpu")
PACKAGED = Path(__file__).with_name("lib")
COMMON_FLAGS = ("-O3", "-fno-math-errno", "-pthread", "-shared", "-fPIC", "-fvisibility=hidden")
CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-gcc", "x86_64": "x86_64-linux-gnu-gcc"}


def file_name(variant: str) -> str:
    return f"liblevante-{variant}.so"


def build_id(variant: Variant) -> str:
    """A hash of every source file and the variant's flags: what `lv_build_id` of its library returns."""
    digest = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        if path.suffix in (".c", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join((variant.name, variant.source, *variant.flags, *COMMON_FLAGS)).encode())
    return digest.hexdigest()[:16]


def compiler(arch: str | None = None) -> str | None:
    """A C compiler for `arch` (default: this machine's): $CC, gcc or cc natively, else the cross gcc."""
    if (arch or machine()) != machine():
        return shutil.which(CROSS_COMPILERS.get(arch, ""))
    return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")


def command(variant: Variant, target: Path, cc: str) -> list[str]:
    return [cc, *COMMON_FLAGS, *variant.flags, f'-DLV_BUILD_ID="{build_id(variant)}"', "-o", str(target),
            str(SOURCES / variant.source)]


def compile_variant(variant: Variant, target: Path, cc: str | None = None) -> Path:
    """Compile `variant` into `target` (atomically: a concurrent builder writes the same file);
    OSError or CalledProcessError when it cannot."""
    cc = cc or compiler(variant.arch)
    if cc is None:
        raise OSError(f"no C compiler for {variant.arch} (gcc or cc on PATH, or $CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(command(variant, built, cc), check=True, capture_output=True, timeout=300)
        os.replace(built, target)
    return target


def is_current(path: Path, variant: Variant) -> bool:
    """Whether the library file was built from these sources (its lv_build_id string is in it: read,
    not loaded, so this holds for any architecture's file)."""
    try:
        return path.is_file() and build_id(variant).encode() in path.read_bytes()
    except OSError:
        return False


def cache_dir() -> Path:
    return Path(os.environ.get("LEVANTE_CACHE", Path.home() / ".cache" / "levante")) / "kernels"


_logged_fallback: set[str] = set()


def library_path(name: str) -> Path:
    """The library of variant `name` built from these sources: the packaged one, or one compiled
    into the cache at first use (logged once); OSError or CalledProcessError when there is none."""
    variant = VARIANTS[name]
    wanted = build_id(variant)
    packaged = PACKAGED / file_name(name)
    if is_current(packaged, variant):
        return packaged
    cached = cache_dir() / f"liblevante-{name}-{wanted}.so"
    if cached.is_file():
        return cached
    why = "is not installed" if not packaged.is_file() else "was built from other sources"
    if name not in _logged_fallback:
        _logged_fallback.add(name)
        logger.info("native kernels: the %s variant %s; compiling it into %s (once; `make install` or "
                    "`pip install .` build it ahead)", name, why, cached.parent)
    return compile_variant(variant, cached)


def build_all(target_dir: Path = PACKAGED, arch: str | None = None, strict: bool = False) -> dict[str, str]:
    """Compile every variant of `arch` into `target_dir`, skipping those already built from these
    sources; {variant: "built" | "up to date" | the reason it failed}. `strict`: raise instead."""
    results = {}
    for variant in for_machine(arch):
        target = target_dir / file_name(variant.name)
        if is_current(target, variant):
            results[variant.name] = "up to date"
            continue
        try:
            compile_variant(variant, target)
            results[variant.name] = "built"
        except (OSError, subprocess.SubprocessError) as error:
            if strict:
                raise
            detail = (getattr(error, "stderr", b"") or b"").decode(errors="replace").strip().splitlines()
            results[variant.name] = f"not built: {detail[-1] if detail else error}"
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m levante.kernels.build``: every variant of this machine into the package (make install)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--target", type=Path, default=PACKAGED)
    parser.add_argument("--arch", default=None, help="another architecture's variants, with its cross compiler")
    args = parser.parse_args(argv)
    for name, result in build_all(args.target, args.arch).items():
        print(f"levante kernels: {name}: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

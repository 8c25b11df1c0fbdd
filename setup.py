"""The build steps beside pyproject.toml:
- levante's native CPU kernels, one shared library per ISA variant of the target architecture
  (levante/kernels/isa.py), compiled into levante/kernels/lib/ by levante/kernels/build.py, so that
  `pip install .`, `pip install -e .` (make install) and the wheels they build carry them. A variant
  that does not compile here (no C compiler, one too old for its flags) is skipped with a warning;
  levante then compiles it at first use, or runs PyTorch's kernels where it cannot;
- the web page's libraries, built from npm when levante/web/vendor lacks them (tools/web_vendor.py,
  as `make web`), so that a wheel carries them.
"""
import importlib
import runpy
import sys
import types
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithWebLibraries(build_py):
    def run(self):
        script = ROOT / "tools" / "web_vendor.py"
        if script.is_file():  # before package data is listed, so that the built files are in it
            runpy.run_path(str(script))["build"](ROOT)
        super().run()


def kernels_build():
    """levante/kernels/build.py without importing levante (whose __init__ needs torch, absent in an
    isolated build environment): its package modules stand in empty."""
    saved = {name: sys.modules.get(name) for name in ("levante", "levante.kernels")}
    for name, path in (("levante", ROOT / "levante"), ("levante.kernels", ROOT / "levante" / "kernels")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    try:
        return importlib.import_module("levante.kernels.build")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


BUILD = kernels_build()


class BuildKernels(build_ext):
    """Each "extension" is a variant: a plain shared library (loaded with ctypes, not imported)."""

    def get_ext_filename(self, fullname):
        *package, variant = fullname.split(".")
        return str(Path(*package) / BUILD.file_name(variant))

    def build_extension(self, ext):
        variant = BUILD.VARIANTS[ext.name.rsplit(".", 1)[1]]
        target = Path(self.get_ext_fullpath(ext.name))
        if BUILD.is_current(target, variant):
            return
        try:
            BUILD.compile_variant(variant, target)
        except Exception as error:  # noqa: BLE001 - the package stays installable without it
            detail = (getattr(error, "stderr", b"") or b"").decode(errors="replace").strip()
            self.warn(f"levante: the {variant.name} kernels were not built ({error} {detail[-500:]}); "
                      "they will be compiled at first use where a C compiler is present")

    def copy_extensions_to_source(self):  # editable installs: into the source tree's lib/ (git-ignored)
        BUILD.PACKAGED.mkdir(exist_ok=True)
        super().copy_extensions_to_source()


setup(
    ext_modules=[Extension(f"levante.kernels.lib.{v.name}", sources=[], optional=True) for v in BUILD.for_machine()],
    cmdclass={"build_ext": BuildKernels, "build_py": BuildWithWebLibraries},
)

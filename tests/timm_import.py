"""Import timm (the reference for Gemma 3n's MobileNet-v5 vision tower) where torchvision cannot be imported.

timm's modules name torchvision at import time (transforms, datasets, FrozenBatchNorm2d) but its
MobileNet-v5 never calls into it. While timm imports, any `torchvision...` module resolves to a stand-in
whose names are empty placeholder classes; the stand-ins are removed from `sys.modules` afterwards, so
nothing else sees a torchvision. transformers builds timm towers only when torchvision imports: it is
told that timm is there. The model code that runs is timm's own.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

import transformers  # noqa: F401 - first: it must see that there is no torchvision


class _Placeholder(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class _StandIn(types.ModuleType):
    __path__: list = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Placeholder(name, (), {})
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StandIn(spec.name)

    def exec_module(self, module):
        pass


def _import_timm():
    try:
        import torchvision  # noqa: F401 - a working torchvision: nothing to stand in for
        import timm
        return timm
    except Exception:  # noqa: BLE001 - absent, or present but broken beside this torch
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        import timm
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    from transformers.models.timm_wrapper import modeling_timm_wrapper
    from transformers.utils import import_utils

    modeling_timm_wrapper.timm = timm
    import_utils.BACKENDS_MAPPING["timm"] = (lambda: True, import_utils.BACKENDS_MAPPING["timm"][1])
    return timm


timm = _import_timm()

"""levante: an LLM inference engine and server.

The public names load on first use (PEP 562), so that `levante --help`, `levante models` and the
first moments of `levante serve` do not wait for PyTorch: `from levante import LLM` works as ever.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "levante.llm",
    "SamplingParams": "levante.engine.sampling_params",
    "StructuredOutput": "levante.engine.structured",
    "RequestOutput": "levante.engine.outputs",
    "CompletionOutput": "levante.engine.outputs",
    "Logprob": "levante.engine.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'levante' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])

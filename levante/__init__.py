"""levante: an LLM inference engine and server."""
from levante.engine.outputs import CompletionOutput, Logprob, RequestOutput
from levante.engine.sampling_params import SamplingParams
from levante.engine.structured import StructuredOutput
from levante.llm import LLM

__all__ = ["LLM", "SamplingParams", "StructuredOutput", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"

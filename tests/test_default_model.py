"""The default model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF) against transformers loading the same file."""
import pytest
import torch

from levante import LLM, SamplingParams
from levante.loader.sources import DEFAULT_MODEL, resolve_alias

TEXT = '''The Sun is the star at the centre of the Solar System. It is a massive, nearly perfect sphere of
hot plasma, heated to incandescence by nuclear fusion reactions in its core, radiating the energy from its
surface mainly as visible light and infrared radiation with ten percent at ultraviolet energies.

def merge_sort(items):
    """Sort a list with merge sort and return a new list."""
    if len(items) <= 1:
        return list(items)
    middle = len(items) // 2
    left, right = merge_sort(items[:middle]), merge_sort(items[middle:])
    merged = []
    while left and right:
        merged.append(left.pop(0) if left[0] <= right[0] else right.pop(0))
    return merged + left + right

Le Soleil est l'étoile du Système solaire. Dans la classification astronomique, c'est une étoile de type
naine jaune, composée d'hydrogène et d'hélium. Its mean distance from Earth is about 150 million kilometres,
and its light takes about eight minutes and twenty seconds to reach us.

class LRUCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items = {}

    def get(self, key):
        if key not in self.items:
            return None
        value = self.items.pop(key)
        self.items[key] = value
        return value

Die Sonne ist der Stern, der der Erde am nächsten ist und das Zentrum des Sonnensystems bildet.'''


@pytest.fixture(scope="module")
def llm():
    # Dequantised, like transformers: the packed path is checked in test_quant.py.
    return LLM(DEFAULT_MODEL, dtype="float32", quantization="none", warmup=False)


@pytest.mark.slow
def test_teacher_forced_top1_agrees_with_transformers(llm):
    from tokenizer_refs import transformers_model

    ids = llm.tokenizer.encode(TEXT)[:301]
    assert len(ids) == 301
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, return_prompt_logits=True))[0]
    ours = out.metrics["prompt_logits"][:300].argmax(-1)
    with torch.no_grad():
        theirs = transformers_model(DEFAULT_MODEL)(torch.tensor([ids])).logits[0, :300].argmax(-1)
    agreement = (ours == theirs).float().mean().item()
    print(f"top-1 agreement over 300 tokens: {agreement:.4f}")
    assert agreement >= 0.98


@pytest.mark.slow
def test_default_model_answers_sensibly(llm):
    out = llm.chat([{"role": "user", "content": "What is 2 + 2? Answer with one number."}],
                   SamplingParams(temperature=0, max_tokens=8))[0]
    assert "4" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"


TIME_TOOL = {"type": "function", "function": {
    "name": "get_current_time", "description": "Get the current time in a given timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "description": "IANA name"}},
                   "required": ["timezone"]}}}
AFTER_TOOL_RESULT = [
    {"role": "user", "content": "What time is it in Tokyo?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_current_time", "arguments": '{"timezone": "Asia/Tokyo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"time": "14:05"}'},
]


@pytest.mark.slow
def test_after_a_tool_result_the_prompt_and_answer_are_the_references(llm):
    """Issue 13: after a tool result, qwen2.5-coder:0.5b calls the tool again rather than answer.
    The prompt is transformers' own rendering of the conversation, and llama.cpp, given the same
    ids, answers the same tokens (it too repeats the call): the model does this, not levante."""
    import json

    from llama_cpp import Llama
    from tokenizer_refs import transformers_tokenizer

    decoded = [dict(m, tool_calls=[{**c, "function": {**c["function"], "arguments": json.loads(
        c["function"]["arguments"])}} for c in m["tool_calls"]]) if "tool_calls" in m else m for m in AFTER_TOOL_RESULT]
    reference = transformers_tokenizer(DEFAULT_MODEL).apply_chat_template(
        decoded, tools=[TIME_TOOL], add_generation_prompt=True, tokenize=False)
    text, _ = llm.chat_renderer.text(AFTER_TOOL_RESULT, [TIME_TOOL])
    assert text == reference
    assert text.endswith('<tool_response>\n{"time": "14:05"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n')
    ids = llm.apply_chat_template(AFTER_TOOL_RESULT, tools=[TIME_TOOL])
    ours = llm.generate([ids], SamplingParams(temperature=0, max_tokens=48))[0].outputs[0]
    peer = Llama(str(resolve_alias(DEFAULT_MODEL)), n_ctx=1024, verbose=False)
    theirs = peer.create_completion(ids, max_tokens=48, temperature=0.0)["choices"][0]["text"]
    assert ours.text == theirs

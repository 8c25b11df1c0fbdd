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
    from transformers import AutoModelForCausalLM

    path = resolve_alias(DEFAULT_MODEL)
    ids = llm.tokenizer.encode(TEXT)[:301]
    assert len(ids) == 301
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, return_prompt_logits=True))[0]
    ours = out.metrics["prompt_logits"][:300].argmax(-1)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0, :300].argmax(-1)
    agreement = (ours == theirs).float().mean().item()
    print(f"top-1 agreement over 300 tokens: {agreement:.4f}")
    assert agreement >= 0.98


@pytest.mark.slow
def test_default_model_answers_sensibly(llm):
    out = llm.chat([{"role": "user", "content": "What is 2 + 2? Answer with one number."}],
                   SamplingParams(temperature=0, max_tokens=8))[0]
    assert "4" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"

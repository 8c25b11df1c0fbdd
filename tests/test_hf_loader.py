"""Hugging Face folders: a sharded checkpoint loads what its `model.safetensors.index.json` names,
and nothing else that lies beside it."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from levante import LLM, SamplingParams
from levante.errors import ModelLoadError
from levante.loader import hf
from tiny_models import load_reference

PROMPT = list(range(5, 30))


@pytest.fixture(scope="module")
def sharded(tiny_model, tmp_path_factory):
    """A tiny Qwen2 saved by transformers in shards, with a decoy `model.safetensors` beside them:
    the same tensor names, other values (as a leftover from a conversion would be)."""
    folder = tmp_path_factory.mktemp("sharded")
    reference = load_reference(tiny_model("qwen2"))
    reference.save_pretrained(folder, max_shard_size="40KB")
    shutil.copy(tiny_model("qwen2") / "tokenizer.json", folder)
    shutil.copy(tiny_model("qwen2") / "tokenizer_config.json", folder)
    decoy_folder = tmp_path_factory.mktemp("decoy")
    torch.manual_seed(123)
    type(reference)(reference.config).save_pretrained(decoy_folder)
    shutil.copy(decoy_folder / "model.safetensors", folder / "model.safetensors")
    return folder, reference


def test_sharded_checkpoint_follows_its_index(sharded):
    folder, reference = sharded
    index = json.loads((folder / hf.INDEX_FILE).read_text())["weight_map"]
    assert len(set(index.values())) > 2 and (folder / "model.safetensors").is_file()
    names = [name for name, _ in hf.named_tensors(folder)]
    assert sorted(names) == sorted(index)  # each once, none from the decoy
    llm = LLM(str(folder), dtype="float32", num_kv_blocks=32, warmup=False)
    output = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                   return_prompt_logits=True))[0]
    with torch.no_grad():
        expected = reference.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=16,
                                      min_new_tokens=16, pad_token_id=0)[0, len(PROMPT):].tolist()
        logits = reference(torch.tensor([PROMPT])).logits[0]
    assert output.outputs[0].token_ids == expected
    torch.testing.assert_close(output.metrics["prompt_logits"], logits, atol=1e-4, rtol=0)


def test_index_errors_name_the_problem(sharded, tmp_path):
    folder, _ = sharded
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    index = json.loads((broken / hf.INDEX_FILE).read_text())
    first_shard = next(iter(index["weight_map"].values()))
    (broken / first_shard).unlink()
    with pytest.raises(ModelLoadError, match=f"lacks shard\\(s\\) its model.safetensors.index.json names: {first_shard}"):
        list(hf.named_tensors(broken))
    name = next(iter(index["weight_map"]))
    (broken / hf.INDEX_FILE).write_text(json.dumps({"weight_map": {name: "../elsewhere.safetensors"}}))
    with pytest.raises(ModelLoadError, match="not a .safetensors file in the folder"):
        list(hf.named_tensors(broken))
    (broken / hf.INDEX_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match="is not a safetensors index"):
        list(hf.named_tensors(broken))

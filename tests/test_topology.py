"""Topology files (per-layer device and quantization) and device maps: parsing, resolution,
and their effect on a loaded model."""
import pytest
import torch

from levante import LLM, SamplingParams
from levante.distributed import device_map
from levante.distributed.topology import Topology
from levante.engine.placement import layer_devices
from levante.errors import InvalidTopology
from levante.layers.attention import Attention
from levante.layers.linear import LinearBase

OPTIONS = dict(dtype="float32", block_size=4, num_kv_blocks=64, warmup=False, enable_prefix_caching=False)


# -- parsing and resolution ------------------------------------------------------------------
def test_ranges_single_layers_and_overlaps():
    topo = Topology.from_yaml("""
0-4: {isq: Q4K, device: "cuda[0]"}
2-6: {isq: q6k}
5: {device: cpu}
'3-5': {isq: int8}
""")
    specs = topo.layers(8)
    # Applied by increasing end, then file order: 0-4, 3-5, 2-6, 5 (5-6, declared after 2-6).
    assert [s.isq if s else None for s in specs] == ["int4", "int4", "int8", "int8", "int8", None, None, None]
    assert specs[0].device == "cuda:0" and specs[2].device is None
    assert [s.key if s else None for s in specs] == ["0-4", "0-4", "2-6", "2-6", "2-6", "5", None, None]
    assert specs[5].device == "cpu"


def test_equal_ends_later_key_wins():
    topo = Topology.from_yaml("0-4: {isq: int4}\n2-4: {isq: int8}\n")
    assert [s.isq for s in topo.layers(4)] == ["int4", "int4", "int8", "int8"]
    topo = Topology.from_yaml("2-4: {isq: int8}\n0-4: {isq: int4}\n")
    assert [s.isq for s in topo.layers(4)] == ["int4"] * 4


def test_regex_keys_later_wins():
    topo = Topology.from_yaml(r"""
'/mlp\./': {isq: int4}
'/mlp\.down_proj\.weight$/': {isq: int8}
""")
    assert topo.match("model.layers.1.mlp.down_proj.weight").isq == "int8"
    assert topo.match("model.layers.1.mlp.gate_up_proj.weight").isq == "int4"
    assert topo.match("model.layers.1.self_attn.qkv_proj.weight") is None
    assert topo.layers(2) == [None, None]


@pytest.mark.parametrize("text, message", [
    ("0-4: {isq: q9k}", "key '0-4': unknown isq type 'q9k'"),
    ("4-2: {isq: int8}", "key '4-2': the range end must be greater"),
    ("layers: {isq: int8}", "key 'layers': expected a layer range"),
    ("0-2: {isq: int8, dtype: f16}", "key '0-2': unknown field 'dtype'"),
    ("0-2: {device: gpu0}", "key '0-2': device 'gpu0'"),
    ("'/mlp[/': {isq: int8}", "key '/mlp[/': invalid regular expression"),
    ("0-2: int8", "key '0-2': expected a mapping"),
    ("- 0-2", "expected a mapping of layer ranges"),
    ("0-2: {isq: [", "not valid YAML"),
])
def test_invalid_topology_names_the_key(text, message):
    with pytest.raises(InvalidTopology, match=message.replace("[", r"\[")):
        Topology.from_yaml(text)


def test_range_beyond_the_model_names_the_key():
    with pytest.raises(InvalidTopology, match="key '2-5': layer 4 is beyond the model's 3 layers"):
        Topology.from_yaml("0-1: {isq: int8}\n2-5: {isq: int8}").layers(3)


def test_device_map_parsing_and_assignment():
    assert device_map.parse("0:12;1:12") == [(0, 12), (1, 12)]
    assert device_map.parse(" AUTO ") == "auto"
    assert device_map.assign([(0, 2), (1, 1)], 4, "cuda") == ["cuda:0", "cuda:0", "cuda:1", "cpu"]
    assert device_map.assign([(1, 2), (0, 1)], 3, "cpu") == ["cpu"] * 3
    for bad, message in [("0-12", "entry '0-12'"), ("0:1;0:2", "listed twice"), (";", "empty")]:
        with pytest.raises(InvalidTopology, match=message):
            device_map.parse(bad)
    with pytest.raises(InvalidTopology, match="places 5 layers but the model has 4"):
        device_map.assign([(0, 3), (1, 2)], 4, "cuda")


def test_auto_device_map_fills_devices_in_order():
    # 4 layers of 10 bytes; device 0 holds 25 (minus a reserve of 5 -> 2 layers), device 1 holds 10.
    assert device_map.auto_assign([10] * 4, [25, 10], "cuda", reserve=5) == ["cuda:0", "cuda:0", "cuda:1", "cpu"]
    assert device_map.auto_assign([10] * 2, [], "cuda") == ["cpu", "cpu"]


# -- effect on a model -----------------------------------------------------------------------
def _linears(llm, layer):
    return {name: m for name, m in llm.engine.model.model.layers[layer].named_modules()
            if isinstance(m, LinearBase)}


def _prompt_logits(llm):
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 384, (20,), generator=g).tolist()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True))
    return out[0].metrics["prompt_logits"]


@pytest.fixture(scope="module")
def dense(tiny_model):
    return LLM(str(tiny_model("llama")), **OPTIONS)


def test_topology_quantizes_exactly_its_layers(tiny_model, tmp_path, dense):
    path = tmp_path / "topology.yml"
    path.write_text("1: {isq: int8}\n")
    llm = LLM(str(tiny_model("llama")), **OPTIONS, topology=str(path))
    for layer in range(3):
        for name, module in _linears(llm, layer).items():
            reference = _linears(dense, layer)[name].weight
            if layer == 1:
                assert module.packed is not None, name
                restored = module.packed.dequantize(torch.float32)
                assert not torch.equal(restored, reference)
                torch.testing.assert_close(restored, reference, atol=reference.abs().max().item() / 100, rtol=0)
            else:
                assert module.packed is None and torch.equal(module.weight, reference), name
    assert llm.engine.model.lm_head.packed is None
    ours, ref = _prompt_logits(llm), _prompt_logits(dense)
    assert not torch.equal(ours, ref)
    torch.testing.assert_close(ours, ref, atol=0.1, rtol=0)


def test_topology_regex_and_range_without_isq_override_global_isq(tiny_model, tmp_path):
    path = tmp_path / "topology.yml"
    path.write_text("0: {}\n'/mlp\\.down_proj\\.weight$/': {isq: none}\n")
    llm = LLM(str(tiny_model("llama")), **OPTIONS, topology=str(path), quantization="int4")
    assert all(m.packed is None for m in _linears(llm, 0).values())  # covered, no isq: as the checkpoint
    assert _linears(llm, 1)["mlp.down_proj"].packed is None  # the regex says none
    assert _linears(llm, 1)["mlp.gate_up_proj"].packed is not None  # --isq int4 elsewhere


def test_device_map_on_cpu_is_an_identity(tiny_model, dense):
    llm = LLM(str(tiny_model("llama")), **OPTIONS, device_map="0:2;1:1")
    model = llm.engine.model
    assert layer_devices(model) == [torch.device("cpu")] * 3
    assert all(len(layer._forward_pre_hooks) == 1 for layer in model.model.layers)  # inputs follow the layer
    caches = [m.k_cache.device for m in model.modules() if isinstance(m, Attention)]
    assert caches == [torch.device("cpu")] * 3
    torch.testing.assert_close(_prompt_logits(llm), _prompt_logits(dense), atol=0, rtol=0)


def test_bad_topology_and_device_map_are_load_errors(tiny_model, tmp_path):
    folder = str(tiny_model("llama"))
    with pytest.raises(InvalidTopology, match="cannot read topology file"):
        LLM(folder, **OPTIONS, topology=str(tmp_path / "missing.yml"))
    path = tmp_path / "too-long.yml"
    path.write_text("0-8: {isq: int8}\n")
    with pytest.raises(InvalidTopology, match="key '0-8': layer 7 is beyond"):
        LLM(folder, **OPTIONS, topology=str(path))
    with pytest.raises(InvalidTopology, match="places 4 layers but the model has 3"):
        LLM(folder, **OPTIONS, device_map="0:4")
    from levante.engine.placement import _checked

    with pytest.raises(InvalidTopology, match="device map '0:1;9:1': device cuda:9 is not available"):
        _checked("cuda:9", "device map '0:1;9:1'")


def test_tensor_parallel_fails_together_on_a_bad_topology(tiny_model, tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("0-9: {isq: int8}\n")
    with pytest.raises(InvalidTopology, match="key '0-9'"):
        LLM(str(tiny_model("llama")), **OPTIONS, topology=str(path), tensor_parallel_size=2)
    from levante.distributed import parallel_state

    assert not parallel_state.is_initialized()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layers_split_between_cuda_and_cpu(tiny_model, dense, tmp_path):
    path = tmp_path / "topology.yml"
    path.write_text("0-2: {device: 'cuda[0]'}\n2: {device: cpu}\n")
    llm = LLM(str(tiny_model("llama")), **OPTIONS, device="cuda", topology=str(path))
    assert layer_devices(llm.engine.model) == [torch.device("cuda", 0)] * 2 + [torch.device("cpu")]
    caches = [m.k_cache.device.type for m in llm.engine.model.modules() if isinstance(m, Attention)]
    assert caches == ["cuda", "cuda", "cpu"]
    torch.testing.assert_close(_prompt_logits(llm).cpu(), _prompt_logits(dense), atol=1e-3, rtol=0)

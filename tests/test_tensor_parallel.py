"""Tensor parallelism over gloo on this CPU: 2 ranks (rank 0 here, one spawned worker)
against 1 rank, same float32 weights.

Splitting a matmul's input dimension (o_proj, down_proj) sums partial products in another
order, so logits differ by float rounding only (observed ~2e-6); 1e-4 as in test_models.
"""
import pytest
import torch

from levante import LLM, SamplingParams
from levante.errors import ModelLoadError
from levante.kernels import native

ATOL = 1e-4
OPTIONS = dict(dtype="float32", block_size=4, num_kv_blocks=128)


def _prompts():
    g = torch.Generator().manual_seed(1)
    # 40 tokens: longer than the tiny Gemma 3's sliding window (16); two lengths: a ragged batch.
    return [torch.randint(3, 384, (40,), generator=g).tolist(), torch.randint(3, 384, (9,), generator=g).tolist()]


def _run(llm):
    prompts = _prompts()
    logits = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True))
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    return [o.metrics["prompt_logits"] for o in logits], [o.outputs[0].token_ids for o in greedy]


def _compare(folder, check=None, **options):
    with LLM(str(folder), **OPTIONS, **options, tensor_parallel_size=2) as llm:
        assert llm.engine.model.model.layers[0].self_attn.num_heads == 2  # half of the 4 heads
        if check is not None:
            check(llm)
        # A single-rank engine built and run while this process holds the group stays whole.
        reference = LLM(str(folder), **OPTIONS, **options)
        assert reference.engine.model.model.layers[0].self_attn.num_heads == 4
        ref_logits, ref_tokens = _run(reference)
        logits, tokens = _run(llm)
        procs = llm.engine.tensor_parallel.procs
    assert all(p.poll() is not None for p in procs), "workers outlive close()"
    for ours, ref in zip(logits, ref_logits):
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert tokens == ref_tokens


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "mistral", "phi3", "mixtral", "qwen3_moe"])
def test_tp2_matches_tp1(tiny_model, arch):
    _compare(tiny_model(arch))


def _greedy(llm):
    return [o.outputs[0].token_ids for o in llm.generate(
        _prompts(), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]


@pytest.mark.slow
def test_a_second_tp_llm_needs_no_close(tiny_model):
    """As in a notebook: a dropped LLM releases its group when collected; a new one made while the
    old one is still referenced (`llm = LLM(...)` run again) takes the group over."""
    import gc

    from levante.errors import LevanteError

    folder = str(tiny_model("qwen2"))
    first = LLM(folder, **OPTIONS, tensor_parallel_size=2)
    expected = _greedy(first)
    first_workers = first.engine.tensor_parallel.procs
    del first
    gc.collect()
    assert all(p.wait(10) is not None for p in first_workers), "a collected LLM keeps its workers"
    second = LLM(folder, **OPTIONS, tensor_parallel_size=2)
    assert _greedy(second) == expected
    third = LLM(folder, **OPTIONS, tensor_parallel_size=2)  # `second` is still referenced
    assert all(p.wait(10) is not None for p in second.engine.tensor_parallel.procs)
    with pytest.raises(LevanteError, match="took the group over"):
        second.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
    assert _greedy(third) == expected
    third.close()


def test_tp2_splits_every_quantized_expert(tiny_model, tmp_path):
    """A Q4_0 Mixtral GGUF: each rank keeps its half of every expert's width, still quantised
    (down_proj's input columns split on block boundaries)."""
    from gguf import GGMLQuantizationType

    from levante.quant.packed import Int4Weight, Int8Weight, int4_fits
    from tiny_gguf import convert

    path = convert(tiny_model("mixtral"), tmp_path / "mixtral-q4_0.gguf", GGMLQuantizationType.Q4_0)
    # 4-bit where this machine has int4 kernels, else int8 codes of the same values (quant/packed.py)
    packed_type = Int4Weight if int4_fits((64, 64)) else Int8Weight

    def halves_each_expert(llm):
        expert = llm.engine.model.model.layers[0].mlp.experts[3]
        assert isinstance(expert.down_proj.packed, packed_type) and expert.down_proj.packed.shape == (64, 64)
        assert expert.gate_up_proj.packed.shape == (128, 64)  # gate and up: 64 rows each of 128

    _compare(path, prepared_cache=False, check=halves_each_expert)


def test_tp2_replicates_a_single_kv_head(tmp_path):
    """One kv head, two ranks: each rank keeps a copy of it (vLLM's rule)."""
    import transformers as tf

    from tiny_models import _tokenizer

    config = tf.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                            initializer_range=0.1, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                            architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path)
    _tokenizer(tmp_path)
    _compare(tmp_path)


def test_indivisible_split_is_a_clear_error(tiny_model):
    with pytest.raises(ModelLoadError, match="does not divide the model's 4 attention heads"):
        LLM(str(tiny_model("qwen2")), **OPTIONS, tensor_parallel_size=3)
    with pytest.raises(ModelLoadError, match="at least 1"):
        LLM(str(tiny_model("qwen2")), **OPTIONS, tensor_parallel_size=0)


@pytest.mark.slow
def test_tp2_quantized_int4_matches_tp1(tiny_model):
    """In-situ int4 under TP: each rank packs its rows of every weight and of the (tied,
    vocabulary-split) embedding and head. int4 groups run along the input dimension in 32s,
    which the row-parallel split keeps whole, so both sides quantize identically. Where this
    machine has no int4 kernels the weights become per-row int8, whose scales the row-parallel
    ranks take from whole rows: the same codes again."""
    _compare(tiny_model("qwen2"), quantization="int4")


def test_tp2_quantized_int8_matches_tp1(tiny_model):
    """Per-row int8 under TP: a row-parallel rank (o_proj, down_proj) keeps half of each row, with
    the whole row's scale (else its codes and logits differ from one rank's)."""
    _compare(tiny_model("qwen2"), quantization="int8")


@pytest.mark.skipif(not native.available(), reason="no native kernel variant runs here")
def test_tp2_ranks_take_the_paged_kernel(tiny_model):
    """With the native kernels, every rank attends through the paged kernel: a step goes to the workers
    as its block tables (rank 0 builds no SDPA fields for them), and the logits match one rank's."""
    def check(llm):
        runner = llm.engine.runner
        assert runner.paged
        prepare, paged_steps = runner.prepare, []

        def spy(batch, all_logits):
            ids, positions, md = prepare(batch, all_logits)
            paged_steps.append(md.block_tables is not None and md.key_slots is None)
            return ids, positions, md

        runner.prepare = spy
        llm.generate([[7 + i for i in range(30)], [9, 10, 11]], SamplingParams(temperature=0, max_tokens=8))
        runner.prepare = prepare
        assert paged_steps and all(paged_steps)

    _compare(tiny_model("qwen2"), check=check, quantization="int4")  # int4 groups survive the split (see below)


_TORCHRUN_SCRIPT = """
import sys
from levante import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", kv_cache_gb=0.01, tensor_parallel_size=2)
out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
print("TOKENS", out[0].outputs[0].token_ids, flush=True)
"""


@pytest.mark.slow
def test_torchrun_ranks_follow_rank_0(tiny_model, tmp_path):
    """Under torchrun the same script runs on every rank: rank 0 generates, rank 1 serves its steps."""
    import os
    import subprocess
    import sys

    from levante.distributed.parallel_state import free_port

    folder = str(tiny_model("qwen2"))
    script = tmp_path / "generate.py"
    script.write_text(_TORCHRUN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), str(script), folder],
                         capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("TOKENS")]
    assert len(lines) == 1  # only rank 0 gets past LLM(): rank 1 leaves when rank 0 is done
    expected = LLM(folder, dtype="float32", kv_cache_gb=0.01).generate(
        [[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert lines[0] == f"TOKENS {expected[0].outputs[0].token_ids}"


_HOLD_SCRIPT = """
import sys, time
from levante import LLM
llm = LLM(sys.argv[1], dtype="float32", kv_cache_gb=0.01, tensor_parallel_size=2)
print("ready", flush=True)
time.sleep(300)
"""


def _cpu_seconds(pid: int) -> float:
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_idle_worker_sleeps_and_dies_with_rank_0(tiny_model, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "hold.py"
    script.write_text(_HOLD_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    rank0 = subprocess.Popen([sys.executable, str(script), str(tiny_model("qwen2"))], stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        assert rank0.stdout.readline().strip() == "ready"
        children = open(f"/proc/{rank0.pid}/task/{rank0.pid}/children").read().split()
        # Rank 0 may also run a chat-template worker; the tensor-parallel rank is the tp_worker module.
        workers = [int(pid) for pid in children
                   if b"levante.engine.tp_worker" in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert len(workers) == 1
        worker = workers[0]
        before = _cpu_seconds(worker)
        time.sleep(2)
        assert _cpu_seconds(worker) - before < 0.2  # waiting for a step costs no CPU
    finally:
        rank0.send_signal(signal.SIGKILL)
        rank0.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
        try:
            os.waitpid(worker, os.WNOHANG)
        except ChildProcessError:
            pass
        state = open(f"/proc/{worker}/stat").read().rsplit(")", 1)[1].split()[0] \
            if os.path.exists(f"/proc/{worker}") else "gone"
        if state in ("Z", "gone"):
            break
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{worker}") or \
        open(f"/proc/{worker}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"


def test_vision_models_refuse_tensor_parallel():
    from levante.config import ModelConfig
    from levante.engine.build import check_tensor_parallel

    config = ModelConfig.from_hf_dict({"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
                                       "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                       "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 100})
    with pytest.raises(ModelLoadError, match="vision-language models"):
        check_tensor_parallel(config, 2)
    check_tensor_parallel(config, 1)


def test_indivisible_expert_width_is_a_clear_error():
    from levante.config import ModelConfig
    from levante.engine.build import check_tensor_parallel

    raw = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 64,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 90, "num_hidden_layers": 2,
           "vocab_size": 100, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 30}
    with pytest.raises(ModelLoadError, match="does not divide .*an expert width of 30"):
        check_tensor_parallel(ModelConfig.from_hf_dict(raw), 4)
    check_tensor_parallel(ModelConfig.from_hf_dict(raw | {"moe_intermediate_size": 32}), 4)  # 90: no dense MLP
    with pytest.raises(ModelLoadError, match="an MLP width of 90"):
        check_tensor_parallel(ModelConfig.from_hf_dict(raw | {"moe_intermediate_size": 32, "mlp_only_layers": [1]}), 4)

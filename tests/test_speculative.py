"""Speculative decoding: greedy output is exactly plain decoding's, sampled output follows the same
distribution, whatever else the engine does meanwhile (batching, prefix cache, preemption, stops,
logprobs, grammars, streaming)."""
import re
import shutil
import subprocess
import sys

import httpx
import openai
import pytest
import torch
from scipy.stats import chisquare

from levante import LLM, SamplingParams, StructuredOutput
from levante.engine.kv_cache import block_key
from levante.engine.speculative import NgramProposer, rejection_sample
from levante.errors import InvalidRequest, ModelLoadError
from levante.serve.metrics import Metrics
from levante.serve.model_specs import ModelSpec
from levante.serve.router import ServedModel
from live_server import live_server
from tiny_models import load_reference

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
NGRAM = {"speculative_method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}


def _prompts():
    """Prompts that repeat themselves (prompt lookup finds proposals) and some that do not."""
    g = torch.Generator().manual_seed(7)
    pieces = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (9, 5, 14, 20)]
    return [pieces[0] * 3, pieces[1] * 4 + pieces[2], pieces[2], pieces[3] + pieces[3][:10], pieces[3]]


@pytest.fixture(scope="module")
def folder(tiny_model):
    return str(tiny_model("qwen2"))


@pytest.fixture(scope="module")
def plain(folder):
    """Plain decoding, no prefix cache."""
    return LLM(folder, dtype="float32", enable_prefix_caching=False)


@pytest.fixture(scope="module")
def reference(plain):
    """Plain decoding's greedy tokens, one request at a time."""
    return [plain.generate(p, GREEDY)[0].outputs[0].token_ids for p in _prompts()]


@pytest.fixture(scope="module")
def ngram_llm(folder):
    return LLM(folder, dtype="float32", **NGRAM)


@pytest.fixture(scope="module")
def near_draft(folder, tmp_path_factory):
    """The target's weights with noise: a draft model whose proposals are often, not always, kept."""
    model = load_reference(folder)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    out = tmp_path_factory.mktemp("near-draft")
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{folder}/{name}", out / name)
    return str(out)


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_ngram_proposer_takes_the_longest_suffix_at_its_latest_match():
    proposer = NgramProposer(min_n=2, max_n=3)
    #        0  1  2  3  4  5  6  7  8  9 10
    tokens = [1, 2, 3, 9, 2, 3, 8, 7, 1, 2, 3]
    assert proposer.propose(tokens, 2) == [9, 2]  # [1, 2, 3] at 0..2 beats the later [2, 3]
    assert proposer.propose(tokens[:7] + [2, 3], 4) == [8, 2, 3]  # [2, 3]: the latest match, up to the end
    assert proposer.propose([5, 6, 7, 5], 3) == []  # a 1-token match is below min_n
    assert NgramProposer(1, 3).propose([5, 6, 7, 5], 3) == [6, 7, 5]
    assert proposer.propose([4, 4, 4, 4], 3) == [4]  # the latest earlier [4, 4, 4] ends one before the last
    assert proposer.propose([1, 2, 3, 1, 2], 0) == []


@pytest.mark.parametrize("method", ["ngram", "draft-other", "draft-self"])
def test_greedy_output_is_plain_decodings(folder, reference, tiny_model, method):
    options = NGRAM if method == "ngram" else {
        "speculative_method": "draft", "num_speculative_tokens": 3,
        "draft_model": str(tiny_model("llama")) if method == "draft-other" else folder}
    if method == "draft-self":  # prompts longer than a step: the draft model catches up in chunks too
        options["max_num_batched_tokens"] = 16
    llm = LLM(folder, dtype="float32", **options)
    assert _tokens(llm.generate(_prompts(), GREEDY)) == reference
    spec = llm.engine.speculator
    assert spec.num_draft_tokens > 0
    if method != "draft-other":  # a random model of another family agrees with the target by chance only
        assert spec.num_accepted_tokens > spec.num_draft_tokens / 4
    if method == "draft-self":
        assert spec.num_accepted_tokens == spec.num_draft_tokens


def test_int8_kv_cache_keeps_greedy_output_with_both_methods(folder):
    """With an 8-bit cache (quant/kv_int8.py; the draft model's too), speculation gives plain decoding's
    tokens; the model drafting for itself has every draft accepted (both caches hold the same codes)."""
    int8 = {"dtype": "float32", "kv_cache_dtype": "int8"}
    plain = LLM(folder, enable_prefix_caching=False, warmup=False, **int8)
    prompts, greedy = _prompts()[:3], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [plain.generate(p, greedy)[0].outputs[0].token_ids for p in prompts]
    for options in (NGRAM, {"speculative_method": "draft", "num_speculative_tokens": 3, "draft_model": folder}):
        llm = LLM(folder, warmup=False, **int8, **options)
        assert _tokens(llm.generate(prompts, greedy)) == want
        spec = llm.engine.speculator
        assert spec.num_draft_tokens > 0
    assert spec.draft.runner.kv_cache[0][0].dtype == torch.int8
    assert spec.num_accepted_tokens == spec.num_draft_tokens


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_prefix_cache_and_preemption_keep_outputs_and_hash_no_rejected_token(folder, reference, near_draft, method):
    # 24 blocks of 4 slots: the five sequences need more, so some are preempted and recomputed.
    options = NGRAM if method == "ngram" else {"speculative_method": "draft", "draft_model": near_draft,
                                               "num_speculative_tokens": 3}
    llm = LLM(folder, dtype="float32", block_size=4, num_kv_blocks=24, max_model_len=96, **options)
    prompts = _prompts()
    outputs = llm.generate(prompts, GREEDY)
    assert _tokens(outputs) == reference
    manager = llm.engine.block_manager
    assert llm.engine.scheduler.num_preemptions > 0
    assert manager.num_free_blocks == 24
    spec = llm.engine.speculator
    assert spec.num_draft_tokens > spec.num_accepted_tokens > 0  # drafts were rejected, too
    # Every hashed block is a block of some sequence's final tokens (prompt and output), chained from its start.
    chains = set()
    for prompt, output in zip(prompts, _tokens(outputs)):
        tokens, previous = prompt + output, None
        for start in range(0, len(tokens) - 3, 4):
            previous = block_key(previous, tokens[start:start + 4])
            chains.add(previous)
    assert manager.cached and set(manager.cached) <= chains


def test_blocks_cached_while_speculating_serve_later_prompts(plain, ngram_llm, reference):
    prompt = _prompts()[0]
    assert ngram_llm.generate(prompt, GREEDY)[0].outputs[0].token_ids == reference[0]
    again = ngram_llm.generate(prompt + reference[0], GREEDY)[0]
    assert again.num_cached_tokens >= len(prompt)
    assert again.outputs[0].token_ids == plain.generate(prompt + reference[0], GREEDY)[0].outputs[0].token_ids


def test_a_failing_request_fails_alone_while_others_speculate(folder, reference):
    """A step that raises is re-run in parts (engine._isolate): verification runs again for the parts,
    the good requests keep plain decoding's output, the marked one fails, no block leaks."""
    llm = LLM(folder, dtype="float32", warmup=False, **NGRAM)
    seen = {t for tokens in _prompts() + reference for t in tokens}
    engine, marker = llm.engine, next(t for t in range(3, 384) if t not in seen)  # none of the others meets it
    original = engine.model.forward

    def forward(input_ids, positions, *args, **kwargs):
        if bool(((input_ids == marker) & (positions >= 7)).any()):
            raise RuntimeError("injected fault")
        return original(input_ids, positions, *args, **kwargs)

    engine.model.forward = forward
    for i, prompt in enumerate(_prompts()):
        engine.add_request(f"good-{i}", prompt, GREEDY)
    engine.add_request("marked", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                               logit_bias={marker: 100.0}))
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert [finished[f"good-{i}"].outputs[0].token_ids for i in range(len(reference))] == reference
    assert "injected fault" in finished["marked"].error
    assert engine.speculator.num_accepted_tokens > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_speculating_and_plain_sequences_share_steps(folder, ngram_llm, reference):
    """Chunked prefill and a small token budget: drafts are cut to fit, prefills go on beside them."""
    llm = LLM(folder, dtype="float32", max_num_batched_tokens=9, block_size=4, **NGRAM)
    assert _tokens(llm.generate(_prompts(), GREEDY)) == reference
    assert llm.engine.speculator.num_accepted_tokens > 0


def test_penalties_bias_and_min_tokens_see_the_drafts(plain, ngram_llm):
    prompt = _prompts()[0]
    for options in ({"repetition_penalty": 1.5}, {"presence_penalty": 1.0, "frequency_penalty": 0.5},
                    {"logit_bias": {prompt[1]: 3.0}, "min_tokens": 20, "ignore_eos": False}):
        params = SamplingParams(temperature=0, max_tokens=32, **{"ignore_eos": True, **options})
        want = plain.generate(prompt, params)[0].outputs[0].token_ids
        assert ngram_llm.generate(prompt, params)[0].outputs[0].token_ids == want, options


def test_stop_strings_logprobs_and_n(plain, ngram_llm, reference):
    prompt = _prompts()[0]
    base = plain.generate(prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2))[0]
    stop = base.outputs[0].text[9:12]
    for params in (SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[stop]),
                   SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop_token_ids=[reference[0][7]]),
                   SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)):
        want = plain.generate(prompt, params)[0].outputs[0]
        got = ngram_llm.generate(prompt, params)[0].outputs[0]
        assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == \
            (want.text, want.token_ids, want.finish_reason, want.stop_reason)
    got = ngram_llm.generate(prompt, SamplingParams(n=2, temperature=0, max_tokens=32, ignore_eos=True,
                                                    logprobs=2))[0]
    for completion in got.outputs:
        assert completion.token_ids == base.outputs[0].token_ids
        assert [sorted(p) for p in completion.logprobs] == [sorted(p) for p in base.outputs[0].logprobs]
        for mine, theirs in zip(completion.logprobs, base.outputs[0].logprobs):
            for token, logprob in theirs.items():
                assert mine[token].logprob == pytest.approx(logprob.logprob, abs=1e-4)
                assert mine[token].rank == logprob.rank
        assert completion.cumulative_logprob == pytest.approx(base.outputs[0].cumulative_logprob, abs=1e-3)


def test_streaming_gets_several_tokens_at_once(ngram_llm, reference):
    counts, last = [], None
    for output in ngram_llm.stream(_prompts()[0], GREEDY):
        counts.append(len(output.outputs[0].token_ids) - (len(last.outputs[0].token_ids) if last else 0))
        last = output
    assert last.finished and last.outputs[0].token_ids == reference[0]
    assert max(counts) > 1 and len(counts) < len(reference[0])


def test_structured_output_drafts_never_reach_the_grammar(plain, ngram_llm):
    """The grammar allows some proposals and not others; the output is plain decoding's, and it matches."""
    pattern = r"(fox|dog|cat|the)( (fox|dog|cat|the)){11}"
    prompt = "the fox the dog the cat the fox the dog the cat the fox"
    accepted = ngram_llm.engine.speculator.num_accepted_tokens
    for options in ({"temperature": 0}, {"temperature": 0, "n": 2}):
        params = SamplingParams(max_tokens=60, structured=StructuredOutput("regex", pattern), **options)
        want = plain.generate(prompt, params)[0].outputs
        got = ngram_llm.generate(prompt, params)[0].outputs
        assert [o.text for o in got] == [o.text for o in want]
        assert all(re.fullmatch(pattern, o.text) and o.finish_reason == "stop" for o in got)
    assert ngram_llm.engine.speculator.num_accepted_tokens > accepted


def test_rejection_sampling_draws_from_the_target():
    """Whatever the proposal distribution q, the first token drawn follows p (exact counts, fixed seed)."""
    p = torch.tensor([[0.5, 0.25, 0.15, 0.1, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3]])
    generator = torch.Generator().manual_seed(0)
    trials = 8000
    for draft_probs in (None, q):
        counts, kept = torch.zeros(5), 0
        for _ in range(trials):
            if draft_probs is None:
                draft = 0  # prompt lookup: a point mass on token 0
            else:
                draft = int(torch.multinomial(q[0], 1, generator=generator))
            tokens = rejection_sample(p, [draft], draft_probs, generator)
            counts[tokens[0]] += 1
            kept += len(tokens) == 2
        assert chisquare(counts[:4], p[0, :4] * trials).pvalue > 1e-3 and counts[4] == 0
        accept = 0.5 if draft_probs is None else float(torch.minimum(p[0], q[0]).sum())
        assert abs(kept / trials - accept) < 0.03


def _exact_joint(model, prompt, steps, top_k, temperature):
    """P(first `steps` tokens) under top-k and temperature sampling, from transformers' logits."""
    joint = {(): 1.0}
    for _ in range(steps):
        prefixes = list(joint)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1].float()
        kth = logits.topk(top_k).values[:, -1:]
        probs = (logits.masked_fill(logits < kth, float("-inf")) / temperature).softmax(-1)
        joint = {prefix + (t,): joint[prefix] * float(probs[i, t])
                 for i, prefix in enumerate(prefixes) for t in probs[i].nonzero().flatten().tolist()}
    return joint


def _chi_square_pvalue(samples, joint):
    trials = len(samples)
    counts = {}
    for sample in samples:
        counts[sample] = counts.get(sample, 0) + 1
    assert set(counts) <= set(joint)
    cells = sorted(joint, key=joint.get, reverse=True)
    big = [c for c in cells if joint[c] * trials >= 5]  # the rest pooled into one cell
    observed = [counts.get(c, 0) for c in big] + [trials - sum(counts.get(c, 0) for c in big)]
    expected = [joint[c] * trials for c in big] + [trials * (1 - sum(joint[c] for c in big))]
    return chisquare(observed, expected).pvalue


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_tokens_follow_plain_decodings_distribution(folder, near_draft, method):
    """The first three tokens of 3000 seeded samples against their exact joint law (chi-square; seeds fixed,
    so the verdict is too); the same samples are told apart from the law at temperature 1.5: the test
    has the power to see a skew. Proposals are both kept and rejected, many times."""
    g = torch.Generator().manual_seed(11)  # a prompt whose tokens the model often samples next: many proposals
    piece = torch.randint(3, 384, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
    prompt = (piece * 6)[:12]
    options = NGRAM if method == "ngram" else {"speculative_method": "draft", "draft_model": near_draft,
                                               "num_speculative_tokens": 3}
    llm = LLM(folder, dtype="float32", block_size=4, max_num_seqs=256, **options)
    params = SamplingParams(n=3000, seed=11, temperature=1.0, top_k=4, max_tokens=4, ignore_eos=True)
    samples = [tuple(c.token_ids[:3]) for c in llm.generate(prompt, params)[0].outputs]
    spec = llm.engine.speculator
    assert spec.num_draft_tokens > 1000 and 0.1 < spec.num_accepted_tokens / spec.num_draft_tokens < 0.9
    model = load_reference(folder)
    assert _chi_square_pvalue(samples, _exact_joint(model, prompt, 3, 4, 1.0)) > 1e-3
    assert _chi_square_pvalue(samples, _exact_joint(model, prompt, 3, 4, 1.5)) < 1e-6


def test_metrics_report_proposed_and_accepted_tokens(ngram_llm):
    ngram_llm.generate(_prompts()[0], GREEDY)
    served = ServedModel(ModelSpec("tiny", ngram_llm.args))
    served.llm, served.status = ngram_llm, "loaded"
    values = _spec_metrics(Metrics().render([served]).decode())
    spec = ngram_llm.engine.speculator
    assert values["num_drafts"] == spec.num_drafts > 0
    assert values["num_draft_tokens"] == spec.num_draft_tokens > 0
    assert values["num_accepted_tokens"] == spec.num_accepted_tokens > 0


def _spec_metrics(text: str, model: str = "tiny") -> dict[str, float]:
    """levante_spec_decode_<name>_total values of a /metrics page for `model`, by name."""
    from prometheus_client.parser import text_string_to_metric_families

    prefix = "levante_spec_decode_"
    return {sample.name[len(prefix):-len("_total")]: sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.startswith(prefix) and sample.name.endswith("_total")
            and sample.labels.get("model_name") == model}


def test_configuration_errors(folder):
    with pytest.raises(InvalidRequest, match="needs a draft model"):
        LLM(folder, speculative_method="draft")
    with pytest.raises(InvalidRequest, match="'draft' speculative method only"):
        LLM(folder, speculative_method="ngram", draft_model=folder)
    with pytest.raises(InvalidRequest, match="speculative method"):
        LLM(folder, num_speculative_tokens=3)
    with pytest.raises(InvalidRequest, match="num_speculative_tokens"):
        LLM(folder, speculative_method="ngram", num_speculative_tokens=0)
    with pytest.raises(InvalidRequest, match="one of"):
        LLM(folder, speculative_method="eagle")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        LLM(folder, speculative_method="draft", draft_model="smollm2:135m")


def test_server_streams_several_tokens_per_chunk_and_counts_them(ngram_llm):
    message = [{"role": "user", "content": "the fox the dog the cat the fox the dog the cat the fox the dog"}]
    with live_server(ngram_llm, "tiny") as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        kwargs = dict(model="tiny", messages=message, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
        full = client.chat.completions.create(**kwargs)
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == full.choices[0].message.content and chunks[-1].usage.completion_tokens == 40
        values = _spec_metrics(httpx.get(f"{base}/metrics").text)
    assert values["num_draft_tokens"] >= values["num_accepted_tokens"] > 0
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) < 40  # kept drafts arrive together


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "levante", *args], capture_output=True, text=True, timeout=300)


def test_cli_flags(folder):
    ok = _cli("run", "-m", folder, "--dtype", "float32", "--raw", "--temperature", "0", "--max-tokens", "12",
              "--speculative-method", "ngram", "--num-speculative-tokens", "3", "the fox the dog the fox the dog")
    assert ok.returncode == 0, ok.stderr
    bad = _cli("run", "-m", folder, "--speculative-method", "draft", "hi")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.strip()] == \
        ["levante: error: the 'draft' speculative method needs a draft model (--draft-model)"]

"""Gemma 3 with images against transformers: processor (pixels, pan-and-scan, expanded prompt),
vision tower + projector, logits of a ragged batch with 0, 1 and 3 images, greedy continuations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_gemma3_vlm as tiny
from levante.errors import InvalidRequest
from levante.loader.tokenizer import Tokenizer
from levante.multimodal.gemma3 import Gemma3Processor, pan_and_scan_crops

PAS = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=4,
           pan_and_scan_min_ratio_to_activate=1.2)


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build(tmp_path_factory.mktemp("gemma3-vlm"))


@pytest.fixture(scope="module")
def processor(folder):
    return Gemma3Processor.from_pretrained(folder, tiny.read_json(folder / "config.json"))


def ours(processor, text, images, pas):
    settings = processor.image_processor.settings
    saved = dict(settings.__dict__)
    if pas:
        settings.__dict__.update(PAS)
    try:
        ids = processor.tokenizer.encode(text, add_special_tokens=False)
        return processor.process(ids, images)
    finally:
        settings.__dict__.update(saved)


def theirs(folder, text, images, pas):
    hf = tiny.hf_processor(folder, **(PAS if pas else {}))
    return hf(text=[text], images=[images] if images else None, add_special_tokens=False, return_tensors="pt",
              **(PAS if pas else {}))


PROMPTS = [
    ("<bos><start_of_turn>user\n<start_of_image>Describe this picture.<end_of_turn>\n<start_of_turn>model\n",
     [(40, 30)]),
    ("<start_of_turn>user\nWhat is in it?\n<start_of_image>\n\n<start_of_image> and <start_of_image><end_of_turn>\n",
     [(70, 30), (20, 64), (33, 33)]),
    ("<start_of_image><start_of_image>", [(90, 20), (56, 56)]),
    ("no images here\n", []),
]


@pytest.mark.parametrize("pas", [False, True])
@pytest.mark.parametrize("text, sizes", PROMPTS)
def test_processor_matches_transformers(folder, processor, text, sizes, pas):
    images = [picture(w, h, i) for i, (w, h) in enumerate(sizes)]
    mine, ref = ours(processor, text, images, pas), theirs(folder, text, images, pas)
    assert mine.token_ids == ref["input_ids"][0].tolist()
    if images:
        pixels = torch.stack([image.tensors["pixel_values"] for image in mine.images])
        assert torch.equal(pixels, ref["pixel_values"])
    types = ref["token_type_ids"][0].tolist()
    covered = [0] * len(types)
    for (start, end), image in zip(mine.bidirectional_spans, mine.images):
        assert (image.offset, image.offset + image.length) == (start, end)
        covered[start:end] = [1] * (end - start)
    assert covered == types


def test_pan_and_scan_rules():
    landscape = np.zeros((100, 260, 3), np.uint8)
    # 2.6 rounds to 3 crops of ceil(260 / 3) columns, the last one narrower
    assert [c.shape[:2] for c in pan_and_scan_crops(landscape, 50, 4, 1.2)] == [(100, 87), (100, 87), (100, 86)]
    assert len(pan_and_scan_crops(landscape, 100, 4, 1.2)) == 2  # at least 2, at most width // min_crop_size
    assert pan_and_scan_crops(landscape, 200, 4, 1.2) == []  # crops would be under the minimum
    assert pan_and_scan_crops(np.zeros((100, 110, 3), np.uint8), 10, 4, 1.2) == []  # not elongated enough
    assert len(pan_and_scan_crops(np.zeros((10, 1000, 3), np.uint8), 2, 4, 1.2)) == 4  # capped
    portrait = pan_and_scan_crops(np.zeros((301, 100, 3), np.uint8), 10, 4, 1.2)
    assert [c.shape[:2] for c in portrait] == [(101, 100)] * 2 + [(99, 100)]


def test_keys_follow_pixels(processor):
    a, b = picture(30, 30, 1), picture(30, 30, 2)
    first = ours(processor, "<start_of_image><start_of_image><start_of_image>", [a, b, a.copy()], False)
    keys = [image.key for image in first.images]
    assert keys[0] == keys[2] != keys[1]


def test_placeholder_count_must_match(processor):
    with pytest.raises(InvalidRequest, match="2 images"):
        ours(processor, "<start_of_image> only one", [picture(9, 9, 0), picture(9, 9, 1)], False)


@pytest.fixture(scope="module")
def reference(folder):
    return tiny.load_reference(folder)


@pytest.fixture(scope="module")
def levante_model(folder):
    from levante.config import ModelConfig
    from levante.loader import hf
    from levante.models.registry import build_model, load_weights

    config = ModelConfig.from_hf_dict(hf.read_config(folder))
    model = build_model(config, torch.float32, torch.device("cpu"))
    load_weights(model, hf.named_tensors(folder))
    return model.eval()


def test_vision_tower_and_projector_match(levante_model, reference, processor):
    images = [picture(70, 30, 0), picture(20, 64, 1), picture(56, 56, 2)]
    prompt = ours(processor, "<start_of_image>" * 3, images, pas=True)
    pixels = torch.stack([image.tensors["pixel_values"] for image in prompt.images])
    with torch.no_grad():
        expected = reference.get_image_features(pixels).pooler_output
    levante_model.encode_batch = 3  # several groups through the tower
    got = torch.stack(levante_model.encode_images(prompt.images))
    assert len(prompt.images) > 3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_patch_convolution_stays_float32(folder):
    from levante.config import ModelConfig
    from levante.loader import hf
    from levante.models.registry import build_model, load_weights

    config = ModelConfig.from_hf_dict(hf.read_config(folder))
    model = build_model(config, torch.bfloat16, torch.device("cpu"))
    load_weights(model, hf.named_tensors(folder))
    conv = model.vision_tower.embeddings.patch_embedding
    assert conv.weight.dtype == torch.float32 and model.vision_tower.post_layernorm.weight.dtype == torch.bfloat16
    from levante.multimodal.inputs import ImageInput

    rows = model.encode_images([ImageInput("k", 0, 4, {"pixel_values": torch.randn(3, 56, 56)})])
    assert rows[0].dtype == torch.bfloat16 and rows[0].shape == (4, 64)


# A ragged batch: no image; one image; three images of different sizes, two with pan-and-scan crops.
BATCH = [
    ("<bos><start_of_turn>user\nThe quick brown fox jumps over the lazy dog.<end_of_turn>\n<start_of_turn>model\n",
     [], False),
    ("<bos><start_of_turn>user\n<start_of_image>Describe this picture.<end_of_turn>\n<start_of_turn>model\n",
     [(40, 30)], False),
    ("<bos><start_of_turn>user\nWhat is in it?\n<start_of_image> and <start_of_image><start_of_image>"
     "<end_of_turn>\n<start_of_turn>model\n", [(70, 30), (56, 56), (20, 64)], True),
]


def _batch(llm):
    prompts, refs = [], []
    for i, (text, sizes, pas) in enumerate(BATCH):
        images = [picture(w, h, 10 * i + j) for j, (w, h) in enumerate(sizes)]
        prompts.append(ours(llm.engine.processor, text, images, pas))
        refs.append(theirs(llm._test_folder, text, images, pas))
    return prompts, refs


@pytest.fixture(scope="module", params=[1024, 7], ids=["whole", "chunked"])
def llm(request, folder):
    from levante import LLM

    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=256, max_num_batched_tokens=request.param)
    llm._test_folder = folder
    return llm


def test_ragged_batch_logits_match_transformers(llm, reference):
    from levante import SamplingParams

    prompts, refs = _batch(llm)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True))
    for prompt, ref, output in zip(prompts, refs, outputs):
        assert prompt.token_ids == ref["input_ids"][0].tolist()
        with torch.no_grad():
            expected = reference(**ref).logits[0]
        got = output.metrics["prompt_logits"]  # rows served from the prefix cache have no logits
        first_image = prompt.images[0].offset if prompt.images else len(prompt.token_ids) - 1
        assert len(got) >= len(expected) - first_image
        torch.testing.assert_close(got, expected[len(expected) - len(got):], atol=1e-4, rtol=0)


def test_greedy_continuations_match_transformers(llm, reference):
    from levante import SamplingParams

    prompts, refs = _batch(llm)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for ref, output in zip(refs, outputs):
        with torch.no_grad():  # 24 decode steps, each compared: the sliding window (3) is smaller than an image
            expected = reference.generate(**ref, do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                          pad_token_id=0)[0, ref["input_ids"].shape[1]:].tolist()
        assert output.outputs[0].token_ids == expected


def test_repeated_image_is_encoded_once(llm):
    from levante import SamplingParams

    image, other = picture(30, 44, 99), picture(44, 30, 98)
    text = "<bos><start_of_turn>user\n<start_of_image> <start_of_image><end_of_turn>\n"
    runner = llm.engine.runner
    before = runner.encoder_cache.num_encoded
    prompts = [ours(llm.engine.processor, text, [image, image.copy()], False),
               ours(llm.engine.processor, text, [other, image], False)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2))
    assert runner.encoder_cache.num_encoded - before == 2  # two distinct pictures
    assert all(len(o.outputs[0].token_ids) == 2 for o in outputs)


def test_prefix_cache_hit_inside_an_image_span(llm, reference):
    """A repeated prompt reuses cached blocks that end inside an image's span: the rest of the span is
    computed in one step, seeing the cached part, and the logits still equal transformers'."""
    from levante import SamplingParams

    images = [picture(50, 30, 5)]
    block = llm.engine.config.cache.block_size
    for pad in range(block):  # a prompt whose last cacheable block ends inside the image's span
        text = "<bos>" + "x" * pad + " the dog<start_of_image>"
        prompt = ours(llm.engine.processor, text, images, False)
        cacheable = (len(prompt.token_ids) - 1) // block * block
        if any(start < cacheable < end for start, end in prompt.bidirectional_spans):
            break
    else:
        pytest.fail("no prompt puts a block boundary inside the span")
    params = SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True)
    llm.generate([prompt], params)
    again = llm.generate([prompt], params)[0]
    assert again.num_cached_tokens == cacheable
    with torch.no_grad():
        expected = reference(**theirs(llm._test_folder, text, images, False)).logits[0]
    got = again.metrics["prompt_logits"]
    assert len(got) == len(expected) - cacheable
    torch.testing.assert_close(got, expected[cacheable:], atol=1e-4, rtol=0)


def test_bidirectional_mask_matters(llm, reference):
    """Without the image spans' two-way attention the logits differ: the test above can fail."""
    from levante import SamplingParams

    prompts, refs = _batch(llm)
    prompt = prompts[1]
    prompt.bidirectional_spans = []
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True))[0]
    with torch.no_grad():
        expected = reference(**refs[1]).logits[0]
    assert (out.metrics["prompt_logits"] - expected).abs().max() > 1e-3


# -- the server, with the official openai client ------------------------------------------------

def _data_url(image: Image.Image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(folder):
    from levante import LLM
    from live_server import live_server

    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=256)
    with live_server(llm, "tiny-vlm") as (base, _):
        yield base, llm


def test_openai_client_sends_an_image(server, folder, reference):
    import openai

    base, llm = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    image = picture(48, 36, 7)
    response = client.chat.completions.create(
        model="tiny-vlm", max_tokens=8, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in it?"},
            {"type": "image_url", "image_url": {"url": _data_url(image), "detail": "auto"}}]}])
    # The reference: the same conversation through transformers' processor and generate.
    text = llm.chat_template.render([{"role": "user", "content": [{"type": "text", "text": "What is in it?"},
                                                                  {"type": "image"}]}], add_generation_prompt=True)
    ref = theirs(folder, text, [image], False)
    with torch.no_grad():
        ids = reference.generate(**ref, do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    expected = tiny.hf_tokenizer().decode(ids[0, ref["input_ids"].shape[1]:], skip_special_tokens=True)
    assert expected and response.choices[0].message.content == expected
    assert response.usage.prompt_tokens == ref["input_ids"].shape[1]
    # The image given as a bare string URL, streamed: the same answer.
    chunks = client.chat.completions.create(
        model="tiny-vlm", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}, stream=True,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is in it?"},
                                               {"type": "image_url", "image_url": {"url": _data_url(image)}}]}])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_openai_client_image_by_http_url(server):
    """An http URL is fetched; the answer equals the one for the same picture as a data URL."""
    import http.server
    import io
    import threading

    import openai

    base, _ = server
    buffer = io.BytesIO()
    picture(33, 47, 3).save(buffer, format="PNG")
    body = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/pic.png" else 404)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(body if self.path == "/pic.png" else b"")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        answers = [client.chat.completions.create(
            model="tiny-vlm", max_tokens=6, temperature=0, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": source}}]}],
        ).choices[0].message.content for source in (f"{url}/pic.png", _data_url(Image.open(io.BytesIO(body))))]
        assert answers[0] == answers[1]
        with pytest.raises(openai.BadRequestError, match="HTTP 404"):
            client.chat.completions.create(model="tiny-vlm", max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{url}/gone.png"}}]}])
    finally:
        httpd.shutdown()


def test_bad_images_answer_400(server):
    import openai

    base, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    for url, message in [("data:image/png;base64,bm90IGFuIGltYWdl", "not an image"),
                         ("/no/such/picture.png", "no such file"),
                         ("gopher://example.com/a.png", "unsupported URL scheme")]:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model="tiny-vlm", max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    assert client.chat.completions.create(model="tiny-vlm", max_tokens=2, messages=[
        {"role": "user", "content": "still serving"}]).choices[0].message.content is not None


def test_text_model_refuses_images(tiny_model):
    from levante import LLM
    from levante.serve.chat import plan_chat
    from levante.serve.protocol import ChatCompletionRequest

    llm = LLM(str(tiny_model("qwen2")), dtype="float32", num_kv_blocks=16)
    body = ChatCompletionRequest(messages=[{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}])
    with pytest.raises(InvalidRequest, match="does not accept images"):
        plan_chat(llm, body)


# -- the CLI ------------------------------------------------------------------------------------

def _cli(*args, stdin=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "levante", *args], capture_output=True, text=True, timeout=300,
                          input=stdin)


@pytest.mark.slow
def test_cli_run_and_chat_take_images(server, folder, tmp_path):
    from levante import SamplingParams

    _, llm = server
    paths = []
    for i, size in enumerate([(48, 36), (20, 50)]):
        paths.append(tmp_path / f"pic{i}.png")
        picture(*size, 20 + i).save(paths[-1])
    content = [{"type": "image_url", "image_url": {"url": str(p)}} for p in paths] + \
        [{"type": "text", "text": "What is in them?"}]
    expected = llm.chat([{"role": "user", "content": content}], SamplingParams(temperature=0, max_tokens=6))
    expected = expected[0].outputs[0].text
    assert expected.strip()
    common = ["-m", str(folder), "--dtype", "float32", "--temperature", "0", "--max-tokens", "6"]
    result = _cli("run", *common, "--image", str(paths[0]), "--image", str(paths[1]), "What is in them?")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    chat = _cli("chat", *common, stdin=f"/image {paths[0]}\n/image {paths[1]}\nWhat is in them?\n")
    assert chat.returncode == 0, chat.stderr
    assert expected in chat.stdout


def test_cli_bad_image_is_one_line(folder, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_text("not a picture")
    result = _cli("run", "-m", str(folder), "--dtype", "float32", "--image", str(junk), "hi")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not an image" in lines[0], result.stderr


def test_expansion_merges_newlines_like_text_replacement_on_gemma_vocabulary():
    """Gemma 3's real vocabulary (the packaged gemma3:270m's tokenizer) has tokens for runs of newlines:
    the expanded ids must equal tokenizing the text transformers builds by string replacement."""
    from levante.loader.sources import is_installed, resolve_alias
    from levante.multimodal.gemma3 import Gemma3ImageProcessor

    if not is_installed("gemma3:270m"):
        pytest.skip("gemma3:270m is not installed (make test installs it)")
    tok = Tokenizer.from_gguf_metadata(resolve_alias("gemma3:270m"))
    soft = "<unused5>"  # the text-only vocabulary has no <image_soft_token>: any special token will do
    processor = Gemma3Processor(tok, Gemma3ImageProcessor(), boi_id=tok.token_to_id("<start_of_image>"),
                                eoi_id=tok.token_to_id("<end_of_image>"), image_token_id=tok.token_to_id(soft),
                                tokens_per_image=3)
    full = f"\n\n<start_of_image>{soft * 3}<end_of_image>\n\n"
    for text in PROMPTS_WITH_NEWLINES:
        for crops in ([0] * text.count("<start_of_image>"), [2] * text.count("<start_of_image>")):
            pieces = text.split("<start_of_image>")
            expanded = pieces[0] + "".join(
                (full if n == 0 else "Here is the original image " + full
                 + " and here are some crops to help you see better " + " ".join([full] * n)) + rest
                for n, rest in zip(crops, pieces[1:]))
            assert processor.expand(tok.encode(text, add_special_tokens=False), crops) == \
                tok.encode(expanded, add_special_tokens=False)


PROMPTS_WITH_NEWLINES = [
    "<bos><start_of_turn>user\n<start_of_image>Describe this.<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>user\nText before\n\n<start_of_image>\n  after<start_of_image>   x<end_of_turn>\n",
    "<start_of_image>", "a <start_of_image> b", "<start_of_image><start_of_image>\n\n\n",
    "\t\t<start_of_image> <table> x",
]


def test_google_minimal_config_reads_with_gemma3_defaults():
    """google/gemma-3-4b-it's config.json lists only what differs from transformers' defaults."""
    from levante.config import FULL, SLIDING, ModelConfig

    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
           "eos_token_id": [1, 106], "image_token_index": 262144, "mm_tokens_per_image": 256, "model_type": "gemma3",
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024},
           "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                             "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                             "patch_size": 14, "vision_use_head": False}}
    config = ModelConfig.from_hf_dict(raw)
    assert (config.vocab_size, config.num_heads, config.num_kv_heads, config.head_dim) == (262208, 8, 4, 256)
    assert config.layer_types[:6] == [SLIDING] * 5 + [FULL] and len(config.layer_types) == 34
    assert config.rope[FULL].theta == 1e6 and config.rope[FULL].rope_type == "linear" and config.rope[FULL].factor == 8
    assert config.rope[SLIDING].theta == 1e4 and config.rope[SLIDING].rope_type == "default"
    assert config.attention_scale == 256 ** -0.5 and config.eos_token_ids == [1, 106]


@pytest.mark.parametrize("size", [(1000, 500), (300, 700), (896, 896)])
def test_real_size_pixels_match_transformers(size):
    """Gemma 3's own settings (896 px, pan-and-scan with 256 px minimum crops): bit-exact pixels."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from levante.multimodal.gemma3 import Gemma3ImageProcessor, Gemma3ImageSettings

    image = picture(*size, 4)
    ours_ = Gemma3ImageProcessor(Gemma3ImageSettings(do_pan_and_scan=True)).preprocess(image)
    theirs_ = Gemma3ImageProcessorPil(size={"height": 896, "width": 896})(
        image, return_tensors="pt", do_pan_and_scan=True, pan_and_scan_min_crop_size=256,
        pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)["pixel_values"]
    assert torch.equal(ours_, theirs_)


def test_tokenize_counts_gemma_image_tokens(server, folder):
    """/tokenize expands `<start_of_image>` (newlines re-encoded around it) as the engine does."""
    import httpx
    import openai

    base, llm = server
    images = [picture(48, 36, 8), picture(20, 50, 9)]
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in it?"}] + [
        {"type": "image_url", "image_url": {"url": _data_url(image)}} for image in images]}]
    tokenized = httpx.post(f"{base}/tokenize", json={"messages": messages}).json()
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    usage = client.chat.completions.create(model="tiny-vlm", max_tokens=1, messages=messages).usage
    text = llm.chat_template.render([{"role": "user", "content": [{"type": "text", "text": "What is in it?"},
                                                                  {"type": "image"}, {"type": "image"}]}],
                                    add_generation_prompt=True)
    expected = theirs(folder, text, images, False)["input_ids"][0].tolist()
    assert tokenized["tokens"] == expected and tokenized["count"] == usage.prompt_tokens == len(expected)

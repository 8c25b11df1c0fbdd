"""Qwen2.5-VL and Qwen3-VL through the server, with the official `openai` client: images in chat
completions and in /v1/responses against transformers' greedy answers, /tokenize counting image
tokens as the engine does, and several multi-image requests at once."""
from __future__ import annotations

import base64
import io

import pytest
import torch

from tiny_vlm_models import build, load_reference, random_image, reference_inputs

ARCHS = ["qwen2_5_vl", "qwen3_vl"]
QUESTION = "What is in it?"


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module", params=ARCHS)
def arch_folder(request, tmp_path_factory):
    return request.param, build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def served(arch_folder):
    """(base URL, the served LLM)."""
    from levante import LLM
    from live_server import live_server

    _, folder = arch_folder
    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=512, warmup=False)
    with live_server(llm, "tiny-vlm") as (base, _):
        yield base, llm


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(arch_folder):
    return load_reference(*arch_folder)


@pytest.fixture(scope="module")
def hf_tokenizer(arch_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(arch_folder[1])


def expected_answer(arch_folder, reference, hf_tokenizer, images, max_tokens, question=QUESTION):
    """(greedy text, prompt length, each generated token's logprob) from transformers: its tokenizer's
    chat template, its image processor's patch counts, its generate. The logprobs tell images apart
    even where a tiny random model's greedy text does not (Qwen3-VL's answers are all newlines)."""
    arch, _ = arch_folder
    content = [{"type": "text", "text": question}] + [{"type": "image"} for _ in images]
    text = hf_tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                            add_generation_prompt=True)
    inputs = reference_inputs(arch, hf_tokenizer(text, add_special_tokens=False)["input_ids"], images)
    with torch.no_grad():
        out = reference.generate(**inputs, do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    length = inputs["input_ids"].shape[1]
    generated = out.sequences[0, length:]
    logprobs = [float(step[0].log_softmax(-1)[token]) for step, token in zip(out.logits, generated)]
    return hf_tokenizer.decode(generated, skip_special_tokens=True), length, logprobs


def logprobs_of(choice) -> list[float]:
    return [position.logprob for position in choice.logprobs.content]


def chat_content(images, question=QUESTION) -> list[dict]:
    return [{"type": "text", "text": question}] + [
        {"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]


def test_chat_with_an_image_matches_transformers(client, arch_folder, reference, hf_tokenizer):
    image = random_image(70, 50, 41)
    expected, prompt_tokens, logprobs = expected_answer(arch_folder, reference, hf_tokenizer, [image], 8)
    assert expected
    response = client.chat.completions.create(
        model="tiny-vlm", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}, logprobs=True,
        messages=[{"role": "user", "content": chat_content([image])}])
    assert response.choices[0].message.content == expected
    assert logprobs_of(response.choices[0]) == pytest.approx(logprobs, abs=1e-4)
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == 8
    chunks = client.chat.completions.create(
        model="tiny-vlm", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}, stream=True,
        messages=[{"role": "user", "content": chat_content([image])}])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_chat_with_two_images_matches_transformers(client, arch_folder, reference, hf_tokenizer):
    images = [random_image(40, 150, 42), random_image(120, 60, 43)]
    expected, prompt_tokens, logprobs = expected_answer(arch_folder, reference, hf_tokenizer, images, 6)
    response = client.chat.completions.create(
        model="tiny-vlm", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}, logprobs=True,
        messages=[{"role": "user", "content": chat_content(images)}])
    assert response.choices[0].message.content == expected
    assert logprobs_of(response.choices[0]) == pytest.approx(logprobs, abs=1e-4)
    assert response.usage.prompt_tokens == prompt_tokens


# -- /v1/responses ------------------------------------------------------------------------------

def responses_input(image_urls, question=QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_text", "text": question}] + [
        {"type": "input_image", "image_url": url, "detail": "auto"} for url in image_urls]}]


def test_responses_with_an_image_matches_transformers(client, arch_folder, reference, hf_tokenizer, tmp_path):
    image = random_image(84, 56, 44)
    # No ignore_eos in the Responses API: both sides stop at the end-of-turn token or after 8 tokens.
    arch, folder = arch_folder
    content = [{"type": "text", "text": QUESTION}, {"type": "image"}]
    text = hf_tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                            add_generation_prompt=True)
    inputs = reference_inputs(arch, hf_tokenizer(text, add_special_tokens=False)["input_ids"], [image])
    with torch.no_grad():
        ids = reference.generate(**inputs, do_sample=False, max_new_tokens=8, pad_token_id=0)
    length = inputs["input_ids"].shape[1]
    expected = hf_tokenizer.decode(ids[0, length:], skip_special_tokens=True)
    assert expected

    response = client.responses.create(model="tiny-vlm", input=responses_input([data_url(image)]),
                                       max_output_tokens=8, temperature=0)
    assert response.output_text == expected
    assert response.usage.input_tokens == length
    assert response.usage.output_tokens == ids.shape[1] - length

    path = tmp_path / "picture.png"  # a file path in image_url, streamed: the same answer
    image.save(path)
    events = client.responses.create(model="tiny-vlm", input=responses_input([str(path)]), max_output_tokens=8,
                                     temperature=0, stream=True)
    deltas, final = [], None
    for event in events:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert "".join(deltas) == expected and final.output_text == expected


def test_responses_image_errors_answer_400(client):
    import openai

    for part, message in [({"type": "input_image", "image_url": "data:image/png;base64,bm90IGFuIGltYWdl"},
                           "not an image"),
                          ({"type": "input_image", "image_url": "/no/such/picture.png"}, "no such file"),
                          ({"type": "input_image", "file_id": "file-123"}, "file_id"),
                          ({"type": "input_image"}, "image_url"),
                          ({"type": "input_audio", "input_audio": {}}, "input_audio")]:
        with pytest.raises(openai.BadRequestError, match=message):
            client.responses.create(model="tiny-vlm", max_output_tokens=2,
                                    input=[{"role": "user", "content": [part]}])
    assert client.responses.create(model="tiny-vlm", max_output_tokens=2, input="still serving").status


def test_degenerate_and_oversized_images_answer_400(client):
    """A 1x1 image, a zero-byte one and a 60-byte PNG declaring 144 megapixels: 400, then still serving."""
    import openai
    from PIL import Image
    from test_images import png_declaring

    huge = "data:image/png;base64," + base64.b64encode(png_declaring(12000, 12000)).decode()
    for url, message in [(data_url(Image.new("RGB", (1, 1))), "too small"), ("data:image/png;base64,", "empty"),
                         (huge, "too large")]:
        content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model="tiny-vlm", max_tokens=2,
                                           messages=[{"role": "user", "content": content}])
    assert client.chat.completions.create(model="tiny-vlm", max_tokens=2, messages=[
        {"role": "user", "content": chat_content([random_image(56, 56, 3)])}]).choices


def test_text_model_refuses_input_image(tiny_model):
    from levante import LLM
    from levante.errors import InvalidRequest
    from levante.serve.chat import plan_chat
    from levante.serve.responses import ResponsesRequest, to_chat_request

    llm = LLM(str(tiny_model("qwen2")), dtype="float32", num_kv_blocks=16, warmup=False)
    body = ResponsesRequest(input=responses_input(["data:image/png;base64,AA=="]))
    with pytest.raises(InvalidRequest, match="does not accept images"):
        plan_chat(llm, to_chat_request(body))
    text_only = ResponsesRequest(input=[{"role": "user", "content": [{"type": "input_text", "text": "a"},
                                                                     {"type": "input_text", "text": "b"}]}])
    assert to_chat_request(text_only).messages[0].content == "ab"


# -- /tokenize ----------------------------------------------------------------------------------

def test_tokenize_counts_image_tokens_as_the_engine(client, server, arch_folder, hf_tokenizer):
    import httpx

    images = [random_image(56, 84, 45), random_image(150, 40, 46)]
    messages = [{"role": "user", "content": chat_content(images)}]
    tokenized = httpx.post(f"{server}/tokenize", json={"model": "tiny-vlm", "messages": messages}).json()
    usage = client.chat.completions.create(model="tiny-vlm", max_tokens=1, messages=messages).usage
    assert tokenized["count"] == len(tokenized["tokens"]) == usage.prompt_tokens
    # The very ids transformers runs: its template, its tokenizer, its image processor's patch counts.
    content = [{"type": "text", "text": QUESTION}, {"type": "image"}, {"type": "image"}]
    text = hf_tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                            add_generation_prompt=True)
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenized["tokens"] == reference_inputs(arch_folder[0], ids, images)["input_ids"][0].tolist()
    assert len(ids) < tokenized["count"]  # the placeholders did grow
    without_prompt = httpx.post(f"{server}/tokenize", json={"messages": messages, "add_generation_prompt": False})
    assert without_prompt.json()["tokens"] == tokenized["tokens"][:without_prompt.json()["count"]]
    assert without_prompt.json()["count"] < tokenized["count"]


def test_tokenize_image_errors_answer_400(server):
    import httpx

    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/no/such/picture.png"}}]}]
    response = httpx.post(f"{server}/tokenize", json={"messages": bad})
    assert response.status_code == 400 and "no such file" in response.json()["error"]["message"]


def test_tokenize_on_a_text_model_refuses_images(tiny_model):
    from levante import LLM
    from levante.errors import InvalidRequest
    from levante.serve.chat import render_chat

    llm = LLM(str(tiny_model("qwen2")), dtype="float32", num_kv_blocks=16, warmup=False)
    with pytest.raises(InvalidRequest, match="does not accept images"):
        render_chat(llm, [{"role": "user", "content": chat_content([random_image(30, 30, 1)])}])
    text = [{"role": "user", "content": "hello"}]
    assert render_chat(llm, text) == (llm.apply_chat_template(text), None)


# -- several clients at once --------------------------------------------------------------------

def test_concurrent_multi_image_requests_match_single_answers(client, served, arch_folder, reference,
                                                              hf_tokenizer):
    """Six clients at once, 0 to 3 images each (one picture shared by three requests), different
    lengths: the engine runs them as one ragged batch; each answer equals transformers' greedy answer
    and the answer to the same request sent alone."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import openai

    _, llm = served
    pictures = [random_image(56, 84, 51), random_image(40, 150, 52), random_image(120, 60, 53),
                random_image(64, 64, 54)]
    requests = [  # (question, images, max_tokens)
        ("The quick brown fox", [], 5),
        ("Describe this image.", [pictures[0]], 8),
        (QUESTION, [pictures[1], pictures[2]], 6),
        ("What is in them?", [pictures[3], pictures[0], pictures[1]], 10),
        ("Describe this image.", [pictures[1]], 7),
        ("a + b", [pictures[2], pictures[0]], 4),
    ]

    def ask(request):
        question, images, max_tokens = request
        choice = client.chat.completions.create(
            model="tiny-vlm", max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}, logprobs=True,
            messages=[{"role": "user", "content": chat_content(images, question)}]).choices[0]
        return choice.message.content, logprobs_of(choice)

    # Hold the engine's steps until every request is in, so they share steps (a ragged batch).
    engine, added, batch_sizes = llm.engine, [], []
    add_request, step = engine.add_request, engine.step
    deadline = time.monotonic() + 30

    def counting_add(request_id, *args, **kwargs):
        added.append(request_id)
        return add_request(request_id, *args, **kwargs)

    def gated_step():
        if len(added) < len(requests) and time.monotonic() < deadline:
            time.sleep(0.005)
            return []
        outputs = step()
        batch_sizes.append(len({output.request_id for output in outputs}))
        return outputs

    engine.add_request, engine.step = counting_add, gated_step
    try:
        with ThreadPoolExecutor(len(requests) + 1) as pool:
            junk = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]
            bad = pool.submit(client.chat.completions.create, model="tiny-vlm", max_tokens=2,
                              messages=[{"role": "user", "content": junk}])
            together = list(pool.map(ask, requests))
            with pytest.raises(openai.BadRequestError, match="not an image"):  # a bad one among them fails alone
                bad.result()
    finally:
        engine.add_request, engine.step = add_request, step
    assert max(batch_sizes) == len(requests)
    alone = [ask(request) for request in requests]
    expected = [expected_answer(arch_folder, reference, hf_tokenizer, images, max_tokens, question)
                for question, images, max_tokens in requests]
    for (text, logprobs), (text_alone, logprobs_alone), (want, _, want_logprobs) in zip(together, alone, expected):
        assert text == text_alone == want
        assert logprobs == pytest.approx(logprobs_alone, abs=1e-4)
        assert logprobs == pytest.approx(want_logprobs, abs=1e-4)


def test_text_parts_reach_a_string_only_template(tiny_model):
    """OpenAI clients often send text as content parts; a text model's template that concatenates
    `message['content']` gets them joined into one string, with the same prompt as plain text."""
    from levante import LLM
    from levante.serve.chat import render_chat

    llm = LLM(str(tiny_model("qwen2")), dtype="float32", num_kv_blocks=16, warmup=False)
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "The quick "}, {"type": "text", "text": "fox"}]}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick fox"}]
    assert render_chat(llm, parts) == render_chat(llm, plain) == (llm.apply_chat_template(plain), None)
    assert llm.chat_prompt(parts) == llm.apply_chat_template(plain)  # the Python API too


def test_anthropic_image_blocks_base64_and_url(server, arch_folder, reference, hf_tokenizer):
    """/v1/messages with the `anthropic` SDK: an image block, base64 or a URL (fetched by the server's
    guarded fetcher from a loopback server that counts its hits), answers as transformers does."""
    import http.server
    import threading

    import anthropic

    image = random_image(84, 56, 44)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    png, hits = buffer.getvalue(), []

    class Pictures(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    pictures = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pictures)
    pictures.daemon_threads = True
    threading.Thread(target=pictures.serve_forever, daemon=True).start()
    arch, _ = arch_folder
    text = hf_tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                                          {"type": "image"}]}],
                                            tokenize=False, add_generation_prompt=True)
    inputs = reference_inputs(arch, hf_tokenizer(text, add_special_tokens=False)["input_ids"], [image])
    with torch.no_grad():  # no ignore_eos in Anthropic's API: both sides stop at end of turn or after 8 tokens
        ids = reference.generate(**inputs, do_sample=False, max_new_tokens=8, pad_token_id=0)
    length = inputs["input_ids"].shape[1]
    expected = hf_tokenizer.decode(ids[0, length:], skip_special_tokens=True)
    client = anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0)
    try:
        sources = [{"type": "base64", "media_type": "image/png", "data": base64.b64encode(png).decode()},
                   {"type": "url", "url": f"http://127.0.0.1:{pictures.server_address[1]}/cat.png"}]
        for source in sources:
            message = client.messages.create(
                model="tiny-vlm", max_tokens=8, extra_body={"temperature": 0},
                messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                       {"type": "image", "source": source}]}])
            assert "".join(block.text for block in message.content) == expected
            assert message.usage.input_tokens + message.usage.cache_read_input_tokens == length
            assert message.usage.output_tokens == ids.shape[1] - length
    finally:
        pictures.shutdown()
    assert hits == ["/cat.png"]

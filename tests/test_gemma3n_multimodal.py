"""Gemma 3n with images and audio against transformers' Gemma3nForConditionalGeneration and Gemma3nProcessor
(float32): the prompt, pixels and log-mel features; the MobileNet-v5 tower (timm's, through transformers)
and the audio encoder; logits and greedy continuations of a ragged batch mixing text, image and audio
prompts; `LLM.chat` and the server with `input_audio` parts (wav and mp3); bad audio answered with 400."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_gemma3n as tiny

pytestmark = pytest.mark.slow  # the reference runs timm's 84-block tower


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def sound(seconds: float, seed: int, rate: int = tiny.SAMPLING_RATE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (200 + 100 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def encoded(samples: np.ndarray, fmt: str = "wav", rate: int = tiny.SAMPLING_RATE) -> str:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt.upper())
    return base64.b64encode(buffer.getvalue()).decode()


def audio_part(samples: np.ndarray, fmt: str = "wav", rate: int = tiny.SAMPLING_RATE) -> dict:
    return {"type": "input_audio", "input_audio": {"data": encoded(samples, fmt, rate), "format": fmt}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build(tmp_path_factory.mktemp("gemma3n"))


@pytest.fixture(scope="module")
def reference(folder):
    return tiny.load_reference(folder)


@pytest.fixture(scope="module")
def llm(folder):
    from levante import LLM

    return LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=256, max_num_batched_tokens=16)


def ours(processor, text: str, media: list):
    from levante.multimodal.audio import AudioClip

    clips = [AudioClip(m, tiny.SAMPLING_RATE, "test") if isinstance(m, np.ndarray) else m for m in media]
    return processor.process(processor.tokenizer.encode(text, add_special_tokens=False), clips)


def theirs(text: str, media: list) -> dict:
    images = [m for m in media if isinstance(m, Image.Image)] or None
    audio = [m for m in media if isinstance(m, np.ndarray)] or None
    return dict(tiny.hf_processor()(text=text, images=images, audio=audio, return_tensors="pt"))


TURN = "<bos><start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"
# A ragged batch: text; an image; an audio clip; an image between two clips. The two clips of one prompt
# have one length: transformers encodes a prompt's clips as one batch padded to the longest, and its
# convolutions read past a clip's end into that padding, so a shorter clip's last rows would depend on
# its neighbour; levante encodes each clip alone (as transformers does a prompt's only clip).
BATCH = [
    ("text", TURN.format("The quick brown fox jumps over the lazy dog."), []),
    ("image", TURN.format("<image_soft_token>Describe this picture."), [picture(70, 40, 1)]),
    ("audio", TURN.format("What is said in the clip?<audio_soft_token>"), [sound(0.9, 2)]),
    ("image+audio", TURN.format("<audio_soft_token> and <image_soft_token>, then<audio_soft_token>"),
     [sound(1.3, 3), picture(30, 60, 4), sound(1.3, 5)]),
]


def test_prompt_pixels_and_features_match_transformers(llm):
    for _, text, media in BATCH:
        prompt, ref = ours(llm.engine.processor, text, media), theirs(text, media)
        assert prompt.token_ids == ref["input_ids"][0].tolist()
        pixels = [i.tensors["pixel_values"] for i in prompt.images if "pixel_values" in i.tensors]
        if pixels:
            torch.testing.assert_close(torch.stack(pixels), ref["pixel_values"], rtol=0, atol=0)
        clips = [i.tensors for i in prompt.images if "input_features" in i.tensors]
        for n, clip in enumerate(clips):  # transformers pads a batch of clips to the longest
            frames = clip["input_features"].size(0)
            torch.testing.assert_close(clip["input_features"], ref["input_features"][n, :frames], rtol=0, atol=1e-5)
            assert clip["input_features_mask"].tolist() == ref["input_features_mask"][n, :frames].tolist()


def test_audio_at_another_rate_is_resampled(llm):
    import soxr

    from levante.multimodal.audio import AudioClip

    processor = llm.engine.processor
    samples = sound(0.7, 6, rate=44100)
    got = processor.audio_input(AudioClip(samples, 44100, "test"))["input_features"]
    expected = tiny.feature_extractor()(soxr.resample(samples, 44100, tiny.SAMPLING_RATE), return_tensors="pt")
    torch.testing.assert_close(got, expected["input_features"][0], rtol=0, atol=1e-5)


def test_towers_match_transformers(llm, reference):
    """MobileNet-v5 (timm's, as transformers builds it) and the USM encoder, each with its embedder."""
    media = [picture(64, 64, 7), picture(20, 90, 8), sound(1.1, 9), sound(0.3, 10)]
    text = TURN.format("<image_soft_token><image_soft_token><audio_soft_token><audio_soft_token>")
    prompt = ours(llm.engine.processor, text, media)
    rows = llm.engine.model.encode_images(prompt.images)
    pixels = torch.stack([i.tensors["pixel_values"] for i in prompt.images[:2]])
    with torch.no_grad():
        expected = reference.model.get_image_features(pixels).pooler_output
        torch.testing.assert_close(torch.stack(rows[:2]), expected, rtol=0, atol=1e-5)
        for item, got in zip(prompt.images[2:], rows[2:]):
            features = item.tensors["input_features"].unsqueeze(0)
            mask = item.tensors["input_features_mask"].unsqueeze(0)
            audio = reference.model.get_audio_features(features, ~mask)
            n = audio.pooler_output.size(1)
            torch.testing.assert_close(got[:n][~audio.audio_mel_mask[0]], audio.pooler_output[0][~audio.audio_mel_mask[0]],
                                       rtol=0, atol=1e-5)
    assert all(r.shape == (tiny.AUDIO_TOKENS, 64) for r in rows[2:])


def _reference_logits(reference, ref):
    with torch.no_grad():
        return reference(**ref).logits[0]


def test_ragged_batch_logits_match_transformers(llm, reference, record_property):
    from levante import SamplingParams

    prompts = [ours(llm.engine.processor, text, media) for _, text, media in BATCH]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True))
    for (kind, text, media), output in zip(BATCH, outputs):
        expected = _reference_logits(reference, theirs(text, media))
        got = output.metrics["prompt_logits"]
        assert len(got) == len(expected) - output.num_cached_tokens
        delta = (got - expected[len(expected) - len(got):]).abs().max().item()
        record_property(f"max_abs_logit_delta[{kind}]", delta)
        print(f"gemma3n {kind}: max |logit delta| = {delta:.2e}")
        assert delta <= 1e-4, (kind, delta)


def test_greedy_continuations_match_transformers(llm, reference):
    from levante import SamplingParams

    prompts = [ours(llm.engine.processor, text, media) for _, text, media in BATCH]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for (kind, text, media), output in zip(BATCH, outputs):
        ref = theirs(text, media)
        with torch.no_grad():
            ids = reference.generate(**ref, do_sample=False, max_new_tokens=16, min_new_tokens=16,
                                     pad_token_id=tiny.PAD)
        assert output.outputs[0].token_ids == ids[0, ref["input_ids"].shape[1]:].tolist(), kind


def test_prefix_cache_tells_clips_apart(llm, reference):
    """A repeated audio prompt reuses its cached blocks; the same text with another clip does not get them."""
    from levante import SamplingParams

    text = TURN.format("Listen:<audio_soft_token> and say.")
    params = SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True)
    first, other = sound(0.9, 20), sound(0.9, 21)
    llm.generate([ours(llm.engine.processor, text, [first])], params)
    again = llm.generate([ours(llm.engine.processor, text, [first])], params)[0]
    changed = llm.generate([ours(llm.engine.processor, text, [other])], params)[0]
    prompt = ours(llm.engine.processor, text, [first])
    assert again.num_cached_tokens > prompt.images[0].offset + prompt.images[0].length
    assert changed.num_cached_tokens <= prompt.images[0].offset
    for clip, output in ((first, again), (other, changed)):
        expected = _reference_logits(reference, theirs(text, [clip]))
        torch.testing.assert_close(output.metrics["prompt_logits"], expected[output.num_cached_tokens:],
                                   atol=1e-4, rtol=0)


def _chat_messages(samples, fmt="wav", rate=tiny.SAMPLING_RATE):
    return [{"role": "user", "content": [{"type": "text", "text": "What is said in the clip?"},
                                         audio_part(samples, fmt, rate)]}]


def test_llm_chat_takes_input_audio(llm, reference):
    """`LLM.chat` with an `input_audio` part (and the same clip as mp3): transformers' answer."""
    import soundfile

    from levante import SamplingParams

    samples = sound(0.8, 11)
    out = llm.chat(_chat_messages(samples), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    text = TURN.format("What is said in the clip?<audio_soft_token>")
    ref = theirs(text, [samples])
    assert out.prompt_token_ids == ref["input_ids"][0].tolist()
    with torch.no_grad():
        expected = reference.generate(**ref, do_sample=False, max_new_tokens=16, min_new_tokens=16,
                                      pad_token_id=tiny.PAD)[0, ref["input_ids"].shape[1]:].tolist()
    assert out.outputs[0].token_ids == expected
    # mp3: what libsndfile decodes from the mp3 is what the model hears
    mp3 = _chat_messages(samples, "mp3")
    decoded, rate = soundfile.read(io.BytesIO(base64.b64decode(mp3[0]["content"][1]["input_audio"]["data"])),
                                   dtype="float32")
    assert rate == tiny.SAMPLING_RATE
    prompt = llm.chat_prompt(mp3)
    expected_features = tiny.feature_extractor()(decoded, return_tensors="pt")["input_features"][0]
    torch.testing.assert_close(prompt.images[0].tensors["input_features"], expected_features, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def server(llm):
    from live_server import live_server

    with live_server(llm, "tiny-gemma3n") as (base, _):
        yield base


def test_openai_client_sends_audio(server, llm):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    samples = sound(0.6, 12)
    response = client.chat.completions.create(model="tiny-gemma3n", max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True}, messages=_chat_messages(samples))
    from levante import SamplingParams

    expected = llm.chat(_chat_messages(samples), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_bad_audio_answers_400_naming_the_part(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    not_audio = base64.b64encode(b"this is not a sound file at all").decode()
    cases = [
        ({"data": not_audio, "format": "wav"}, r"messages\[0\]\.content\[1\]: not a readable wav file"),
        ({"data": encoded(sound(0.5, 1)), "format": "flac"}, r"messages\[0\]\.content\[1\]: unknown audio format"),
        ({"data": "%%% not base64", "format": "wav"}, r"messages\[0\]\.content\[1\]: 'data' is not valid base64"),
        ({"data": encoded(sound(0.5, 1)), "format": "mp3"}, r"messages\[0\]\.content\[1\]: the data is wav, not mp3"),
        ({"data": encoded(sound(3.0, 1)), "format": "wav"}, r"messages\[0\]\.content\[1\]: the audio is too long"),
    ]
    for value, message in cases:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model="tiny-gemma3n", max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "text", "text": "hi"},
                                             {"type": "input_audio", "input_audio": value}]}])
    assert client.chat.completions.create(model="tiny-gemma3n", max_tokens=2, messages=[
        {"role": "user", "content": "still serving"}]).choices[0].message.content is not None


def test_transcription_through_the_audio_encoder(server, llm):
    """/v1/audio/transcriptions on Gemma 3n: audio longer than its encoder takes is cut into windows, each
    a chat request with the audio and the instruction; the text is what `LLM.chat` answers to those."""
    import openai

    from levante import SamplingParams
    from levante.multimodal.audio import wav_bytes
    from levante.serve.transcription import INSTRUCTION, WINDOW_TOKENS

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    samples, step = sound(3.0, 13), llm.engine.processor.max_samples
    assert len(samples) > step
    transcript = client.audio.transcriptions.create(model="tiny-gemma3n", response_format="verbose_json",
                                                    file=("speech.wav", wav_bytes(samples, tiny.SAMPLING_RATE)))
    greedy, answers = SamplingParams(temperature=0, max_tokens=WINDOW_TOKENS), []
    for start in range(0, len(samples), step):
        data = base64.b64encode(wav_bytes(samples[start:start + step], tiny.SAMPLING_RATE)).decode()
        message = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                                                {"type": "text", "text": INSTRUCTION.format(language="")}]}]
        answers.append(llm.chat(message, greedy)[0].outputs[0].text)
    assert transcript.text == " ".join(a.strip() for a in answers).strip()
    assert [s.start for s in transcript.segments] == pytest.approx(
        [start / tiny.SAMPLING_RATE for start in range(0, len(samples), step)])


def test_text_model_refuses_audio(tiny_model):
    from levante import LLM
    from levante.errors import InvalidRequest
    from levante.serve.chat import plan_chat
    from levante.serve.protocol import ChatCompletionRequest

    llm = LLM(str(tiny_model("qwen2")), dtype="float32", num_kv_blocks=16)
    messages = [{"role": "user", "content": [audio_part(sound(0.5, 1))]}]
    with pytest.raises(InvalidRequest, match="does not accept images or audio"):
        llm.chat(messages)
    with pytest.raises(InvalidRequest, match="does not accept images or audio"):
        plan_chat(llm, ChatCompletionRequest(messages=messages))


def test_image_model_without_audio_refuses_it_naming_the_part():
    from levante.errors import InvalidRequest
    from levante.multimodal.messages import extract_images

    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, audio_part(sound(0.5, 1))]}]
    with pytest.raises(InvalidRequest, match=r"messages\[0\]\.content\[1\]: this model does not take audio"):
        extract_images(messages)

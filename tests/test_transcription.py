"""Speech to text with a tiny random Whisper: greedy tokens equal to transformers' generate (with and
without timestamps, a prompt, a detected language), long audio cut into 30 s windows, wav/flac/mp3
decoded by libsndfile; and /v1/audio/transcriptions through the official `openai` client (json, text,
verbose_json, srt, vtt), bounded in bytes and seconds, with clear 400s."""
import io

import openai
import pytest

from levante import LLM
from levante.errors import InvalidRequest
from levante.serve.limits import RequestLimits
from live_server import live_server
from tiny_whisper import build, encoded, reference_tokens, speech


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(str(folder), dtype="float32")


@pytest.mark.parametrize("seconds,language,timestamps", [(7.5, "en", False), (7.5, "fr", True), (4.0, None, False),
                                                       (4.0, None, True)])
def test_greedy_tokens_equal_transformers(folder, llm, seconds, language, timestamps):
    """Every pass's tokens (transformers' generate runs Whisper's long-form passes even on short audio)."""
    samples = speech(seconds, seed=1)
    transcript = llm.transcribe(samples, language=language, timestamps=timestamps)
    expected, detected = reference_tokens(folder, samples, language, timestamps)
    assert transcript.tokens == expected and expected
    assert transcript.language == llm.transcriber.language_name(detected)
    if timestamps:
        begin = llm.transcriber.settings.timestamp_begin
        assert transcript.tokens[0] >= begin  # the rules: a pass opens with a timestamp
        assert all(s.start <= s.end <= seconds + 30 for s in transcript.segments)


def test_a_prompt_conditions_the_decoding(folder, llm):
    samples = speech(4.0, seed=2)
    transcriber = llm.transcriber
    prompt_ids = [transcriber.settings.previous] + transcriber.tokenizer.encode(" hello world", add_special_tokens=False)
    prompted = llm.transcribe(samples, language="en", prompt="hello world")
    assert prompted.tokens == reference_tokens(folder, samples, "en", prompt_ids=prompt_ids)[0]
    assert prompted.tokens != llm.transcribe(samples, language="en").tokens


def test_long_audio_is_transcribed_window_by_window(folder, llm):
    samples = speech(35.0, seed=3)
    transcript = llm.transcribe(samples, language="en", timestamps=True)
    assert transcript.tokens == reference_tokens(folder, samples, "en", True)[0]
    starts = [segment.start for segment in transcript.segments]
    assert starts == sorted(starts) and starts[-1] >= 30 and transcript.duration == pytest.approx(35.0)
    assert transcript.text == "".join(s.text for s in transcript.segments).strip()
    untimed = llm.transcribe(samples, language="en")  # 30 s, then the last 5 s (transformers wants timestamps)
    assert untimed.text and not any(t >= llm.transcriber.settings.timestamp_begin for t in untimed.tokens)


def test_audio_files_are_decoded_by_libsndfile(llm):
    samples = speech(3.0, seed=4)
    for fmt in ("wav", "flac", "mp3"):
        transcript = llm.transcribe(encoded(samples, fmt), language="en")
        assert transcript.duration == pytest.approx(3.0, abs=0.1) and transcript.text
    lossless = llm.transcribe(encoded(samples, "flac"), language="en").text
    assert lossless == llm.transcribe(encoded(samples, "wav"), language="en").text
    with pytest.raises(InvalidRequest, match="not an audio file"):
        llm.transcribe(b"this is not audio at all" * 10)


@pytest.fixture(scope="module")
def client(llm, tiny_model):
    chat = LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=256, num_kv_blocks=64, warmup=False)
    limits = RequestLimits(max_audio_bytes=4 << 20, max_audio_seconds=90)
    with live_server(chat, "tiny", limits=limits) as (base, state):
        from levante.engine.args import EngineArgs
        from levante.serve.model_specs import ModelSpec

        state.router.add(ModelSpec("whisper", EngineArgs(model=str(llm.model_name)), task="transcribe", pinned=True),
                         llm)
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def test_the_openai_client_transcribes(client, llm):
    samples = speech(33.0, seed=5)
    audio = ("speech.flac", encoded(samples, "flac"))
    expected = llm.transcribe(samples, language="en")
    assert client.audio.transcriptions.create(model="whisper", file=audio, language="en").text == expected.text
    text = client.audio.transcriptions.create(model="whisper", file=audio, language="en", response_format="text")
    assert text.strip() == expected.text

    timed = llm.transcribe(samples, language="en", timestamps=True)
    verbose = client.audio.transcriptions.create(model="whisper", file=audio, language="en",
                                                 response_format="verbose_json", timestamp_granularities=["segment"])
    assert verbose.text == timed.text and verbose.duration == pytest.approx(33.0, abs=0.01)
    assert [(s.start, s.end) for s in verbose.segments] == [(round(s.start, 3), round(s.end, 3)) for s in timed.segments]
    assert verbose.segments[0].avg_logprob < 0 and verbose.segments[0].compression_ratio > 0
    srt = client.audio.transcriptions.create(model="whisper", file=audio, language="en", response_format="srt")
    assert srt.startswith("1\n00:00:") and srt.count(" --> ") == len(timed.segments)
    vtt = client.audio.transcriptions.create(model="whisper", file=audio, language="en", response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:") and vtt.count(" --> ") == len(timed.segments)
    detected = client.audio.transcriptions.create(model="whisper", file=audio, response_format="verbose_json")
    assert detected.language in ("en", "fr", "de")


def test_bad_requests_are_clear_400s(client):
    short = ("a.wav", encoded(speech(1.0), "wav"))

    def refused(match, **kwargs):
        with pytest.raises(openai.BadRequestError, match=match):
            client.audio.transcriptions.create(**{"model": "whisper", "file": short, **kwargs})

    refused("not an audio file", file=("a.wav", b"RIFF nonsense" * 20))
    refused("at most 90 s", file=("long.wav", encoded(speech(100.0), "wav")))
    refused("larger than the server takes", file=("big.wav", io.BytesIO(b"\0" * (5 << 20))))
    refused("'xx' is not one this model knows", language="xx")
    refused("response_format", response_format="tsv")
    refused("only 'segment'", timestamp_granularities=["word"])
    refused("does not take audio", model="tiny")
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="nonesuch", file=short)

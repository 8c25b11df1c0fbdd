"""`/v1/audio/transcriptions`: OpenAI's speech-to-text API (multipart: `file`, `model`, `language`,
`prompt`, `response_format` json | text | verbose_json | srt | vtt, `temperature`).

    file     wav, mp3, flac or ogg, told by its content and decoded by libsndfile (soundfile); at most
             --max-audio-bytes and --max-audio-seconds (400 past either, from the header)
    Whisper  the model's Transcriber (engine/transcriber.py): passes of 30 s windows, each decoded
             through the model's batcher (the windows of concurrent requests share batches); timed
             segments for verbose_json, srt and vtt
    Gemma 3n a chat model that takes audio: each window (as long as its audio encoder takes) is one
             chat request down the pipeline (serve/pipeline.py), an `input_audio` part and the
             instruction to transcribe; a segment per window
"""
from __future__ import annotations

import asyncio
import base64
import gzip

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse

from levante.engine.transcriber import Segment, Transcript
from levante.errors import InvalidRequest
from levante.multimodal.audio import AudioClip, decode_audio_file, wav_bytes
from levante.serve import openai_format as fmt
from levante.serve.embeddings import EmbeddingBatcher
from levante.serve.protocol import ChatCompletionRequest
from levante.serve.sse import collected

TASKS = ("transcribe", "generate")  # Whisper first; a chat model that takes audio (Gemma 3n) else
FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
FIELDS = {"file", "model", "language", "prompt", "response_format", "temperature", "timestamp_granularities[]",
          "timestamp_granularities", "stream"}
INSTRUCTION = "Transcribe this audio{language}. Answer with the transcript only."
WINDOW_TOKENS = 440  # the most a chat model writes for one window (30 s of speech is some 100 words)


class TranscriptionService:
    """A served Whisper model: its name, its transcriber, and the batcher that merges the windows of
    concurrent requests into shared decoding batches."""

    def __init__(self, llm, name: str):
        self.llm, self.name, self.transcriber = llm, name, llm.transcriber
        self.batcher = EmbeddingBatcher(self.transcriber.decode)

    def close(self) -> None:
        self.batcher.close()

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "levante", "type": "transcription",
                "input_modalities": ["audio"]}

    async def transcribe(self, pipeline, route, clip: AudioClip, options: dict) -> Transcript:
        """The transcriber's passes over the clip, each window decoded through the batcher."""
        transcriber = self.transcriber
        decoding = transcriber.decoding(options["language"], options["prompt"], options["timestamps"],
                                        options["temperature"])
        samples = clip.resampled(transcriber.sampling_rate)
        passes = transcriber.passes(samples, decoding)
        async with pipeline.admitted(route, 1):
            window = await asyncio.to_thread(next, passes)  # the log-mel of the whole clip
            try:
                while True:
                    window = passes.send((await self.batcher.embed([window]))[0])
            except StopIteration as done:
                transcript = done.value
        transcript.language = transcript.language or options["language"]
        return transcript


async def transcribe_with_chat(state, model: str | None, clip: AudioClip, options: dict) -> Transcript:
    """A chat model that takes audio (Gemma 3n): a chat request per window its audio encoder takes."""
    async with state.pipeline.routed(model) as route:
        name, processor = route.name, route.llm.engine.processor
    if not getattr(processor, "takes_audio", False):
        raise InvalidRequest(f"model: '{name}' does not take audio; transcribe with a Whisper model or Gemma 3n")
    rate, step = processor.features.rate, processor.max_samples
    samples = clip.resampled(rate)
    starts = list(range(0, len(samples), step))
    texts = await asyncio.gather(*(_chat_window(state, name, samples[i:i + step], rate, options) for i in starts))
    segments = [Segment(i / rate, min(i + step, len(samples)) / rate, text) for i, text in zip(starts, texts)]
    return Transcript(" ".join(t.strip() for t in texts).strip(), clip.seconds, options["language"], segments)


async def _chat_window(state, model: str, samples: np.ndarray, rate: int, options: dict) -> str:
    language = f" (the speech is in {options['language']})" if options["language"] else ""
    instruction = INSTRUCTION.format(language=language)
    if options["prompt"]:
        instruction += f" Context: {options['prompt']}"
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(samples, rate)).decode(),
                                                     "format": "wav"}}
    body = ChatCompletionRequest(model=model, temperature=options["temperature"], max_tokens=options["max_tokens"],
                                 messages=[{"role": "user", "content": [audio, {"type": "text", "text": instruction}]}])
    completion = await collected(None, state.pipeline.chat_events(body), fmt.ChatCompletion("transcription", 0))
    return completion["choices"][0]["message"]["content"] or ""


# -- response formats --------------------------------------------------------------------------------

def _clock(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    return f"{hours:02d}:{minutes:02d}:{millis // 1000:02d}{separator}{millis % 1000:03d}"


def srt(transcript: Transcript) -> str:
    return "".join(f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n\n"
                   for i, s in enumerate(transcript.segments, start=1))


def vtt(transcript: Transcript) -> str:
    return "WEBVTT\n\n" + "".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n\n"
                                  for s in transcript.segments)


def verbose_json(transcript: Transcript, temperature: float) -> dict:
    segments = [{"id": i, "seek": round(s.start * 100), "start": round(s.start, 3), "end": round(s.end, 3),
                 "text": s.text, "tokens": s.tokens, "temperature": temperature, "avg_logprob": s.avg_logprob,
                 "compression_ratio": _compression_ratio(s.text), "no_speech_prob": s.no_speech_prob}
                for i, s in enumerate(transcript.segments)]
    return {"task": "transcribe", "language": transcript.language or "", "duration": round(transcript.duration, 3),
            "text": transcript.text, "segments": segments}


def _compression_ratio(text: str) -> float:
    """Whisper's: the text's bytes over its gzip-compressed bytes (high: repetitive, likely a hallucination)."""
    raw = text.encode("utf-8")
    return len(raw) / len(gzip.compress(raw)) if raw else 0.0


def formatted(transcript: Transcript, response_format: str, temperature: float):
    if response_format == "json":
        return {"text": transcript.text}
    if response_format == "verbose_json":
        return verbose_json(transcript, temperature)
    text = {"text": transcript.text + "\n", "srt": srt(transcript), "vtt": vtt(transcript)}[response_format]
    return PlainTextResponse(text, media_type="text/vtt" if response_format == "vtt" else "text/plain")


# -- the route ---------------------------------------------------------------------------------------

DOC = """Transcribe an audio file (OpenAI's API): Whisper models, and chat models that take audio (Gemma 3n).

```
curl http://127.0.0.1:8000/v1/audio/transcriptions -H "Authorization: Bearer $KEY" \\
  -F file=@speech.wav -F model=whisper -F response_format=verbose_json
```
```python
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
with open("speech.mp3", "rb") as audio:
    print(client.audio.transcriptions.create(model="whisper", file=audio).text)
```
wav, mp3, flac and ogg; `response_format` json, text, verbose_json (segments with times), srt or vtt;
`language` (ISO-639-1, else detected), `prompt` (earlier text, to keep names and style), `temperature`
(0: greedy). Audio longer than 30 s is transcribed window by window.
"""


def register_transcription(app: FastAPI, state) -> None:
    limits = state.limits

    @app.post("/v1/audio/transcriptions", description=DOC)
    async def transcriptions(request: Request, file: UploadFile = File(...), model: str | None = Form(None),
                             language: str | None = Form(None), prompt: str | None = Form(None),
                             response_format: str = Form("json"), temperature: float = Form(0.0),
                             stream: bool = Form(False)):
        form = await request.form()
        options = _options(form, language, prompt, response_format, temperature, stream)
        raw = await file.read(limits.max_audio_bytes + 1)
        if len(raw) > limits.max_audio_bytes:
            raise InvalidRequest(f"file: larger than the server takes ({limits.max_audio_bytes} bytes, "
                                 "--max-audio-bytes)")
        clip = await asyncio.to_thread(decode_audio_file, raw, "file", limits.max_audio_seconds)
        served, _ = state.router.resolve(model, TASKS)
        if served.spec.task == "generate":
            transcript = await transcribe_with_chat(state, model, clip, options)
        else:
            async with state.pipeline.routed(model, ("transcribe",)) as route:
                transcript = await route.model.service.transcribe(state.pipeline, route, clip, options)
        return formatted(transcript, response_format, temperature)


def _options(form, language, prompt, response_format: str, temperature: float, stream: bool) -> dict:
    unknown = sorted(set(form.keys()) - FIELDS)
    if unknown:
        raise InvalidRequest(f"unsupported parameter '{unknown[0]}'")
    if response_format not in FORMATS:
        raise InvalidRequest(f"response_format: must be one of {', '.join(FORMATS)}")
    if not 0 <= temperature <= 1:
        raise InvalidRequest("temperature: must be between 0 and 1")
    if stream:
        raise InvalidRequest("stream: streamed transcription is not supported")
    granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    if any(g != "segment" for g in granularities):
        raise InvalidRequest("timestamp_granularities: only 'segment' is supported")
    return {"language": language or None, "prompt": prompt or None, "temperature": temperature,
            "timestamps": response_format in ("verbose_json", "srt", "vtt"), "max_tokens": WINDOW_TOKENS}

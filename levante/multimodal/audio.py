"""Audio from OpenAI `input_audio` content parts (base64 wav or mp3) and from uploaded files (wav, mp3,
flac, ogg: /v1/audio/transcriptions), decoded to mono float32 samples.

    {"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav" | "mp3"}}

Decoding is libsndfile's (the `soundfile` wheels bundle it, mp3 included: no system service);
resampling to a model's rate is soxr's. Every failure raises `InvalidRequest` (HTTP 400) naming the
part (`messages[1].content[0]`): not base64, an unknown format, not audio of that format, empty,
or too large. How long a clip a model takes is the processor's to say (`AudioClip.seconds`).
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import numpy as np

from levante.errors import InvalidRequest

FORMATS = {"wav": "WAV", "mp3": "MP3"}
# What /v1/audio/transcriptions takes (libsndfile's names), told from the file's content.
UPLOAD_FORMATS = {"wav": "WAV", "mp3": "MP3", "flac": "FLAC", "ogg": "OGG"}
MAX_BYTES = 25 * 1024 * 1024  # OpenAI's upload limit for audio


@dataclass(frozen=True, eq=False)
class AudioClip:
    """Mono samples in [-1, 1] at `sampling_rate`; `where` names the request part it came from."""

    samples: np.ndarray
    sampling_rate: int
    where: str = "audio"

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sampling_rate

    def resampled(self, rate: int) -> np.ndarray:
        """float32 samples at `rate`."""
        if rate == self.sampling_rate:
            return self.samples
        import soxr

        return soxr.resample(self.samples, self.sampling_rate, rate).astype(np.float32)


def input_audio_clip(value, where: str) -> AudioClip:
    """The `input_audio` object of a content part -> an `AudioClip`."""
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}: 'input_audio' must be an object with 'data' and 'format'")
    fmt, data = value.get("format"), value.get("data")
    if fmt not in FORMATS:
        raise InvalidRequest(f"{where}: unknown audio format {fmt!r} (supported: {', '.join(FORMATS)})")
    if not isinstance(data, str) or not data:
        raise InvalidRequest(f"{where}: 'data' must be the base64 {fmt} file")
    if len(data) > MAX_BYTES * 4 // 3 + 4:
        raise InvalidRequest(f"{where}: too large (the limit is {MAX_BYTES} bytes of audio)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}: 'data' is not valid base64") from None
    return decode_audio(raw, fmt, where)


def decode_audio(raw: bytes, fmt: str, where: str = "audio") -> AudioClip:
    """`raw` bytes of a `fmt` file -> a mono `AudioClip` (channels averaged)."""
    return _decode(raw, where, (FORMATS[fmt],), f"a readable {fmt} file", f"not {fmt} as 'format' says")


def decode_audio_file(raw: bytes, where: str = "file", max_seconds: float | None = None) -> AudioClip:
    """An uploaded audio file of any format in UPLOAD_FORMATS (told by its content) -> a mono `AudioClip`;
    longer than `max_seconds` is refused from its header, before its samples are decoded."""
    names = ", ".join(UPLOAD_FORMATS)
    return _decode(raw, where, tuple(UPLOAD_FORMATS.values()), f"an audio file ({names})", f"not one of {names}",
                   max_seconds)


def _decode(raw: bytes, where: str, formats: tuple[str, ...], readable: str, mismatch: str,
            max_seconds: float | None = None) -> AudioClip:
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(raw)) as file:
            found, rate = file.format, file.samplerate
            seconds = file.frames / rate if rate > 0 else 0.0
            if found in formats and (max_seconds is None or seconds <= max_seconds):
                samples = file.read(dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - libsndfile reports every bad file its own way
        raise InvalidRequest(f"{where}: not {readable} ({_reason(e)})") from None
    if found not in formats:
        raise InvalidRequest(f"{where}: the data is {found.lower()}, {mismatch}")
    if max_seconds is not None and seconds > max_seconds:
        raise InvalidRequest(f"{where}: the audio lasts {seconds:.1f} s; this server takes at most {max_seconds:g} s")
    if samples.size == 0 or rate <= 0:
        raise InvalidRequest(f"{where}: the file holds no audio")
    return AudioClip(np.ascontiguousarray(samples.mean(axis=1), dtype=np.float32), int(rate), where)


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """Samples as a float WAV file (no loss): how a clip travels as an `input_audio` part."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def _reason(error: Exception) -> str:
    text = str(error).split(": ", 1)[-1] if ": " in str(error) else str(error)
    return text.strip() or type(error).__name__

"""Gemma 3n prompts with images and audio, as transformers' Gemma3nProcessor builds them, without transformers.

Prompt: the chat template writes one `<image_soft_token>` per image and one `<audio_soft_token>` per clip;
each becomes "\\n\\n<start_of_image>" + soft token x image_seq_length + "<end_of_image>\\n\\n" (audio alike,
with audio_seq_length tokens), the text around re-encoded (multimodal/gemma3.py `expand_placeholders`).

Pixels: resized to the tower's size with PIL bilinear, rescaled by 1/255 (normalised only if the config
says so: Gemma 3n's does not). Audio (Gemma3nAudioFeatureExtractor): resampled to 16 kHz, padded to a
multiple of 128 samples, framed (32 ms windows every 10 ms) with HTK pre-emphasis and a Hann window,
an FFT of twice the next power of two, magnitudes through a mel filterbank (125-7600 Hz), log with a
floor. A clip longer than the model takes (30 s, or fewer seconds than fill its soft tokens) is refused.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from levante.errors import InvalidRequest
from levante.multimodal.audio import AudioClip
from levante.multimodal.gemma3 import (Gemma3ImageProcessor, Gemma3ImageSettings, _read_json,
                                       expand_placeholders)
from levante.multimodal.images import to_rgb
from levante.multimodal.inputs import ImageInput, MultiModalPrompt

IMAGE_TOKEN, AUDIO_TOKEN = "<image_soft_token>", "<audio_soft_token>"
MAX_SAMPLES = 480_000  # Gemma3nAudioFeatureExtractor's max_length: 30 s at 16 kHz


def mel_filters(num_freqs: int, f_min: float, f_max: float, num_mels: int, rate: int, fft_length: int) -> np.ndarray:
    """[num_freqs, num_mels] triangular HTK-mel filters (transformers' create_fb_matrix, norm=None)."""
    freqs = np.arange(num_freqs, dtype=np.float32) * (rate / fft_length)
    mel = np.linspace(2595.0 * math.log10(1.0 + f_min / 700.0), 2595.0 * math.log10(1.0 + f_max / 700.0),
                      num_mels + 2)
    hz = 700.0 * (10 ** (mel / 2595.0) - 1.0)
    widths = hz[1:] - hz[:-1]
    slopes = hz[None, :] - freqs[:, None]
    down, up = -slopes[:, :-2] / widths[:-1], slopes[:, 2:] / widths[1:]
    return np.maximum(np.zeros(1, dtype=np.float32), np.minimum(down, up))


class AudioFeatures:
    """Log-mel features of one clip, as Gemma3nAudioFeatureExtractor computes them."""

    def __init__(self, settings: dict):
        get = lambda key, default: default if settings.get(key) is None else settings[key]  # noqa: E731
        self.rate = int(get("sampling_rate", 16000))
        self.bins = int(get("feature_size", 128))
        self.frame_length = int(round(self.rate * float(get("frame_length_ms", 32.0)) / 1000.0))
        self.hop = int(round(self.rate * float(get("hop_length_ms", 10.0)) / 1000.0))
        self.fft_length = 2 ** math.ceil(math.log2(self.frame_length)) * (2 if get("fft_overdrive", True) else 1)
        self.preemphasis = float(get("preemphasis", 0.97))
        self.htk = bool(get("preemphasis_htk_flavor", True))
        self.scale = float(get("input_scale_factor", 1.0))
        self.mel_floor = float(get("mel_floor", 1e-5))
        self.pad_multiple = 128
        window = np.arange(self.frame_length, dtype=np.float32)
        self.window = (0.5 * (1 - np.cos(2 * np.pi * window / self.frame_length))).astype(np.float32)
        self.filters = mel_filters(self.fft_length // 2 + 1, float(get("min_frequency", 125.0)),
                                   float(get("max_frequency", 7600.0)), self.bins, self.rate, self.fft_length)
        mean, std = settings.get("per_bin_mean"), settings.get("per_bin_stddev")
        self.mean = None if mean is None else np.asarray(mean).reshape(1, -1)
        self.std = None if std is None else np.asarray(std).reshape(1, -1)

    def frames(self, num_samples: int) -> int:
        padded = -(-num_samples // self.pad_multiple) * self.pad_multiple
        return max(0, (padded - (self.frame_length + 1)) // self.hop + 1)

    def __call__(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 samples at `rate` -> (features [frames, bins] float32, mask [frames] True for real frames)."""
        padded = -(-len(samples) // self.pad_multiple) * self.pad_multiple
        wave = np.zeros(padded, dtype=np.float32)
        wave[:len(samples)] = samples
        valid = np.arange(padded) < len(samples)
        if self.scale != 1.0:
            wave = wave * self.scale
        count = self.frames(len(samples))
        size = self.frame_length + 1
        frames = np.lib.stride_tricks.as_strided(wave, shape=(count, size),
                                                 strides=(wave.strides[0] * self.hop, wave.strides[0]))
        if self.preemphasis > 0 and self.htk:
            frames = np.concatenate([frames[:, :1] * (1.0 - self.preemphasis),
                                     frames[:, 1:-1] - self.preemphasis * frames[:, :-2]], axis=-1)
        elif self.preemphasis > 0:
            frames = frames[:, 1:] - self.preemphasis * frames[:, :-1]
        else:
            frames = frames[:, :-1]
        spectrum = np.abs(np.fft.rfft(frames * self.window, n=self.fft_length, axis=-1))
        features = np.log(np.maximum(np.matmul(spectrum, self.filters), self.mel_floor))
        if self.mean is not None:
            features = features - self.mean
        if self.std is not None:
            features = features / self.std
        return features.astype(np.float32), valid[::self.hop][:count]


def audio_tokens_for(frames: int, strides: tuple[int, ...] = (2, 2), reduction: int = 4) -> int:
    """Rows the audio encoder gives for `frames` mel frames (two stride-2 convs, then every 4th row)."""
    for stride in strides:
        frames = (frames - 1) // stride + 1
    return (frames - 1) // reduction + 1


class Gemma3nProcessor:
    """Token ids with one soft token per image or clip, plus the images and clips -> `MultiModalPrompt`."""

    takes_audio = True
    image_placeholder = IMAGE_TOKEN
    audio_placeholder = AUDIO_TOKEN

    def __init__(self, tokenizer, image_processor: Gemma3ImageProcessor, features: AudioFeatures, ids: dict,
                 image_tokens: int, audio_tokens: int):
        self.tokenizer = tokenizer
        self.image_processor, self.features = image_processor, features
        self.boi_id, self.eoi_id, self.image_token_id = ids["boi"], ids["eoi"], ids["image"]
        self.boa_id, self.eoa_id, self.audio_token_id = ids["boa"], ids["eoa"], ids["audio"]
        self.image_tokens, self.audio_tokens = image_tokens, audio_tokens
        backend = getattr(tokenizer, "backend", tokenizer)
        special = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        self._split_ids = special | set(ids.values())
        # the longest clip: 30 s, and no more mel frames than fill the soft tokens
        longest = MAX_SAMPLES
        while longest > 0 and audio_tokens_for(features.frames(longest)) > audio_tokens:
            longest -= features.hop
        self.max_samples = longest

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: dict, tokenizer=None) -> "Gemma3nProcessor":
        folder = Path(model_dir)
        if tokenizer is None:
            from levante.loader.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_folder(folder)
        flat = _read_json(folder / "preprocessor_config.json")  # Google's layout: one dict for both
        nested = _read_json(folder / "processor_config.json")  # transformers 5's: one dict each
        image = {**flat, **(nested.get("image_processor") or {})}
        audio = {**flat, **(nested.get("feature_extractor") or {})}
        if not image.get("do_normalize", False):
            image = {**image, "image_mean": [0.0] * 3, "image_std": [1.0] * 3}
        settings = Gemma3ImageSettings.from_dicts(image, {"image_size": 768})
        ids = {"boi": config.get("boi_token_id", 255999), "eoi": config.get("eoi_token_id", 262144),
               "image": config.get("image_token_id", 262145), "boa": config.get("boa_token_id", 256000),
               "eoa": config.get("eoa_token_id", 262272), "audio": config.get("audio_token_id", 262273)}
        return cls(tokenizer, Gemma3ImageProcessor(settings), AudioFeatures(audio), {k: int(v) for k, v in ids.items()},
                   int(config.get("vision_soft_tokens_per_image") or nested.get("image_seq_length") or 256),
                   int(config.get("audio_soft_tokens_per_image") or nested.get("audio_seq_length") or 188))

    def _expansion(self, audio: bool) -> list[str | list[int]]:
        if audio:
            return ["\n\n", [self.boa_id] + [self.audio_token_id] * self.audio_tokens + [self.eoa_id], "\n\n"]
        return ["\n\n", [self.boi_id] + [self.image_token_id] * self.image_tokens + [self.eoi_id], "\n\n"]

    def audio_input(self, clip: AudioClip) -> dict[str, torch.Tensor]:
        samples = clip.resampled(self.features.rate)
        limit = self.max_samples / self.features.rate
        if len(samples) > self.max_samples:
            raise InvalidRequest(f"{clip.where}: the audio is too long ({clip.seconds:.2f} s; "
                                 f"this model takes at most {limit:.2f} s)")
        if self.features.frames(len(samples)) == 0:
            raise InvalidRequest(f"{clip.where}: the audio is too short ({clip.seconds * 1000:.0f} ms)")
        features, valid = self.features(samples)
        return {"input_features": torch.from_numpy(features), "input_features_mask": torch.from_numpy(valid)}

    def process(self, token_ids: list[int], media: list) -> MultiModalPrompt:
        """`media`: PIL images and `AudioClip`s, in the order of their placeholders."""
        token_ids = list(token_ids)
        places = [i for i, t in enumerate(token_ids) if t in (self.image_token_id, self.audio_token_id)]
        kinds = [token_ids[i] == self.audio_token_id for i in places]
        given = [isinstance(item, AudioClip) for item in media]
        if kinds != given:
            raise InvalidRequest(f"the prompt has {kinds.count(False)} image and {kinds.count(True)} audio "
                                 f"placeholders but {given.count(False)} images and {given.count(True)} audio "
                                 "clips were given (in that order)")
        tensors = [self.audio_input(item) if audio else
                   {"pixel_values": self.image_processor.pixels(np.asarray(to_rgb(item)))}
                   for item, audio in zip(media, kinds)]
        ids = expand_placeholders(self.tokenizer, self._split_ids, token_ids, places,
                                  [self._expansion(audio) for audio in kinds])
        inputs, i = [], 0
        for item, audio, values in zip(media, kinds, tensors):
            soft, length = (self.audio_token_id, self.audio_tokens) if audio else (self.image_token_id,
                                                                                    self.image_tokens)
            start = ids.index(soft, i)
            i = start + length
            inputs.append(ImageInput(key=self._key(values, audio), offset=start, length=length, tensors=values))
        return MultiModalPrompt(token_ids=ids, images=inputs)

    def _key(self, values: dict[str, torch.Tensor], audio: bool) -> str:
        digest = hashlib.sha256(b"audio" if audio else self.image_processor.settings.fingerprint().encode())
        for name in sorted(values):
            digest.update(name.encode())
            digest.update(f"{tuple(values[name].shape)}".encode())
            digest.update(values[name].numpy().tobytes())
        return f"gemma3n:{digest.hexdigest()}"

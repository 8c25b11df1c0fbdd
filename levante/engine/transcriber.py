"""Runs a Whisper model: 16 kHz audio in, text (and timed segments) out.

    audio -> 30 s windows -> log-mel (transformers' WhisperFeatureExtractor) -> the encoder, once per
    window -> greedy decoding, all windows of a batch at once, each from its prompt:
        [<|startofprev|> prompt text] <|startoftranscript|> <|lang|> <|transcribe|> [<|notimestamps|>]
    with Whisper's rules on each step's logits, as transformers' generate applies them: the suppressed
    tokens, the tokens suppressed at the first step, and with timestamps the timestamp rules (they come
    in pairs and never decrease; the first token is one, at most `max_initial_timestamp_index`; a
    timestamp is forced when together they are likelier than any text token).
The language, when not given, is the likeliest language token after <|startoftranscript|>. Long audio
is cut into consecutive windows, each decoded on its own; segment times are offset by the window's
start. Like the Embedder, no paged cache: each batch gets a contiguous KV cache of the decoder's
length, and the cross-attention's keys and values are projected once per batch.
"""
from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from levante.config import EngineConfig
from levante.engine.embedder import SleepsByRebuilding, padded_metadata
from levante.engine.engine import default_dtype
from levante.errors import InvalidRequest, ModelLoadError
from levante.layers.attention import AttentionMetadata, attention_metadata
from levante.loader.auto import ModelSource, open_model
from levante.models.registry import build_transcription_model, load_weights

WINDOW_FRAMES = 3000  # log-mel frames of the 30 s the encoder reads
FRAME_SECONDS, INPUT_STRIDE = 0.01, 2  # a frame's hop; the encoder's convolutions halve time
TIME_PRECISION = FRAME_SECONDS * INPUT_STRIDE  # a timestamp token's step: 0.02 s


@dataclass(frozen=True)
class Decoding:
    """How a window is decoded (windows decoded alike share a batch)."""
    prompt: tuple[int, ...] = ()  # <|startofprev|> and the prompt's tokens, or nothing
    language: int | None = None  # the language token; None: detected per window
    timestamps: bool = False
    temperature: float = 0.0


@dataclass(frozen=True, eq=False)
class Window:
    features: np.ndarray  # [mels, frames]
    decoding: Decoding


@dataclass
class Segment:
    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float = 0.0  # of its tokens (timestamps included), as Whisper reports it
    no_speech_prob: float = 0.0  # its window's


@dataclass
class Transcript:
    """What was said: the text, the audio's length, the language (its code), the timed segments (those
    with text) and every token the passes kept (timestamps included, as transformers' generate returns)."""
    text: str
    duration: float
    language: str | None = None
    segments: list[Segment] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


@dataclass
class Decoded:
    """One window's result: its tokens after the prompt (eos dropped), the language it was read in, each
    token's log-probability (after the rules), and the probability of <|nospeech|> after
    <|startoftranscript|> (Whisper's no-speech probability)."""
    tokens: list[int]
    language: int | None  # its token; None for an English-only model
    logprobs: list[float] = field(default_factory=list)
    no_speech: float = 0.0


class WhisperSettings:
    """generation_config.json: the special tokens and the rules of decoding."""

    def __init__(self, raw: dict, tokenizer, max_positions: int):
        self.start = int(raw["decoder_start_token_id"])
        eos = raw.get("eos_token_id")
        self.eos = int(eos[0] if isinstance(eos, list) else eos)
        self.languages: dict[str, int] = {k: int(v) for k, v in (raw.get("lang_to_id") or {}).items()}
        self.tasks: dict[str, int] = {k: int(v) for k, v in (raw.get("task_to_id") or {}).items()}
        self.no_timestamps = int(raw["no_timestamps_token_id"])
        self.timestamp_begin = self.no_timestamps + 1
        self.previous = tokenizer.token_to_id("<|startofprev|>")
        self.suppress = list(raw.get("suppress_tokens") or [])
        self.begin_suppress = list(raw.get("begin_suppress_tokens") or [])
        self.max_initial_timestamp = raw.get("max_initial_timestamp_index")
        self.max_length = int(raw.get("max_length") or max_positions)
        self.max_positions = max_positions

    def limit(self, prompt_length: int) -> int:
        """How long a pass's decoder sequence may grow (its prompt included): `max_length` new tokens
        past the prompt, as transformers counts them, within the decoder's positions."""
        return min(self.max_length + min(self.max_positions // 2 - 1, prompt_length), self.max_positions)

    def language_id(self, language: str) -> int:
        token = language if language.startswith("<|") else f"<|{language.lower()}|>"
        if token not in self.languages:
            known = ", ".join(sorted(t.strip("<|>") for t in self.languages)) or "none: an English-only model"
            raise InvalidRequest(f"language: '{language}' is not one this model knows ({known})")
        return self.languages[token]

    def init_tokens(self, language: int | None, timestamps: bool) -> list[int]:
        tokens = [self.start] + ([language] if language is not None else [])
        if "transcribe" in self.tasks:
            tokens.append(self.tasks["transcribe"])
        return tokens + ([] if timestamps else [self.no_timestamps])


class Transcriber(SleepsByRebuilding):
    def __init__(self, source: ModelSource, dtype: torch.dtype, device: torch.device, max_batch_size: int = 16):
        from transformers import WhisperFeatureExtractor  # the log-mel features, as Whisper's checkpoints expect

        self.source, self.config, self.dtype, self.device = source, source.config, dtype, device
        self.max_batch_size = max_batch_size
        self.tokenizer = source.tokenizer()
        self.features = WhisperFeatureExtractor.from_pretrained(str(source.path))
        self.sampling_rate = self.features.sampling_rate
        self.window_samples = self.features.n_samples
        self.settings = WhisperSettings(_read_json(source.path / "generation_config.json"), self.tokenizer,
                                        self.config.max_position_embeddings)
        self.model = self._build()

    @classmethod
    def load(cls, model: str, config: EngineConfig) -> Transcriber:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = torch.device(config.device)
        source = open_model(model)
        if source.task != "transcribe":
            raise InvalidRequest(f"'{model}' is not a speech-recognition model (Whisper)")
        return cls(source, config.dtype or default_dtype(device), device)

    def _build(self):
        model = build_transcription_model(self.config, self.dtype, self.device)
        load_weights(model, model.checkpoint_tensors(self.source.weights()))
        return model.eval()



    # -- inputs -------------------------------------------------------------
    def decoding(self, language: str | None = None, prompt: str | None = None, timestamps: bool = False,
                 temperature: float = 0.0) -> Decoding:
        language_id = self.settings.language_id(language) if language else None
        prompt_ids = ()
        if prompt and prompt.strip():
            if self.settings.previous is None:
                raise InvalidRequest("prompt: this model's tokenizer has no <|startofprev|> token")
            text = self.tokenizer.encode(" " + prompt.strip(), add_special_tokens=False)
            room = self.settings.max_positions // 2 - 1  # as Whisper keeps its previous text
            prompt_ids = (self.settings.previous, *text[-room:])
        return Decoding(prompt_ids, language_id, timestamps, temperature)

    # -- decoding -----------------------------------------------------------
    @torch.inference_mode()
    def decode(self, windows: list[Window]) -> list[Decoded]:
        """Each window's tokens, in order; windows decoded alike share batches."""
        out: list[Decoded | None] = [None] * len(windows)
        groups: dict[Decoding, list[int]] = {}
        for index, window in enumerate(windows):
            groups.setdefault(window.decoding, []).append(index)
        for decoding, indices in groups.items():
            for start in range(0, len(indices), self.max_batch_size):
                batch = indices[start:start + self.max_batch_size]
                for index, decoded in zip(batch, self._decode_batch([windows[i] for i in batch], decoding)):
                    out[index] = decoded
        return out

    def _decode_batch(self, windows: list[Window], decoding: Decoding) -> list[Decoded]:
        model, settings = self.model, self.settings
        features = torch.from_numpy(np.stack([w.features for w in windows])).to(self.device, self.dtype)
        positions = model.max_source_positions
        with attention_metadata(padded_metadata([positions] * len(windows), False, self.device)):
            model.remember(model.encode(features))
        cache = _DecoderCache(model, len(windows), settings.max_positions, self.device, self.dtype)
        try:
            languages = [decoding.language] * len(windows)
            if decoding.language is None and settings.languages:
                languages = self._detect_languages(cache)
            rows = [list(decoding.prompt) + settings.init_tokens(language, decoding.timestamps)
                    for language in languages]
            decoded = self._greedy(cache, rows, decoding)
        finally:
            model.forget()
            cache.release()
        for one, language in zip(decoded, languages):
            one.language = language
        return decoded

    def _detect_languages(self, cache: _DecoderCache) -> list[int]:
        """The likeliest language token after <|startoftranscript|>, per window."""
        logits = cache.step(torch.full((cache.batch,), self.settings.start, dtype=torch.long), 0)
        allowed = torch.full_like(logits[0], float("-inf"))
        allowed[list(self.settings.languages.values())] = 0
        return (logits + allowed).argmax(-1).tolist()

    def _greedy(self, cache: _DecoderCache, rows: list[list[int]], decoding: Decoding) -> list[Decoded]:
        settings, begin = self.settings, len(rows[0])
        limit = settings.limit(begin)
        every = cache.step(torch.tensor(rows, dtype=torch.long).view(-1), 0, every=True)
        no_speech = every[:, len(decoding.prompt)].float().softmax(-1)[:, settings.no_timestamps - 1].tolist()
        logits = every[:, -1]
        out = [Decoded([], None, [], p) for p in no_speech]
        done = [False] * len(rows)
        generator = torch.Generator().manual_seed(0) if decoding.temperature > 0 else None
        for length in range(begin, limit):
            scores = self._rules(logits, [o.tokens for o in out], decoding.timestamps, first=length == begin)
            chosen = _choose(scores, decoding.temperature, generator)
            logprobs = torch.log_softmax(scores.float(), dim=-1)
            for row, token in enumerate(chosen):
                if not done[row]:
                    done[row] = token == settings.eos
                    if not done[row]:
                        out[row].tokens.append(token)
                        out[row].logprobs.append(float(logprobs[row, token]))
            if all(done) or length + 1 >= limit:
                break
            logits = cache.step(torch.tensor(chosen, dtype=torch.long), length)
        return out

    def _rules(self, logits: torch.Tensor, generated: list[list[int]], timestamps: bool, first: bool) -> torch.Tensor:
        """Whisper's rules on a step's logits, in transformers' order (begin-suppress, suppress, timestamps)."""
        settings, scores = self.settings, logits.clone()
        if first and settings.begin_suppress:
            scores[:, settings.begin_suppress] = float("-inf")
        if settings.suppress:
            scores[:, settings.suppress] = float("-inf")
        if timestamps:
            _timestamp_rules(scores, generated, settings, first)
        return scores

    # -- passes over the audio ----------------------------------------------
    def passes(self, samples: np.ndarray, decoding: Decoding) -> Generator[Window, Decoded, Transcript]:
        """Transcribe `samples` (float32 at `sampling_rate`) pass by pass, as Whisper's long-form
        algorithm does (and transformers' generate): each pass decodes the 30 s from `seek` (log-mel of
        the whole audio, the last window padded), keeps the segments its timestamps close and moves
        `seek` to the end of the last one (a window's end when it has no timestamps, or when the last
        segment ended with one timestamp). Yields each window to decode; is sent its `Decoded`."""
        features = self._log_mel(samples)
        total, seek, language = features.shape[-1], 0, decoding.language
        tokens, segments = [], []
        while seek < total:
            frames = min(total - seek, WINDOW_FRAMES)
            window = np.zeros((features.shape[0], WINDOW_FRAMES), dtype=np.float32)
            window[:, :frames] = features[:, seek:seek + frames]
            decoded = yield Window(window, replace(decoding, language=language))  # the prompt: every pass
            language = decoded.language
            kept, advance = self._cut(decoded, seek, frames)
            for piece in kept:
                tokens += piece.tokens
            segments += [piece for piece in kept if piece.text.strip()]
            seek += advance
        return Transcript("".join(piece.text for piece in segments).strip(), len(samples) / self.sampling_rate,
                          self.language_name(language), segments, tokens)

    def transcribe(self, samples: np.ndarray, decoding: Decoding) -> Transcript:
        """`passes`, each window decoded here and now."""
        passes = self.passes(samples, decoding)
        try:
            window = next(passes)
            while True:
                window = passes.send(self.decode([window])[0])
        except StopIteration as done:
            return done.value

    def _log_mel(self, samples: np.ndarray) -> np.ndarray:
        """[mels, frames]: 30 s of frames for audio up to 30 s (padded with silence), all of it beyond."""
        if len(samples) <= self.window_samples:
            return self.features(samples, sampling_rate=self.sampling_rate, return_tensors="np").input_features[0]
        return self.features(samples, sampling_rate=self.sampling_rate, return_tensors="np", truncation=False,
                             padding="longest").input_features[0]

    def _cut(self, decoded: Decoded, seek: int, frames: int) -> tuple[list[Segment], int]:
        """(the segments a pass keeps, how many frames `seek` moves): cut after each pair of timestamps;
        an unfinished last segment is dropped and decoded again by the next pass."""
        tokens, begin = decoded.tokens, self.settings.timestamp_begin
        stamped = [token >= begin for token in tokens]
        offset = seek * TIME_PRECISION / INPUT_STRIDE
        single_ending = stamped[-2:] == [False, True]
        cuts = [i + 1 for i in range(len(tokens) - 1) if stamped[i] and stamped[i + 1]]
        if not cuts:  # one segment: the window, or up to its last timestamp
            stamps = [token for token, is_stamp in zip(tokens, stamped) if is_stamp]
            end = int(frames * FRAME_SECONDS / TIME_PRECISION)
            if stamps and stamps[-1] != begin:
                end = stamps[-1] - begin
            return [self._segment(decoded, 0, len(tokens), offset, offset + end * TIME_PRECISION)], frames
        if single_ending:
            cuts.append(len(tokens))
        else:
            cuts[-1] += 1  # the last pair's closing timestamp stays with its segment
        kept, last = [], 0
        for index, cut in enumerate(cuts):
            closing = -1 if index < len(cuts) - 1 or single_ending else -2
            start, end = tokens[last] - begin, tokens[cut + closing] - begin
            kept.append(self._segment(decoded, last, cut, offset + start * TIME_PRECISION, offset + end * TIME_PRECISION))
            last = cut
        return kept, frames if single_ending else (tokens[last - 2] - begin) * INPUT_STRIDE

    def _segment(self, decoded: Decoded, first: int, last: int, start: float, end: float) -> Segment:
        tokens, logprobs = decoded.tokens[first:last], decoded.logprobs[first:last]
        text = self.tokenizer.decode([t for t in tokens if t < self.settings.eos])
        return Segment(start, end, text, tokens, sum(logprobs) / max(1, len(logprobs)), decoded.no_speech)

    def language_name(self, token: int | None) -> str | None:
        return next((name.strip("<|>") for name, t in self.settings.languages.items() if t == token), None)


def _timestamp_rules(scores: torch.Tensor, generated: list[list[int]], settings: WhisperSettings, first: bool) -> None:
    begin = settings.timestamp_begin
    scores[:, settings.no_timestamps] = float("-inf")
    for row, seq in enumerate(generated):
        last = len(seq) >= 1 and seq[-1] >= begin
        penultimate = len(seq) < 2 or seq[-2] >= begin
        if last:
            if penultimate:  # a pair just closed: text comes next
                scores[row, begin:] = float("-inf")
            else:  # an open pair: its closing timestamp (or the end)
                scores[row, :settings.eos] = float("-inf")
        times = [t for t in seq if t >= begin]
        if times:  # never back in time; a closed pair's time is not repeated
            floor = times[-1] if last and not penultimate else times[-1] + 1
            scores[row, begin:floor] = float("-inf")
    if first:
        scores[:, :begin] = float("-inf")
        if settings.max_initial_timestamp is not None:
            scores[:, begin + int(settings.max_initial_timestamp) + 1:] = float("-inf")
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    timestamp = logprobs[:, begin:].logsumexp(dim=-1)
    text = logprobs[:, :begin].max(dim=-1).values
    scores[:, :begin].masked_fill_((timestamp > text).unsqueeze(-1), float("-inf"))


def _choose(scores: torch.Tensor, temperature: float, generator: torch.Generator | None) -> list[int]:
    if temperature <= 0:
        return scores.argmax(-1).tolist()
    probs = torch.softmax(scores.float() / temperature, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).tolist()


class _DecoderCache:
    """A contiguous KV cache for the decoder's self-attention layers: `length` slots per window."""

    def __init__(self, model, batch: int, length: int, device: torch.device, dtype: torch.dtype):
        self.model, self.batch, self.length, self.device = model, batch, length, device
        self.layers = model.self_attention_layers()
        for layer in self.layers:
            shape = (batch * length, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            layer.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def step(self, input_ids: torch.Tensor, start: int, every: bool = False) -> torch.Tensor:
        """The same number of new tokens for every window (a window's together), from position
        `start` -> the logits of each window's last one, [batch, vocab] (`every`: of all, [batch, new, vocab])."""
        new = input_ids.numel() // self.batch
        row = torch.arange(self.batch).unsqueeze(1) * self.length
        positions = torch.arange(start, start + new)
        metadata = AttentionMetadata(
            slot_mapping=(row + positions).view(-1).to(self.device),
            key_slots=(row + torch.arange(start + new)).to(self.device),
            query_positions=positions.repeat(self.batch, 1).to(self.device),
            kv_lens=torch.full((self.batch,), start + new, device=self.device),
            query_index=None, output_index=None, max_position=start + new - 1, causal=True)
        with attention_metadata(metadata):
            logits = self.model.decode(input_ids.to(self.device), positions.repeat(self.batch).to(self.device))
        logits = logits.view(self.batch, new, -1)
        return logits if every else logits[:, -1]

    def release(self) -> None:
        for layer in self.layers:
            layer.k_cache = layer.v_cache = None


def _read_json(path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"{path.parent} has no {path.name} (Whisper's special tokens and decoding rules)")
    return json.loads(path.read_text())

"""A tiny random Whisper, saved with transformers: the model, a byte-level tokenizer laid out as
Whisper's (text tokens, <|endoftext|>, <|startoftranscript|>, languages, tasks, <|startofprev|>,
<|nospeech|>, <|notimestamps|>, then the timestamps <|0.00|>..<|30.00|>), the feature extractor
and a generation config with suppressed tokens; plus synthetic speech-like audio and transformers'
greedy tokens for a window of it (the reference)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

TEXT = ["The quick brown fox jumps over the lazy dog. " * 4, "hello world, how are you today?",
        "Bonjour, ça va? le chat est sur la table."]
LANGUAGES = ["en", "fr", "de"]
RATE = 16000


def _tokenizer(folder: Path) -> dict[str, int]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    specials = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{code}|>" for code in LANGUAGES] +
                ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                 "<|notimestamps|>"])
    tok.add_special_tokens(specials)
    tok.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", special=False) for i in range(1501)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return {token: tok.token_to_id(token) for token in specials} | {"vocab": tok.get_vocab_size()}


def build(folder: Path, max_length: int = 448) -> Path:
    import transformers as tf

    ids = _tokenizer(folder)
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = tf.WhisperConfig(vocab_size=ids["vocab"], num_mel_bins=80, d_model=64, encoder_layers=2,
                              encoder_attention_heads=4, decoder_layers=2, decoder_attention_heads=4,
                              encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=1500,
                              max_target_positions=64, decoder_start_token_id=sot, eos_token_id=eot,
                              bos_token_id=eot, pad_token_id=eot, init_std=0.2)
    torch.manual_seed(0)
    model = tf.WhisperForConditionalGeneration(config)
    with torch.no_grad():  # layer norms start at 1: make them random so they are tested
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        _shape_the_head(model, eot, ids["<|notimestamps|>"] + 1)
    model.generation_config = tf.GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, bos_token_id=eot, pad_token_id=eot, max_length=max_length,
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        lang_to_id={f"<|{c}|>": ids[f"<|{c}|>"] for c in LANGUAGES}, is_multilingual=True,
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        suppress_tokens=[5, 17, 42, ids["<|startoflm|>"]], begin_suppress_tokens=[220, eot],
        max_initial_timestamp_index=50)
    model.to(torch.float32).save_pretrained(folder)
    tf.WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def _shape_the_head(model, eot: int, timestamp_begin: int, bias: float = 2.0) -> None:
    """Make the random model write as a trained one does: timestamps a little less likely than text (so
    that they come as the timestamp rules pair them, not at random without them) and <|endoftext|> now
    and then (so that a pass ends). Every final hidden state gets a shared component `u` (the last layer
    norm's bias); the timestamp rows of the tied head lean against it, the end-of-text row with it."""
    u = torch.nn.functional.normalize(torch.randn(model.config.d_model), dim=0)
    model.model.decoder.layer_norm.bias.add_(bias * u)
    head = model.model.decoder.embed_tokens.weight
    head[timestamp_begin:] -= 3.0 * u
    head[eot] += 1.6 * u


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like audio: a few harmonics gliding in pitch, amplitude-modulated, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voice = sum(np.sin(k * phase) / k for k in (1, 2, 3, 5))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t) ** 2
    return (0.3 * voice * envelope + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def encoded(samples: np.ndarray, fmt: str) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, RATE, format=fmt.upper())
    return buffer.getvalue()


def reference_tokens(folder: Path, samples: np.ndarray, language: str | None = "en", timestamps: bool = False,
                     prompt_ids: list[int] | None = None) -> tuple[list[int], int]:
    """transformers' greedy tokens for `samples` (every pass of its long-form algorithm, timestamps
    included, eos dropped), and the language token it read the audio in."""
    import transformers as tf

    model = tf.WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    extractor = tf.WhisperFeatureExtractor.from_pretrained(folder)
    long = len(samples) > extractor.n_samples
    inputs = extractor(samples, sampling_rate=RATE, return_tensors="pt",
                       **({"truncation": False, "padding": "longest", "return_attention_mask": True} if long else {}))
    kwargs = {"prompt_ids": torch.tensor(prompt_ids)} if prompt_ids else {}
    if long:
        kwargs["attention_mask"] = inputs.attention_mask
    with torch.no_grad():
        out = model.generate(inputs.input_features, language=language, task="transcribe", return_timestamps=timestamps,
                             **kwargs)
        detected = model.detect_language(inputs.input_features[:, :, :3000]).item() if language is None else \
            model.generation_config.lang_to_id[f"<|{language}|>"]
    return [t for t in out[0].tolist() if t != model.generation_config.eos_token_id], detected

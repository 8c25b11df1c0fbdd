"""Tokenizers from an HF folder or from GGUF metadata, and streaming detokenization.

Every tokenizer is a `tokenizers.Tokenizer`. A GGUF carries no `tokenizer.json`, only llama.cpp's
vocabulary keys, so we rebuild the pipeline the way transformers' GGUF integration does
(`integrations/gguf/gguf_tokenizer_mapping.py`): the same model, pre-tokenizer, decoder and added
tokens, so ids agree with `AutoTokenizer.from_pretrained(folder, gguf_file=name)`. Where that
integration departs from llama.cpp and the model's own tokenizer (SmolLM's digit splitting, the
`add_space_prefix` flag) we follow llama.cpp.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from levante.errors import ModelLoadError
from levante.loader.gguf_metadata import read_gguf_metadata
from levante.loader.sources import derived_key, remove_superseded

logger = logging.getLogger("levante")

# GGUF token types (llama.cpp's LLAMA_TOKEN_TYPE_*).
CONTROL, USER_DEFINED = 3, 4

# Token texts that end a turn. llama.cpp stops on these whenever they are in the vocabulary
# (its `special_eog_ids`); we do too, but only when the tokenizer marks them special.
END_OF_TURN_TOKENS = (
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<|return|>", "<|call|>", "<EOT>", "_<EOT>", "<end_of_utterance>",
)

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> split regex; any other value gets GPT-2's own regex.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "megrez"], _QWEN2_SPLIT),
    **dict.fromkeys(["gpt-4o", "llama4", "minimax-m2"], _GPT4O_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
}
# Vocabularies trained with every digit on its own (llama.cpp: `\p{N}` before GPT-2's regex).
# transformers' GGUF path misses this; the models' own tokenizer.json has it.
DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact"}
GEMMA_ARCHITECTURES = {"gemma", "gemma2", "gemma3", "gemma3n"}
# The modules whose code decides what `from_gguf_metadata` builds (the key of its cached copy).
_TOKENIZER_SOURCES = ("loader/tokenizer.py", "loader/gguf_metadata.py")


class Tokenizer:
    """Text <-> token ids, with the special tokens and chat template a model ships."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        eos_token_ids: set[int] = frozenset(),
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.all_special_ids = sorted(
            token_id for token_id, added in backend.get_added_tokens_decoder().items() if added.special
        )
        self.eos_token_ids = _end_of_generation_ids(self, eos_token_ids)
        # skip_special_tokens -> {token id: decode([id])}, filled by IncrementalDetokenizer (at most
        # the vocabulary; plain dict reads and writes of deterministic values, so thread-safe).
        self.one_token_texts: dict[bool, dict[int, str]] = {False: {}, True: {}}

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """An HF folder: `tokenizer.json`, its config files, and the chat template if any."""
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise ModelLoadError(f"{folder} has no tokenizer.json")
        try:
            backend = Backend.from_file(str(folder / "tokenizer.json"))
        except Exception as error:
            raise ModelLoadError(f"cannot read {folder / 'tokenizer.json'}: {error}") from error
        # Some tokenizer.json files pad or truncate to a fixed length (MiniLM pads to 128): a prompt
        # must never be silently padded or cut, so callers that want truncation ask for it.
        backend.no_padding()
        backend.no_truncation()
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        generation = _read_json(folder / "generation_config.json")
        bos, eos = (_token_text(config.get(name) or special_map.get(name)) for name in ("bos_token", "eos_token"))
        eos_ids = generation.get("eos_token_id")
        eos_ids = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or ())
        return cls(backend, bos_token=bos, eos_token=eos, eos_token_ids=eos_ids,
                   chat_template=_folder_chat_template(folder, config))

    @classmethod
    def from_gguf(cls, path: Path, cache: Path | None = None) -> Tokenizer:
        """`from_gguf_metadata`, kept in the folder `cache` for the next start: rebuilding a
        150k-token vocabulary from GGUF metadata in Python takes about a second, reading it back
        from `tokenizers`' own format (`<name>.json`, the rest in `<name>.special.json`) a
        fraction of that, and `read_ahead` can do that while the caller does something else."""
        if cache is None:
            return cls.from_gguf_metadata(path)
        ahead = _reading_ahead.pop((Path(path), cache), None)
        if ahead is not None:
            ahead.join()
            if ahead.tokenizer is not None:
                return ahead.tokenizer
        return cls._from_gguf_cached(path, cache)

    @classmethod
    def _from_gguf_cached(cls, path: Path, cache: Path) -> Tokenizer:
        saved = cache / f"{path.stem}-tokenizer-{derived_key(path, sources=_TOKENIZER_SOURCES)}.json"
        special = saved.with_suffix(".special.json")
        try:
            return cls(Backend.from_file(str(saved)), **_special_from_json(special.read_text(encoding="utf-8")))
        except Exception:  # absent, or not what we wrote (tokenizers raises plain Exception): rebuild it
            pass
        tokenizer = cls.from_gguf_metadata(path)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            _write_atomically(saved, tokenizer.backend.to_str())
            _write_atomically(special, tokenizer._special_json())  # last: who finds it finds both
            remove_superseded(saved)
        except OSError as error:  # a read-only or full cache: the tokenizer still works, it just is not kept
            logger.warning("could not save the tokenizer to %s: %s", saved, error)
        return tokenizer

    @classmethod
    def read_ahead(cls, path: Path, cache: Path) -> None:
        """Start `from_gguf(path, cache)` in a background thread; the next `from_gguf` call with the
        same arguments takes its result. `tokenizers` parses without holding the GIL, so
        `levante serve` has the tokenizer read while it imports the engine and the web stack."""
        _reading_ahead[(Path(path), cache)] = _ReadAhead(path, cache)

    def _special_json(self) -> str:
        return json.dumps({"bos_token": self.bos_token, "eos_token": self.eos_token,
                           "eos_token_ids": sorted(self.eos_token_ids), "chat_template": self.chat_template})

    @classmethod
    def from_gguf_metadata(cls, reader_or_path: Any) -> Tokenizer:
        """Build from a GGUF file's `tokenizer.*` keys (a path, or an open `gguf.GGUFReader`)."""
        meta = read_gguf_metadata(reader_or_path, prefixes=("tokenizer.", "general.architecture"))
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError("the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
        kind = meta.get("tokenizer.ggml.model")
        if kind == "gpt2":
            backend = _byte_level_backend(meta)
        elif kind == "llama":
            backend = _sentencepiece_backend(meta)
        else:
            raise ModelLoadError(f"unsupported GGUF tokenizer model {kind!r}; supported: 'gpt2', 'llama'")
        named = {name: _token_at(tokens, meta.get(f"tokenizer.ggml.{key}"))
                 for name, key in [("bos", "bos_token_id"), ("eos", "eos_token_id"),
                                   ("unk", "unknown_token_id"), ("pad", "padding_token_id")]}
        _add_gguf_added_tokens(backend, meta, named.values())
        add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
        backend.post_processor = _bos_eos_processor(backend, named["bos"] if add_bos else None,
                                                    named["eos"] if add_eos else None)
        eos_ids = {meta[key] for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                         "tokenizer.ggml.eom_token_id") if key in meta}
        return cls(backend, bos_token=named["bos"], eos_token=named["eos"], eos_token_ids=eos_ids,
                   chat_template=meta.get("tokenizer.chat_template"))

    # -- use ----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None


class _ReadAhead(threading.Thread):
    def __init__(self, path: Path, cache: Path):
        super().__init__(name="levante-tokenizer", daemon=True)
        self.path, self.cache, self.tokenizer = path, cache, None
        self.start()

    def run(self) -> None:
        try:
            self.tokenizer = Tokenizer._from_gguf_cached(self.path, self.cache)
        except Exception:  # the caller's own from_gguf tries again and reports it
            pass


# (GGUF path, cache folder) -> the read started by `Tokenizer.read_ahead`
_reading_ahead: dict[tuple[Path, Path], _ReadAhead] = {}


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _special_from_json(text: str) -> dict:
    data = json.loads(text)
    return {"bos_token": data["bos_token"], "eos_token": data["eos_token"],
            "eos_token_ids": set(data["eos_token_ids"]), "chat_template": data["chat_template"]}


def _end_of_generation_ids(tokenizer: Tokenizer, declared: set[int]) -> set[int]:
    """EOS, the ids the model's metadata declares, and any special end-of-turn token present."""
    ids = set(declared)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    special = set(tokenizer.all_special_ids)
    for text in END_OF_TURN_TOKENS:
        token_id = tokenizer.token_to_id(text)
        if token_id in special:
            ids.add(token_id)
    return ids


# -- HF folder helpers ----------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config writes it: a string or a serialized AddedToken."""
    return value.get("content") if isinstance(value, dict) else value


def _folder_chat_template(folder: Path, config: dict) -> str | None:
    """`chat_template.jinja`, then `chat_template.json`, then tokenizer_config's `chat_template`."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


# -- GGUF helpers ---------------------------------------------------------------------------------


def _token_at(tokens: list[str], token_id: int | None) -> str | None:
    return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


BYTE_ALPHABET = set(_bytes_to_unicode().values())


def _byte_level_backend(meta: dict) -> Backend:
    """Byte-level BPE: vocabulary and merges from the file, split regex from `tokenizer.ggml.pre`."""
    spelling = _bytes_to_unicode()
    vocab = {
        token if set(token) <= BYTE_ALPHABET else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(meta["tokenizer.ggml.tokens"])
    }
    merges = [tuple(merge.split(" ")) for merge in meta.get("tokenizer.ggml.merges", [])]
    backend = Backend(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre")
    if pre in PRE_TOKENIZER_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in DIGIT_SPLIT_PRES:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(meta: dict) -> Backend:
    """SentencePiece BPE with byte fallback, as llama.cpp's `llama` tokenizer model.

    A GGUF stores the pieces and scores but usually no merges, so merges are rebuilt from the
    vocabulary: every split of a piece into two pieces, best piece first. Gemma differs twice
    (as in transformers' GemmaTokenizer path): its file order, not its scores, is the merge order,
    and its whitespace-only pieces are stored as real spaces ("  ") but looked up as "▁▁".
    """
    gemma = meta.get("general.architecture") in GEMMA_ARCHITECTURES
    tokens = list(meta["tokenizer.ggml.tokens"])
    if gemma:
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
        priority = {token: -index for index, token in enumerate(tokens)}
    else:
        priority = dict(zip(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)))
    vocab = {token: index for index, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_vocab(vocab, priority)
    unk = _token_at(tokens, meta.get("tokenizer.ggml.unknown_token_id")) or "<unk>"
    backend = Backend(models.BPE(vocab, merges, dropout=None, unk_token=unk, fuse_unk=True, byte_fallback=True))
    pieces = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        add_prefix_space = meta.get("tokenizer.ggml.add_space_prefix", True)
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False)
        if add_prefix_space:
            pieces.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(pieces)
    return backend


def _merges_from_vocab(vocab: dict[str, int], priority: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a piece into two known pieces, ordered best piece first (transformers' order)."""
    ranked = []
    for piece, score in priority.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked.extend((left, right, score) for left, right in splits)
    ranked.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _add_gguf_added_tokens(backend: Backend, meta: dict, named_special: Any) -> None:
    """Control tokens (and bos/eos/unk/pad) become special added tokens, user-defined ones plain
    added tokens, so the text `<|im_end|>` or `<tool_call>` stays one token.

    In a byte-level vocabulary every real token is spelled in the byte alphabet; a control token
    that is not is a llama.cpp mislabel and is skipped, as transformers does.
    """
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    byte_level = meta.get("tokenizer.ggml.model") == "gpt2"
    vocab = backend.get_vocab(with_added_tokens=False)
    wanted = [t for t in named_special if t] + [t for t, kind in zip(tokens, types) if kind == CONTROL]
    special = list(dict.fromkeys(t for t in wanted if t in vocab and (not byte_level or set(t) <= BYTE_ALPHABET)))
    plain = [t for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in plain])


def _bos_eos_processor(backend: Backend, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """Prepend BOS and/or append EOS when `add_special_tokens` is set."""
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = single + " " + " ".join([*([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    special = [(token, backend.token_to_id(token)) for token in dict.fromkeys(t for t in (bos, eos) if t)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


# -- streaming ------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, one step at a time.

    Each step decodes only a short window: from `prefix_offset` (a few tokens of already-emitted
    context, so SentencePiece spacing and byte-level merges come out right) to the end. The text
    beyond the context is emitted unless it ends in U+FFFD, which means a UTF-8 character is still
    incomplete; then it is held back until the next token completes it (vLLM's technique).
    """

    CONTEXT_TOKENS = 5
    MAX_BYTES_PER_CHAR = 4

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_ids)
        self.read_offset = len(self.token_ids)
        self.prefix_offset = max(self.read_offset - self.CONTEXT_TOKENS, 0)
        # A window that starts inside a multi-byte character decodes to garbage: start it earlier.
        lowest = max(self.prefix_offset - self.MAX_BYTES_PER_CHAR, 0)
        while self.prefix_offset > lowest and self._decode(self.prefix_offset, self.read_offset).startswith("\ufffd"):
            self.prefix_offset -= 1
        self._prefix_text = self._decode(self.prefix_offset, self.read_offset)

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        # Runs for every sequence on every step: a levante Tokenizer's backend is called directly
        # (the same call Tokenizer.decode makes, one Python frame fewer), and one-token windows
        # come from its cache of single-token texts (decode is a pure function of the ids).
        levante = type(tokenizer) is Tokenizer
        self._backend_decode = tokenizer.backend.decode if levante else None
        self._one_token_texts = tokenizer.one_token_texts if levante else None

    def step(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the text they complete ("" while a character is unfinished)."""
        self.token_ids.extend(new_token_ids)
        decode = self._backend_decode  # _decode, inlined: this runs for every sequence on every step
        if decode is not None:
            text = decode(self.token_ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        else:
            text = self._decode(self.prefix_offset)
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """At the end of a sequence: whatever was held back, replacement characters included."""
        return self._emit(self._decode(self.prefix_offset))

    def _emit(self, text: str) -> str:
        delta = text[len(self._prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        if self.read_offset - self.prefix_offset == 1 and self._one_token_texts is not None:
            # The common case (every token completes its text): the new prefix is the last token alone.
            cache, token = self._one_token_texts[self.skip_special_tokens], self.token_ids[-1]
            prefix = cache.get(token)
            if prefix is None:
                prefix = cache[token] = self._decode(self.prefix_offset, self.read_offset)
            self._prefix_text = prefix
        else:
            self._prefix_text = self._decode(self.prefix_offset, self.read_offset)
        return delta

    def _decode(self, start: int, end: int | None = None) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens)
